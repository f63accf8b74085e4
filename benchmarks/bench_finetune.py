"""Classification finetuning of the 124M model: peak memory of full, last-block and LoRA finetuning
with `gptforge finetune classify`, and tokens/s of gptforge's training step against the book's
(llms-from-scratch ch06, the body of `train_classifier_simple`), as a ratio.

    python benchmarks/bench_finetune.py [--steps 6] [--batch-size 8] [--length 64]

The model is the book's GPT_CONFIG_124M shape (random weights, saved once as a gptforge checkpoint:
LoRA needs a saved base). Data: short synthetic messages of --length tokens.
Memory: each mode runs `finetune_classify` in a fresh process; with the model loaded and prepared,
the resident memory then, and the peak (VmHWM, reset at that point) up to the last optimizer step:
the growth is what training adds (gradients, AdamW state, activations).
Speed: one fresh process alternates a book step (calc_loss_batch, backward, AdamW) and a gptforge
step (`train_step` of the phases with `classification_loss`) on the same weights and batch, so a
shared, noisy machine slows both alike; last-block recipe, fp32; medians after one warm-up step.
"""

from __future__ import annotations

import argparse
import csv
import json
import gc
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

CFG = {"vocab_size": 50257, "context_length": 1024, "emb_dim": 768, "n_heads": 12, "n_layers": 12,
       "drop_rate": 0.0, "qkv_bias": True}
MODES = {"all": {"trainable": "all"}, "last-block": {"trainable": "last-block"},
         "lora": {"trainable": "lora", "lora_rank": 16, "lora_alpha": 16}}


def write_data(folder: Path, records: int, length: int) -> Path:
    """`records` messages of exactly `length` tokens (so every batch has the same shape)."""
    from gptforge.tokenizer import get_tokenizer

    tok, rng = get_tokenizer(), random.Random(0)
    words = "free prize call now win cash dinner tonight see you soon meeting park late thanks".split()
    path = folder / "train.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(records):
            ids = tok.encode(" ".join(rng.choice(words) for _ in range(length * 2)))[:length]
            writer.writerow([tok.decode(ids), "spam" if i % 2 else "ham"])
    return path


def step_times() -> list[tuple[float, float]]:
    """(time, peak RSS so far) after every optimizer step in this process, from a global post-step
    hook: the training's peak, before any final evaluation or checkpoint writing."""
    stamps: list[tuple[float, float]] = []
    register_optimizer_step_post_hook(lambda *a: stamps.append((time.perf_counter(), rss_mib())))
    return stamps


def summary(stamps: list[tuple[float, float]], baseline: float) -> dict:
    return {"peak_mib": stamps[-1][1], "baseline_mib": baseline}


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def rss_mib() -> float:
    """Peak resident memory since the last `start_measuring` (VmHWM)."""
    return _status_mib("VmHWM")


