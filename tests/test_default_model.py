"""The built-in default model: shipped in the package, small, trained (its loss on held-out
Shakespeare is far below an untrained model's), and what `gptforge generate` uses without --model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gptforge
from gptforge.checkpoint import builtin_model_path
from gptforge.cli import DEFAULT_MODEL
from gptforge.data import TokenWindows
from gptforge.tokenizer import get_tokenizer
from gptforge.train import evaluate

SRC = Path(__file__).resolve().parents[1] / "src"
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def test_default_model_is_shipped_small_and_loads():
    path = builtin_model_path(DEFAULT_MODEL)
    assert path is not None and path.is_relative_to(Path(gptforge.__file__).parent / "assets")
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size <= 25_000_000  # "at most 25 MB", read strictly
    model = gptforge.load(DEFAULT_MODEL)
    assert model.cfg.vocab_size == 50257 and model.cfg.tie_weights


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason=f"{SHAKESPEARE} is not available")
def test_default_model_is_trained_on_shakespeare():
    text = SHAKESPEARE.read_text(encoding="utf-8")
    held_out = text[int(0.9 * len(text)):][:20_000]  # the validation part of its training run
    tokens = np.array(get_tokenizer().encode(held_out), dtype=np.uint16)
    model = gptforge.load(DEFAULT_MODEL, dtype=torch.float32)
    windows = TokenWindows(tokens, model.cfg.context_length)
    loss = evaluate(model, windows, batch_size=8, num_batches=4)
    torch.manual_seed(0)
    untrained = evaluate(gptforge.GPTModel(model.cfg).eval(), windows, batch_size=8, num_batches=4)
    assert untrained > 10 and loss < 5.2, (loss, untrained)  # the run measured 4.86 over all of it


@pytest.mark.slow
def test_generate_without_model_uses_the_default():
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-m", "gptforge", "generate", "ROMEO:", "--max-new-tokens", "30"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ROMEO:")
    continuation = proc.stdout[len("ROMEO:"):]
    assert sum(c.isalpha() for c in continuation) >= 10, continuation  # words, not just newlines
