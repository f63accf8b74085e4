"""The book's chapter-5 run, trained by gptforge's own loop: the first steps reach the losses the
book prints (its own code, llms-from-scratch, reproduces them exactly on this CPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _example():
    spec = importlib.util.spec_from_file_location("book_reproduction", ROOT / "examples" / "book_reproduction.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_book_initial_losses_and_first_steps(tmp_path, data_dir):
    example = _example()
    verdict = data_dir / "the-verdict.txt"
    cfg = example.book_config(tmp_path, data=verdict, max_steps=6, sample_tokens=0)
    train_loss, val_loss = example.initial_losses(cfg)
    assert (round(train_loss, 5), round(val_loss, 5)) == (10.98758, 10.98111)

    from gptforge.train import train

    result = train(cfg)
    assert result.steps == 6
    losses = example.eval_losses(tmp_path)
    for step in (0, 5):
        assert (round(losses[step][0], 3), round(losses[step][1], 3)) == example.BOOK_LOSSES[step], step
