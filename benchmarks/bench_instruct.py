"""Instruction finetuning speed and memory: `gptforge finetune instruct` against the book's chapter-7
loop (llms-from-scratch: InstructionDataset, custom_collate_fn, train_model_simple) on the same model
shape and records, in one run. Prints tokens/s (input tokens, as the book's `tokens_seen` counts
them) and peak resident memory of each, and the ratios.

    python benchmarks/bench_instruct.py [--steps 8] [--batch-size 8] [--lora-rank 0]

Model: 6 layers, 384 dim, 6 heads, context 256, GPT-2 vocabulary, random weights (the same for
both); records: examples/instruct-sample.json repeated. The book's loop runs as published (fp32,
AdamW over every parameter, F.cross_entropy on the full logits); gptforge runs the same recipe on
the training phases with its defaults (fp32 here, for the same arithmetic: the fused output-head
loss that never keeps the logits, scaled_dot_product_attention, malloc keeping freed memory).
Each side runs in a fresh process, so peak memory is the process's own (ru_maxrss). Step times
exclude evaluation in both.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "instruct-sample.json"
CFG = {"vocab_size": 50257, "context_length": 256, "emb_dim": 384, "n_heads": 6, "n_layers": 6,
       "drop_rate": 0.0, "qkv_bias": False}
REPEAT = 8  # the 30 sample records, 8 times: 240 records, enough for 30 steps of 8


def records() -> list[dict]:
    return json.loads(SAMPLE.read_text()) * REPEAT


def base_model(tmp: Path) -> Path:
    from gptforge import GPTModel, save

    torch.manual_seed(123)
    return save(GPTModel(CFG), tmp / "base")


def book_side(tmp: Path, steps: int, batch_size: int) -> float:
    """The book's cells, timed between optimizer steps (step 0 is warm-up)."""
    from functools import partial

    from llms_from_scratch import ch04, ch05, ch07

    from gptforge import load
    from gptforge.tokenizer import get_tokenizer

    enc = get_tokenizer().encoding
    model = ch04.GPTModel(CFG)
    model.load_state_dict(load(base_model(tmp)).state_dict(), strict=False)
    torch.manual_seed(123)
    data = ch07.InstructionDataset(records(), enc)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True,
                                         collate_fn=partial(ch07.custom_collate_fn, allowed_max_length=256))
    batches = [b for _, b in zip(range(steps + 2), loader)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)
    stamps, step = [], optimizer.step

    def timed_step(*args, **kwargs):
        out = step(*args, **kwargs)
        stamps.append(time.perf_counter())
        return out

    optimizer.step = timed_step
    ch05.train_model_simple(model, batches, batches[:1], optimizer, "cpu", num_epochs=1, eval_freq=10**9,
                            eval_iter=1, start_context="Hi", tokenizer=enc)
    tokens = [b[0].numel() for b in batches[2:]]  # from step 1 on: the evaluation after step 0 is left out
    return sum(tokens) / (stamps[-1] - stamps[1])


def gptforge_side(tmp: Path, steps: int, batch_size: int, lora_rank: int) -> float:
    from gptforge.finetune import finetune_instruct

    data = tmp / "train.json"
    data.write_text(json.dumps(records()[:(steps + 2) * batch_size]))  # one epoch of steps + 2 batches
    lora = {"lora_rank": lora_rank} if lora_rank else {}
    finetune_instruct(data=str(data), model=str(base_model(tmp)), out=str(tmp / "run"), batch_size=batch_size,
                      epochs=1, eval_every=0, max_length=256, progress=False, device="cpu",
                      **lora)
    rows = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    steps = [(b["tokens_seen"] - a["tokens_seen"], b["tokens_per_s"]) for a, b in zip(train, train[1:])][1:]
    return sum(t for t, _ in steps) / sum(t / rate for t, rate in steps)  # steps 2, 3, ... as the book's side


def run_side(side: str, args: argparse.Namespace) -> tuple[float, float]:
    """(tokens/s, peak RSS in MiB) of one side, measured in a fresh Python process."""
    out = subprocess.run([sys.executable, __file__, "--side", side, "--steps", str(args.steps),
                          "--batch-size", str(args.batch_size), "--lora-rank", str(args.lora_rank)],
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"the {side} measurement failed:\n{out.stderr[-3000:]}")
    rate, peak = out.stdout.strip().splitlines()[-1].split()
    return float(rate), float(peak)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps each (after 2 warm-up steps)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lora-rank", type=int, default=0, help="gptforge side with LoRA adapters of this rank")
    parser.add_argument("--side", choices=("gptforge", "book"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # one measurement, in this (fresh) process
        with tempfile.TemporaryDirectory() as tmp:
            if args.side == "book":
                rate = book_side(Path(tmp), args.steps, args.batch_size)
            else:
                rate = gptforge_side(Path(tmp), args.steps, args.batch_size, args.lora_rank)
        print(rate, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return 0
    from gptforge.cpu import cpu_summary

    print(f"{cpu_summary()}, {torch.get_num_threads()} torch threads; model {CFG}; batch {args.batch_size}, "
          f"{args.steps} timed steps; a shared machine: figures are noisy")
    book, book_mem = run_side("book", args)
    ours, our_mem = run_side("gptforge", args)
    lora = f" (LoRA rank {args.lora_rank})" if args.lora_rank else ""
    print(f"book train_model_simple + custom_collate_fn: {book:8,.0f} tokens/s, peak RSS {book_mem:7,.0f} MiB")
    print(f"gptforge finetune instruct{lora}:{' ' * (18 - len(lora))}{ours:8,.0f} tokens/s, peak RSS {our_mem:7,.0f} MiB")
    print(f"ratio gptforge / book: {ours / book:.2f}x tokens/s, {our_mem / book_mem:.2f}x peak memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
