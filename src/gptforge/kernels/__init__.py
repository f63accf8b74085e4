"""gptforge's own decode kernels, in C, compiled once per CPU: the matrix products of a decode step
(a few rows) for float32, int8 and 4-bit weights (`gemv.c`), and a whole TransformerBlock's decode
step in one call (`block.c`, used through `block.py`).

Why: at a few rows a matrix product is memory-bound, and PyTorch's CPU kernels for it read the
weights at about half the memory bandwidth (and its int8/int4 ones convert every weight to float),
so decoding ran at about half of llama.cpp's speed (issue 14). `gemv.c` streams each weight once
per call with prefetching, and multiplies int8 and 4-bit weights with integer instructions (AVX2,
AVX-512, VNNI) against activations quantized as llama.cpp's Q8_0.

How: the first use compiles the C files with the system C compiler (`$CC`, else `cc`) and
`-march=native`, so they use the widest vectors this CPU has, into
`$GPTFORGE_CACHE` (default `~/.cache/gptforge`)/kernels/, keyed by the sources, the flags and the
CPU's features (~3 s on 2 cores; later processes only load it). Where that cannot be done
(no compiler, a CPU without AVX2 and FMA, `GPTFORGE_KERNELS=torch`), `library()` is None and the
callers use PyTorch's kernels: same results up to rounding (and, for int8/4-bit, the activation
quantization), slower.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from ..cpu import cpu_flags

HERE = Path(__file__).parent
SOURCES = (HERE / "gemv.c", HERE / "block.c")
HEADERS = (HERE / "gemv.h", HERE / "simd.h")
# -march: the CPU at hand by default; GPTFORGE_MARCH=haswell builds the AVX2 kernels on an AVX-512
# machine (how the tests check that path here).
CFLAGS = ("-O3", f"-march={os.environ.get('GPTFORGE_MARCH', 'native')}", "-fopenmp", "-shared", "-fPIC")
FORMATS = {"f32": 0, "i8": 1, "q4": 2}  # gemv.h's enum format
MAX_ROWS = 16  # products of up to this many rows (a decode step of a batch) run here; more (a prefill) on PyTorch's
_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "gf_linear": [_P, _P, _I64, _P, ctypes.c_int],  # layer, x, M, y, threads (gemv.h)
    "gf_block_decode": [_P, _P, _I64, _P, _P, _I64, _I64, _I64, _P, ctypes.c_int],  # see block.c
    "gf_dequantize": [_P, _I64, _P, ctypes.c_int, ctypes.c_int],  # layer, k_out, out, bf16, threads
}


class Linear(ctypes.Structure):
    """gemv.h's gf_lin: one layer's weights as the C kernels read them."""

    _fields_ = [("fmt", ctypes.c_int64), ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("w", ctypes.c_void_p),
                ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p)]


_STATUS = ["not loaded"]  # what describe() says


def cache_dir() -> Path:
    """Where compiled kernels are kept: $GPTFORGE_CACHE/kernels, else ~/.cache/gptforge/kernels."""
    root = os.environ.get("GPTFORGE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gptforge"
    return Path(root) / "kernels"


class _NoCompiler(Exception):
    pass


def _build() -> Path:
    """The compiled library for this source and CPU (compiled now if not cached)."""
    key = hashlib.sha256(b"\0".join([*(f.read_bytes() for f in SOURCES + HEADERS), " ".join(CFLAGS).encode(),
                                     " ".join(sorted(cpu_flags())).encode()])).hexdigest()[:16]
    try:
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: a private folder for this process
        folder = Path(tempfile.mkdtemp(prefix="gptforge-kernels-"))
    target = folder / f"gemv-{key}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise _NoCompiler("no C compiler (cc, gcc, clang or $CC)")
    print(f"gptforge: compiling the decode kernels for this CPU, once (into {folder})", file=sys.stderr, flush=True)
    fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=folder)  # compile aside, then rename: atomic
    os.close(fd)
    try:
        subprocess.run([compiler, *CFLAGS, "-o", tmp, *map(str, SOURCES), "-lm"], check=True,
                       capture_output=True, text=True, timeout=120)
        os.replace(tmp, target)
    except FileNotFoundError:
        raise _NoCompiler(f"no C compiler at {compiler}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None where they cannot be used here (see the module docstring)."""
    if os.environ.get("GPTFORGE_KERNELS", "auto").lower() in ("torch", "off", "0", "none"):
        _STATUS[0] = "off (GPTFORGE_KERNELS=torch)"
        return None
    if not {"avx2", "fma"} <= cpu_flags():
        _STATUS[0] = "not for this CPU (needs AVX2 and FMA)"
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.SubprocessError, _NoCompiler) as err:
        detail = (getattr(err, "stderr", None) or str(err)).strip()[-500:]
        _STATUS[0] = "unavailable (no C compiler)" if isinstance(err, _NoCompiler) else "unavailable (build failed)"
        warnings.warn(f"gptforge: could not build the fast decode kernels ({detail}); using PyTorch's, "
                      "about half as fast at decoding", RuntimeWarning, stacklevel=2)
        return None
    for name, argtypes in _SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = None
    _STATUS[0] = f"AVX{'-512' if lib.gf_vector_bits() == 512 else '2'}{' VNNI' if lib.gf_vnni() else ''}"
    return lib


