"""Reproduce the book's chapter-5 pretraining run with gptforge's own model, data and loop.

Build a Large Language Model (From Scratch), chapter 5: the 124M configuration with context 256,
trained on "The Verdict" (5,145 tokens) with seed 123, AdamW (lr 4e-4, weight decay 0.1 on every
parameter), batch 2, 10 epochs, a 90/10 character split, evaluating every 5 steps over 5 batches.
The book prints initial losses 10.98758 / 10.98111, then (train / val) step 0: 9.781 / 9.933,
step 5: 8.111 / 8.339, ... step 80: 0.541 / 6.393; this script checks every one it reaches.

    python examples/book_reproduction.py [--steps N] [--out runs/book]

It takes about 10 minutes on 2 idle CPU cores (about an hour on the busy shared machine). `tests/test_train_book.py` runs the first 6 steps.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from gptforge.data import TokenWindows, tokenize_corpus
from gptforge.train import TrainConfig, evaluate, model_from_spec, train

VERDICT = Path(__file__).resolve().parents[2] / "shared" / "data" / "the-verdict.txt"

# The book's printed figures (llms-from-scratch reproduces them exactly on this CPU).
BOOK_INITIAL = (10.98758, 10.98111)
BOOK_LOSSES = {0: (9.781, 9.933), 5: (8.111, 8.339), 10: (6.661, 7.048), 15: (5.961, 6.616),
               80: (0.541, 6.393)}


def book_config(out: str | Path, data: str | Path = VERDICT, max_steps: int | None = None,
                sample_tokens: int = 50) -> TrainConfig:
    """The book's chapter-5 settings, spelled as gptforge training options."""
    return TrainConfig(
        data=str(data), out=str(out), model="book-124m", model_overrides={"context_length": 256},
        seed=123, epochs=10, max_steps=max_steps, batch_size=2, val_fraction=0.1,
        lr=4e-4, schedule="constant", warmup_steps=0, weight_decay=0.1, decay="all",
        beta1=0.9, beta2=0.999, grad_clip=0.0, eval_every=5, eval_batches=5,
        sample_prompt="Every effort moves you", sample_tokens=sample_tokens,
        checkpoint_every=0, precision="fp32", data_order="book", device="cpu", progress=False,
    )


def initial_losses(cfg: TrainConfig) -> tuple[float, float]:
    """The book's losses of the untrained model over all train and validation batches."""
    corpus = tokenize_corpus(cfg.data, Path(cfg.out) / "data", val_fraction=cfg.val_fraction)
    torch.manual_seed(cfg.seed)
    model = model_from_spec(cfg.model, cfg.model_overrides).eval()
    ctx = model.cfg.context_length
    train_windows, val_windows = TokenWindows(corpus.train(), ctx), TokenWindows(corpus.val(), ctx)
    return (evaluate(model, train_windows, cfg.batch_size, drop_last=True),
            evaluate(model, val_windows, cfg.batch_size))


def eval_losses(out: str | Path) -> dict[int, tuple[float, float]]:
    """(train, val) loss of each evaluation in a run's metrics log, by step."""
    records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["train_loss"], r["val_loss"]) for r in records if r["kind"] == "eval"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps (default: all 90)")
    parser.add_argument("--out", default="runs/book-reproduction")
    args = parser.parse_args()
    if not VERDICT.exists():
        print(f"{VERDICT} not found", file=sys.stderr)
        return 2
    cfg = book_config(args.out, max_steps=args.steps)
    train_loss, val_loss = initial_losses(cfg)
    print(f"initial losses: train {train_loss:.5f}, val {val_loss:.5f} (book: {BOOK_INITIAL[0]}, {BOOK_INITIAL[1]})")
    ok = round(train_loss, 5) == BOOK_INITIAL[0] and round(val_loss, 5) == BOOK_INITIAL[1]
    train(cfg)
    for step, (tr, va) in eval_losses(args.out).items():
        book = BOOK_LOSSES.get(step)
        match = ""
        if book is not None:
            same = (round(tr, 3), round(va, 3)) == book
            ok &= same
            match = f"   book {book[0]:.3f} / {book[1]:.3f}: {'match' if same else 'MISMATCH'}"
        print(f"step {step:3d}: train {tr:.3f}, val {va:.3f}{match}")
    print("all checked figures match the book" if ok else "SOME FIGURES DIFFER FROM THE BOOK")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
