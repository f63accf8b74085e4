"""Device names (`--device`, `device=`) checked against this machine."""

from __future__ import annotations

import torch

from .errors import GptforgeError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """A device name (`--device`) checked against this machine: `auto` picks CUDA (this process's
    GPU under torchrun), then MPS, then the CPU; an unknown or absent device is a ValueError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):  # meta, xpu...: nothing runs a model there
        raise GptforgeError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GptforgeError("--device cuda was asked for but CUDA is not available; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise GptforgeError("--device mps was asked for but MPS is not available; use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device
