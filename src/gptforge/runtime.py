"""Where a training run executes: the torchrun process group, bf16 autocast, RNG states, FSDP
sharding, the allocator setting for CPU runs, and the Ctrl-C/SIGTERM stop request.

Below `train`: it knows nothing of training configs or data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from . import checkpoint
from .device import resolve_device
from .errors import GptforgeError
from .io import ensure_dir, exclusive_lock


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 for `autocast` when asked for (or, with "auto", when the device computes it natively:
    CUDA with bf16 support, CPUs with AVX512-BF16 or AMX); None means full fp32."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
    elif device.type == "cpu":
        supported = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    else:
        supported = False
    if precision == "bf16" and device.type not in ("cuda", "cpu"):
        raise GptforgeError(f"bf16 autocast is not available on {device.type}; use --precision fp32")
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if supported else None


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the OS.

    A training step allocates and frees the same large tensors (logits, activations, gradients)
    every step. By default glibc serves each one with a fresh mmap and unmaps it when freed, so
    every step page-faults all of that memory in again: measured here, that costs ~30% of a CPU
    step (the same effect as running under jemalloc or tcmalloc, which PyTorch's CPU tuning guide
    recommends). This turns off mmap for large blocks and lets the heap keep what is freed. It
    changes the whole process, so it is only applied to CPU training runs; it returns False where
    it does not apply (not Linux/glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))




def autocast_context(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast in `dtype` on `device`, or nothing when dtype is None (full fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class StopRequest:
    """Turns Ctrl-C (SIGINT) and SIGTERM into a request to stop after the current step once the run
    can save one (`defer()`, called when the run is built); before that, while the data is
    tokenized or the model built, they stop at once (KeyboardInterrupt: what was being written is
    removed). A second Ctrl-C interrupts at once. Only the main thread can install signal handlers."""

    def __init__(self) -> None:
        self.requested = False
        self.deferring = False
        self._previous: dict[int, Any] = {}

    def defer(self) -> None:
        """From now on a stop waits for the end of the current step (the run then saves)."""
        self.deferring = True

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.deferring or (self.requested and signum == signal.SIGINT):
            raise KeyboardInterrupt
        self.requested = True
        print("\ngptforge: stopping after this step and saving a checkpoint (Ctrl-C again to abort)",
              file=sys.stderr, flush=True)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


RUN_LOCK_FILE = ".gptforge-run.lock"


@contextlib.contextmanager
def lock_run_folder(out: str | Path) -> Iterator[None]:
    """Hold the run folder `out` for one run (train, finetune, --resume): a second process given the
    same folder is refused at once, naming the holder; the lock goes with the process, however it
    ends (a killed run's never blocks). Created here if absent and removed again if the run leaves
    it empty (bad input found before any work). Under torchrun the rank-0 process holds it."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    out = Path(out)
    created = [p for p in (out, *out.parents) if not p.exists()]  # the deepest first
    ensure_dir(out)
    try:
        with exclusive_lock(out / RUN_LOCK_FILE, wait=False, what=f"the run folder {out}"):
            yield
    finally:
        with contextlib.suppress(OSError):
            for folder in created:
                folder.rmdir()  # only if empty


@dataclasses.dataclass
class DistContext:
    """This process's place in a torchrun group (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def init_distributed(device_name: str) -> DistContext:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    owns = not dist.is_initialized()
    if owns:
        device = resolve_device(device_name, local_rank)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistContext(rank, world_size, local_rank, owns)


def rng_state() -> dict[str, Any]:
    """This process's torch (and CUDA) RNG states, to save with a checkpoint."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])



def shard_args(dctx: DistContext) -> dict[str, int]:
    """`rank=`/`world_size=` for `train.evaluate`."""
    return {"rank": dctx.rank, "world_size": dctx.world_size}


def shard(model: nn.Module, raw_model: nn.Module, dctx: DistContext) -> nn.Module:
    """FSDP2: each transformer block is a unit, the embeddings/head the root (a tied head stays one
    tensor). Parameters, gradients and optimizer state are split across the ranks."""
    if dctx.world_size == 1:
        raise GptforgeError("--fsdp shards across processes: launch with torchrun --nproc-per-node N (N >= 2)")
    from torch.distributed.fsdp import fully_shard

    for block in raw_model.trf_blocks:
        fully_shard(block)
    fully_shard(raw_model)
    return model


def save_checkpoint(ckpt: Path, model: nn.Module, raw_model: nn.Module, optimizer: torch.optim.Optimizer,
                    dctx: DistContext, fsdp: bool, state: dict[str, Any],
                    write: Callable[..., Any] = checkpoint.save) -> None:
    """Save `raw_model` with a training state (`state`, the optimizer, every rank's RNG state).
    `write(model, dir, training_state=...)` writes them (default: checkpoint.save).
    Every rank calls this (RNG states and, with FSDP, shards are gathered); rank 0 writes."""
    rngs = [rng_state()]
    if dctx.world_size > 1:
        rngs = [None] * dctx.world_size
        dist.all_gather_object(rngs, rng_state())
        rngs = [{k: (v.cpu() if isinstance(v, torch.Tensor) else [t.cpu() for t in v]) for k, v in r.items()}
                for r in rngs]
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(model, options=options)
        optim_state = get_optimizer_state_dict(model, optimizer, options=options)
        if dctx.main:
            # rank 0 alone here: the caller checks every rank's shard for non-finite weights beforehand
            to_save = checkpoint.build_model(raw_model.cfg, model_state, "FSDP full state dict", check_finite=False)
    else:
        to_save, optim_state = raw_model, optimizer.state_dict()
    if dctx.main:
        write(to_save, ckpt, training_state={**state, "optimizer": optim_state, "rng": rngs})
    dctx.barrier()
