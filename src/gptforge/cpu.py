"""What this CPU is and can do: its feature flags (read once) and a one-line summary that every
benchmark prints beside its figures."""

from __future__ import annotations

import functools
import platform
import subprocess
import sys

import torch

# CPU flags (Linux /proc/cpuinfo names) meaning bf16 matmuls run in hardware; without them PyTorch
# emulates bf16 and a bf16 prefill ran 5.5x slower than float32 (measured on an AVX2-only EPYC).
BF16_HARDWARE_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX512-BF16, Intel AMX, ARMv8.6 BF16
SHOWN_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile",
               "amx_bf16", "amx_int8", "asimd", "sve", "bf16", "i8mm")


# macOS's `sysctl` names -> Linux's: Intel Macs list machdep.cpu.(leaf7_)features words, Apple
# silicon has hw.optional.* keys set to 1.
_SYSCTL_WORDS = {"AVX2": "avx2", "FMA": "fma", "F16C": "f16c", "AVX512F": "avx512f", "AVX512BW": "avx512bw",
                 "AVX512VNNI": "avx512_vnni", "AVX512BF16": "avx512_bf16"}
_SYSCTL_KEYS = {"hw.optional.AdvSIMD": "asimd", "hw.optional.neon": "asimd", "hw.optional.arm.FEAT_DotProd": "asimddp",
                "hw.optional.arm.FEAT_BF16": "bf16", "hw.optional.arm.FEAT_I8MM": "i8mm",
                "hw.optional.arm.FEAT_SVE": "sve"}


def sysctl_flags(text: str) -> frozenset[str]:
    """The feature flags, in /proc/cpuinfo's names, that `sysctl -a` output `text` (macOS) shows."""
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in ("machdep.cpu.features", "machdep.cpu.leaf7_features"):
            flags.update(_SYSCTL_WORDS[word] for word in value.split() if word in _SYSCTL_WORDS)
        elif key in _SYSCTL_KEYS and value == "1":
            flags.add(_SYSCTL_KEYS[key])
    return frozenset(flags)


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as Linux's /proc/cpuinfo names them (on macOS from `sysctl`; empty
    where neither is readable)."""
    if sys.platform == "darwin":
        try:
            return sysctl_flags(subprocess.run(["sysctl", "-a"], capture_output=True, text=True, timeout=10).stdout)
        except (OSError, subprocess.SubprocessError):
            return frozenset()
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
    from .fast import kernels  # the kernels read the flags above

    flags = " ".join(flag for flag in SHOWN_FLAGS if flag in cpu_flags()) or "none of " + " ".join(SHOWN_FLAGS)
    return (f"CPU: {cpu_name()}; torch kernels: {torch.backends.cpu.get_cpu_capability()}; "
            f"gptforge kernels: {kernels.describe()}; flags: {flags}")
