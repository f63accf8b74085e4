"""Turning a model name into a model: presets (random initialisation) for now; checkpoints and hub
ids come with the weights issue."""

from __future__ import annotations

from pathlib import Path

import torch

from .config import PRESETS, preset
from .model import GPTModel


def load(name_or_path: str | Path, *, device: str | torch.device = "cpu",
         dtype: torch.dtype | None = None) -> GPTModel:
    """A model, in eval mode, from a preset name (randomly initialised with the current torch
    seed: call `torch.manual_seed` first for a repeatable model)."""
    name = str(name_or_path)
    if name.lower() in PRESETS:
        model = GPTModel(preset(name))
    elif Path(name).exists():
        raise ValueError(f"{name}: loading checkpoints is not supported yet")
    else:
        raise FileNotFoundError(
            f"no preset or file named {name!r}; presets are {', '.join(PRESETS)}"
        )
    model.to(device=device, dtype=dtype)
    return model.eval()
