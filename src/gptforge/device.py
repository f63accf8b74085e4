"""Device names (`--device`, `device=`) checked against this machine, and its memory."""

from __future__ import annotations

import os

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


def device_memory(device: torch.device | str | None) -> int | None:
    """Bytes of memory on `device` (None: the CPU, whose memory is the machine's RAM), or None
    where unknown."""
    device = torch.device("cpu" if device is None else device)
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
        if device.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError, RuntimeError):
        pass
    return None


def check_fits(nbytes: int, device: torch.device | str | None, what: str, hint: str) -> None:
    """Refuse an allocation of `nbytes` that could never fit in `device`'s memory (`what` needs it;
    `hint` says what to lower) before it is tried: on Linux a huge CPU allocation may succeed
    lazily and the process be killed later, without a word, when the memory is touched."""
    memory = device_memory(device)
    if memory is not None and nbytes > memory:
        raise GptforgeError(f"{what} needs {nbytes / 2**30:,.1f} GiB, more than the {memory / 2**30:,.0f} GiB of "
                            f"memory here; {hint}")
