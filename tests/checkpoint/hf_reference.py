"""A tiny random GPT-2 saved by transformers itself: the reference Hugging Face directory that the
checkpoint tests load, break and convert (built here, never downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


def save_reference_hf(out_dir: Path) -> Path:
    """`transformers.GPT2LMHeadModel(vocab 50257, context 32, width 32, 2 layers, 2 heads)`, seed 0,
    saved with `save_pretrained` into `out_dir`."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=50257, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    ref.save_pretrained(out_dir)
    return out_dir


def edit_json(path: Path, **changes) -> None:
    """Overwrite some keys of a JSON object file (to break a config on purpose)."""
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
