"""Classification finetuning of the 124M model: peak memory of full, last-block and LoRA finetuning
with `gptforge finetune classify`, and tokens/s of gptforge's loop against the book's
`train_classifier_simple` (llms-from-scratch ch06) in the same run, as a ratio.

    python benchmarks/bench_finetune.py [--steps 6] [--batch-size 8] [--length 64]

The model is the book's GPT_CONFIG_124M shape (random weights, saved once as a gptforge checkpoint:
LoRA needs a saved base). Data: short synthetic messages padded to --length tokens. Each
measurement runs in a fresh process (peak RSS is per process; gptforge's allocator setting is
process-wide). Memory: with the model loaded and prepared, the resident memory then, and the
peak (VmHWM, reset at that point) up to the last optimizer step: the growth is what training adds
(gradients, AdamW state, activations). Speed: the median time between optimizer steps
(from the second step on; no evaluation inside), both in fp32, last-block mode (the book's recipe).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import random
import gc
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
    times = [t for t, _ in stamps]
    return {"peak_mib": stamps[-1][1], "baseline_mib": baseline,
            "step_s": statistics.median(b - a for a, b in zip(times[1:], times[2:]))}


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


def book(base: Path, data: Path, args: argparse.Namespace) -> dict:
    from llms_from_scratch.ch04 import GPTModel
    from llms_from_scratch.ch06 import SpamDataset, train_classifier_simple

    from gptforge.checkpoint import load
    from gptforge.tokenizer import gpt2_encoding

    model = GPTModel(CFG)
    model.load_state_dict(load(base).state_dict(), strict=False)  # the causal masks stay the book's
    with open(data) as f:  # the book's SpamDataset reads columns Text and Label (0/1)
        rows = list(csv.DictReader(f))
    book_csv = data.with_name("book.csv")
    with open(book_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Text", "Label"])
        writer.writerows([r["text"], int(r["label"] == "spam")] for r in rows)
    dataset = SpamDataset(book_csv, gpt2_encoding())
    torch.manual_seed(123)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True)
    for p in model.parameters():
        p.requires_grad = False
    model.out_head = torch.nn.Linear(768, 2)
    for p in list(model.trf_blocks[-1].parameters()) + list(model.final_norm.parameters()):
        p.requires_grad = True
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)
    baseline = start_measuring()
    stamps = step_times()
    train_classifier_simple(model, loader, loader, optimizer, "cpu", 1, 10**9, 1)
    return summary(stamps, baseline)


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
        result = book(workdir / "base", data, args) if args.side == "book" else ours(workdir / "base", data, args.side, args)
        print(json.dumps(result))
        return 0
    from gptforge.checkpoint import save
    from gptforge.model import GPTModel

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    print(f"CPU: {cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"model: the book's 124M shape, batch {args.batch_size} x {args.length} tokens, {args.steps} steps, fp32")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        torch.manual_seed(0)
        save(GPTModel(CFG), workdir / "base")
        write_data(workdir, args.steps * args.batch_size, args.length)
        results = {mode: measure(mode, workdir, args) for mode in MODES}
        results["book"] = measure("book", workdir, args)
    tokens = args.batch_size * args.length
    print(f"{'':32}{'trainable':>14}{'peak RSS':>12}{'training adds':>15}{'tokens/s':>10}")
    for name, r in results.items():
        label = "book train_classifier_simple" if name == "book" else f"gptforge --trainable {name}"
        trainable = f"{r['trainable']:,}" if "trainable" in r else "(last-block)"
        print(f"{label:32}{trainable:>14}{r['peak_mib']:>8,.0f} MiB{r['peak_mib'] - r['baseline_mib']:>11,.0f} MiB"
              f"{tokens / r['step_s']:>10,.0f}")
    ratio = results["book"]["step_s"] / results["last-block"]["step_s"]
    print(f"tokens/s ratio, gptforge last-block / book (same recipe, fp32): {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