def start_measuring() -> float:
    """Reset the peak (Linux: clear_refs 5) with the model loaded; returns the resident memory now."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mib("VmRSS")


def ours(base: Path, data: Path, mode: str, args: argparse.Namespace) -> dict:
    from gptforge.finetune import finetune_classify

    import gptforge.finetune as finetune

    baseline, start_run = [], finetune.start_run

    def measured_start(*a, **kw):  # the model is loaded and prepared: measure from here
        baseline.append(start_measuring())
        return start_run(*a, **kw)

    finetune.start_run = measured_start
    stamps = step_times()
    with tempfile.TemporaryDirectory() as out:
        result = finetune_classify(data=str(data), model=str(base), out=out, epochs=1, batch_size=args.batch_size,
                                   eval_every=0, eval_batches=1, device="cpu", precision="fp32", progress=False,
                                   **MODES[mode])
    return {**summary(stamps, baseline[0]), "trainable": result.trainable_parameters}


def speed(base: Path, args: argparse.Namespace) -> dict:
    """Steps of the book's loop body (calc_loss_batch, backward, AdamW step) and of gptforge's
    phases (train_step with classification_loss), alternating in one process, so both see the same
    machine load; last-block recipe, fp32, the same weights and batch."""
    from llms_from_scratch.ch04 import GPTModel
    from llms_from_scratch.ch06 import calc_loss_batch

    from gptforge.checkpoint import load
    from gptforge.classifier import classification_loss, to_classifier
    from gptforge.train import start_run, train_step
    from gptforge.train_config import TrainConfig

    ours = load(base)
    book = GPTModel(CFG)
    book.load_state_dict(ours.state_dict(), strict=False)  # the causal masks stay the book's
    for model in (book, ours):
        model.requires_grad_(False)
    torch.manual_seed(123)
    book.out_head = torch.nn.Linear(CFG["emb_dim"], 2)
    torch.manual_seed(123)
    to_classifier(ours, ["ham", "spam"], pool="last")
    for model in (book, ours):
        model.trf_blocks[-1].requires_grad_(True)
        model.final_norm.requires_grad_(True)
        model.train()
    optimizer = torch.optim.AdamW(book.parameters(), lr=5e-5, weight_decay=0.1)
    x = torch.randint(0, CFG["vocab_size"], (args.batch_size, args.length))
    y = torch.randint(0, 2, (args.batch_size,))
    times: dict[str, list[float]] = {"book": [], "gptforge": []}
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(data="-", model="-", out=out, lr=5e-5, weight_decay=0.1, schedule="constant", decay="all",
                          beta2=0.999, grad_clip=0.0, precision="fp32", device="cpu", data_order="book",
                          progress=False, sample_tokens=0)
        run = start_run(cfg, ours, args.steps + 1)
        for _ in range(args.steps + 1):
            start = time.perf_counter()
            optimizer.zero_grad()
            calc_loss_batch(x, y, book, "cpu").backward()
            optimizer.step()
            times["book"].append(time.perf_counter() - start)
            start = time.perf_counter()
            train_step(run, [(x, y, torch.full((args.batch_size,), args.length))], classification_loss)
            run.step += 1
            times["gptforge"].append(time.perf_counter() - start)
    return {side: statistics.median(t[1:]) for side, t in times.items()}  # the first step warms up


def measure(side: str, workdir: Path, args: argparse.Namespace) -> dict:
    out = subprocess.run([sys.executable, __file__, "--side", side, "--workdir", str(workdir),
                          "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--length", str(args.length)],
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"the {side} measurement failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per measurement (>= 3)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=64, help="tokens per text")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # one measurement, in this fresh process
        workdir = Path(args.workdir)
        data = workdir / "train.csv"
        result = speed(workdir / "base", args) if args.side == "speed" else ours(workdir / "base", data, args.side, args)
        print(json.dumps(result))
        return 0
    from gptforge.checkpoint import save
    from gptforge.model import GPTModel

    from gptforge.cpu import cpu_summary

    print(f"{cpu_summary()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"model: the book's 124M shape, batch {args.batch_size} x {args.length} tokens, {args.steps} steps, fp32")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        torch.manual_seed(0)
        save(GPTModel(CFG), workdir / "base")
        write_data(workdir, args.steps * args.batch_size, args.length)
        results = {mode: measure(mode, workdir, args) for mode in MODES}
        step_s = measure("speed", workdir, args)
    print(f"{'':32}{'trainable':>14}{'peak RSS':>12}{'training adds':>15}")
    for name, r in results.items():
        print(f"{'gptforge --trainable ' + name:32}{r['trainable']:>14,}{r['peak_mib']:>8,.0f} MiB"
              f"{r['peak_mib'] - r['baseline_mib']:>11,.0f} MiB")
    tokens = args.batch_size * args.length
    print(f"speed, last-block, fp32, steps alternating in one process (median of {args.steps}):")
    for side, seconds in step_s.items():
        print(f"  {side:10} {seconds:6.2f} s/step {tokens / seconds:8,.0f} tokens/s")
    print(f"tokens/s ratio gptforge / book: {step_s['book'] / step_s['gptforge']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
