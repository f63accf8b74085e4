"""What this CPU is and can do: its feature flags (read once) and a one-line summary that every
benchmark prints beside its figures."""

from __future__ import annotations

import functools
import platform

import torch

# CPU flags (Linux /proc/cpuinfo names) meaning bf16 matmuls run in hardware; without them PyTorch
# emulates bf16 and a bf16 prefill ran 5.5x slower than float32 (measured on an AVX2-only EPYC).
BF16_HARDWARE_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX512-BF16, Intel AMX, ARMv8.6 BF16
SHOWN_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile",
               "amx_bf16", "amx_int8", "asimd", "sve", "bf16", "i8mm")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as Linux's /proc/cpuinfo names them (empty where it is unreadable)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def has_bf16_hardware(flags: frozenset[str]) -> bool:
    """Whether a CPU with these feature flags runs bf16 matmuls in hardware (BF16_HARDWARE_FLAGS)."""
    return any(flag in flags for flag in BF16_HARDWARE_FLAGS)


def cpu_name() -> str:
    """The CPU's model name ('AMD EPYC', ...), or the machine type where it is unreadable."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_summary() -> str:
    """One line naming this CPU, PyTorch's kernel level, gptforge's decode kernels and the flags
    the per-CPU choices read."""
    from . import kernels  # the kernels read the flags above

    flags = " ".join(flag for flag in SHOWN_FLAGS if flag in cpu_flags()) or "none of " + " ".join(SHOWN_FLAGS)
    return (f"CPU: {cpu_name()}; torch kernels: {torch.backends.cpu.get_cpu_capability()}; "
            f"gptforge kernels: {kernels.describe()}; flags: {flags}")