def available() -> bool:
    return library() is not None


def describe() -> str:
    """'AVX-512 VNNI', 'AVX2', or why the kernels are not used ('off (GPTFORGE_KERNELS=torch)', ...)."""
    library()
    return _STATUS[0]


def vector_floats() -> int:
    """Floats per vector of the compiled kernels (16 with AVX-512, 8 with AVX2; 0 without them)."""
    lib = library()
    return 0 if lib is None else lib.gf_vector_bits() // 32


def supported(fmt: str, in_features: int) -> bool:
    """Whether `fmt` ('f32', 'i8', 'q4') products with `in_features` inputs run here; the kernels
    read whole vectors: 16 (AVX2: 8) floats, 64 (32) int8 values or 128 (64) 4-bit values."""
    floats = vector_floats()
    return floats > 0 and in_features % {"f32": floats, "i8": 4 * floats, "q4": 8 * floats}[fmt] == 0


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def layer(fmt: str, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None) -> Linear:
    """The C description of weights in `fmt` (see `linear`); the tensors must outlive it."""
    k = weight.shape[1] * (2 if fmt == "q4" else 1)  # 4-bit: two weights a byte
    return Linear(FORMATS[fmt], weight.shape[0], k, _ptr(weight), _ptr(scale), _ptr(bias))


def call(name: str, *args) -> None:
    """The C function `name` on `args`, named `gptforge::name` in torch.profiler's tables when it runs."""
    function = getattr(library(), name)
    if torch.autograd.profiler._is_profiler_enabled:
        with torch.profiler.record_function(f"gptforge::{name.removeprefix('gf_')}"):
            function(*args)
    else:
        function(*args)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fmt: str = "f32",
           scale: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) float32 @ W^T + bias -> (M, N) float32, for W (N, K) float32 (`fmt` 'f32'), int8
    with `scale` (N,) float32 ('i8'), or 4-bit: (N, K / 2) uint8 with `scale` (N, K / 32) float32
    ('q4', gemv.c's layout). Only call where `supported(fmt, K)`; no autograd."""
    x = x.contiguous()
    spec = layer(fmt, weight, scale, bias)
    y = torch.empty(x.shape[0], spec.n, dtype=torch.float32)
    call("gf_linear", ctypes.byref(spec), x.data_ptr(), x.shape[0], y.data_ptr(), torch.get_num_threads())
    return y


def dequantize(fmt: str, weight: torch.Tensor, scale: torch.Tensor, in_features: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int8 ('i8') or 4-bit ('q4') weights as (N, in_features) float32 or bfloat16 (what a prefill
    multiplies with), converted in C: ~10x faster than the same in PyTorch operators."""
    out = torch.empty(weight.shape[0], in_features, dtype=dtype)
    call("gf_dequantize", ctypes.byref(layer(fmt, weight, scale, None)), in_features, out.data_ptr(),
         dtype == torch.bfloat16, torch.get_num_threads())
    return out
