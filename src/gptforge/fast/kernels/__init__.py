"""gptforge's own decode kernels, in C, compiled once per CPU: the matrix products of a decode step
(a few rows) for float32, int8 and 4-bit weights (`gemv.c`), a whole TransformerBlock's decode
step in one call (`block.c`, used through `gptforge/fast/blocks.py`), greedy decoding's argmax (`argmax.c`), and
the transposes that lay Hugging Face's (in, out) weights out as rows (`transpose.c`).

Why: at a few rows a matrix product is memory-bound, and PyTorch's CPU kernels for it read the
weights at about half the memory bandwidth (and its int8/int4 ones convert every weight to float),
so decoding through them runs at about half of llama.cpp's speed. `gemv.c` streams each weight once
per call with prefetching, from weights stored in panels (`pack`) so that a batch's rows share
each load, and multiplies int8 and 4-bit weights with integer instructions (AVX2, AVX-512, VNNI)
against activations quantized as llama.cpp's Q8_0.

How: the first use compiles the C files with the system C compiler (`$CC`, else `cc`) and
`-march=native`, so they use the widest vectors this CPU has, into
`$GPTFORGE_CACHE` (default `~/.cache/gptforge`)/kernels/, keyed by the sources, the flags and the
CPU's features (~3 s on 2 cores; later processes only load it). Where that cannot be done
(no compiler, a CPU without AVX2, FMA and F16C, `GPTFORGE_KERNELS=torch`), `library()` is None and the
callers use PyTorch's kernels: same results up to rounding (and, for int8/4-bit, the activation
quantization), slower.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import warnings
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ...cpu import cpu_flags
from .abi import RETURNS_INT, SIGNATURES, Linear, mismatch

HERE = Path(__file__).parent
SOURCES = (HERE / "gemv.c", HERE / "block.c", HERE / "argmax.c", HERE / "transpose.c")
HEADERS = (HERE / "gemv.h", HERE / "simd.h", HERE / "abi.py")  # abi.py: a new layout, a new build
# -march: the CPU at hand by default; GPTFORGE_MARCH=haswell builds the AVX2 kernels on an AVX-512
# machine (how the tests check that path here).
CFLAGS = ("-O3", f"-march={os.environ.get('GPTFORGE_MARCH', 'native')}", "-shared", "-fPIC")
FORMATS = {"f32": 0, "i8": 1, "q4": 2, "bf16": 3}  # gemv.h's enum format
# A decode step of up to this many rows (a batch) runs here; products of more (a prefill) where
# fast.policy.choose_mode's kernel_rows says: here too up to a bound, or at any length.
MAX_ROWS = 16
BLOCK_PARTS = ("products", "attention", "rest")  # block.c's timed parts of a block's decode step


@dataclasses.dataclass
class _State:
    """This module's state, in one place."""

    status: str = "not loaded"  # what describe() says
    linear_seconds: float | None = None  # gf_linear's time while `profile` is on, else None


_state = _State()


def cache_dir() -> Path:
    """Where compiled kernels are kept: $GPTFORGE_CACHE/kernels, else ~/.cache/gptforge/kernels."""
    root = os.environ.get("GPTFORGE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gptforge"
    return Path(root) / "kernels"


class _NoCompiler(Exception):
    pass


def openmp_variants() -> list[tuple[str, ...]]:
    """The ways to ask the C compiler for OpenMP, tried in turn: `-fopenmp` (GCC, LLVM clang); on
    macOS, Apple clang's `-Xpreprocessor -fopenmp` with libomp where found ($LIBOMP_PREFIX or
    Homebrew's); else none (the kernels then run on one thread: their `#pragma omp` are ignored)."""
    variants = [("-fopenmp",)]
    if sys.platform == "darwin":
        for prefix in (os.environ.get("LIBOMP_PREFIX"), "/opt/homebrew/opt/libomp", "/usr/local/opt/libomp"):
            if prefix and Path(prefix, "lib").is_dir():
                variants.append(("-Xpreprocessor", "-fopenmp", f"-I{prefix}/include", f"-L{prefix}/lib", "-lomp"))
                break
    return variants + [()]


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
    if shutil.which(compiler) is None:  # said before "compiling", which would not happen
        raise _NoCompiler(f"no C compiler at {compiler} ($CC)" if os.environ.get("CC") else f"no C compiler at {compiler}")
    print(f"gptforge: compiling the decode kernels for this CPU, once (into {folder})", file=sys.stderr, flush=True)
    fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=folder)  # compile aside, then rename: atomic
    os.close(fd)
    try:
        for openmp in openmp_variants():
            try:
                subprocess.run([compiler, *CFLAGS, *openmp, "-o", tmp, *map(str, SOURCES), "-lm"], check=True,
                               capture_output=True, text=True, timeout=600)
                break
            except subprocess.CalledProcessError:
                if not openmp:  # not an OpenMP problem: the build itself failed
                    raise
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
        _state.status = "off (GPTFORGE_KERNELS=torch)"
        return None
    if not {"avx2", "fma", "f16c"} <= cpu_flags():
        _state.status = "not for this CPU (needs AVX2, FMA and F16C)"
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.SubprocessError, _NoCompiler) as err:
        detail = (getattr(err, "stderr", None) or str(err)).strip()[-500:]
        _state.status = "unavailable (no C compiler)" if isinstance(err, _NoCompiler) else "unavailable (build failed)"
        detail = " ".join(detail.split())  # a compiler's error, on the one line
        print(f"gptforge: warning: could not build the fast decode kernels ({detail}); using PyTorch's, "
              "about half as fast at decoding", file=sys.stderr, flush=True)
        return None
    for name, argtypes in SIGNATURES.items():
        if hasattr(lib, name):
            getattr(lib, name).argtypes = argtypes
            getattr(lib, name).restype = ctypes.c_int if name in RETURNS_INT else None
    wrong = mismatch(lib)
    if wrong is not None:  # the ctypes mirrors and the C structs differ: C would read the wrong bytes
        _state.status = "unavailable (C structs differ from gptforge/fast/kernels/abi.py)"
        warnings.warn(f"gptforge: the compiled decode kernels do not match their Python declarations ({wrong}); "
                      "using PyTorch's, about half as fast at decoding", RuntimeWarning, stacklevel=2)
        return None
    _state.status = (f"AVX{'-512' if lib.gf_vector_bits() == 512 else '2'}{' VNNI' if lib.gf_vnni() else ''}"
                  f"{'' if lib.gf_openmp() else ' (no OpenMP: one thread)'}")
    return lib


def available() -> bool:
    return library() is not None


def describe() -> str:
    """'AVX-512 VNNI', 'AVX2', or why the kernels are not used ('off (GPTFORGE_KERNELS=torch)', ...)."""
    library()
    return _state.status


def vector_floats() -> int:
    """Floats per vector of the compiled kernels (16 with AVX-512, 8 with AVX2; 0 without them)."""
    lib = library()
    return 0 if lib is None else lib.gf_vector_bits() // 32


def supported(fmt: str, in_features: int) -> bool:
    """Whether `fmt` ('f32', 'bf16', 'i8', 'q4') products with `in_features` inputs run here: float32
    and bfloat16 read whole vectors (16 values with AVX-512, 8 with AVX2), int8 and 4-bit whole
    Q8_0 blocks of 32."""
    floats = vector_floats()
    return floats > 0 and in_features % (floats if fmt in ("f32", "bf16") else 32) == 0


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def pack(fmt: str, weight: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weights (N, K) in the panel order gemv.c's kernels read (its header says which), and the
    4-bit scales likewise; `unpack` undoes it. float32 / bfloat16: `weight` in that dtype; int8: `weight` int8
    (`scale` (N,) is used as it is); 4-bit: `weight` the codes q in [0, 15] (uint8), `scale` (N, K / 32)."""
    vl = vector_floats()
    n, k = weight.shape
    rows = F.pad(weight, (0, 0, 0, -n % vl), value=8 if fmt == "q4" else 0)  # whole panels; 4-bit 8 is 0
    p = rows.shape[0] // vl
    if fmt in ("f32", "bf16"):
        return rows.view(p, vl, k).transpose(1, 2).contiguous(), None  # (P, K, VL)
    if fmt == "i8":
        return rows.view(p, vl, k // 4, 4).permute(0, 2, 1, 3).contiguous(), scale  # (P, K / 4, VL, 4)
    q = rows.view(p, vl, k // 32, 4, 2, 4).permute(0, 2, 3, 1, 5, 4)  # k = 32 g + 8 t + 4 h + j -> g, t, c, j, h
    packed = (q[..., 0] | (q[..., 1] << 4)).contiguous()  # (P, K / 32, 4, VL, 4)
    return packed, F.pad(scale, (0, 0, 0, -n % vl)).view(p, vl, k // 32).transpose(1, 2).contiguous()


def quantize(fmt: str, weight: torch.Tensor, k_padded: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`pack(fmt, *q)` of fast/linears.py's PyTorch quantization q of `weight` (N, K) float32 zero-padded
    to `k_padded` inputs ('i8': per-row int8 and its (N,) scales; 'q4': Q4_0; 'bf16': rounded to
    bfloat16, no scales: None), the same bytes,
    quantized in C straight into the panels, reading `weight` with any strides (making GPT-2 124M's
    int8 or int4 layers took 1.1-1.3 s of PyTorch operators on two threads, now 0.24-0.38 s)."""
    n, k = weight.shape
    vl, groups = vector_floats(), k_padded // (4 if fmt == "i8" else 32)
    panels = -(-n // vl)
    if fmt == "bf16":
        out, scale = torch.empty(panels, k_padded, vl, dtype=torch.bfloat16), torch.empty(0)
    elif fmt == "i8":
        out, scale = torch.empty(panels, groups, vl, 4, dtype=torch.int8), torch.empty(n)
    else:
        out, scale = torch.empty(panels, groups, 4, vl, 4, dtype=torch.uint8), torch.empty(panels, groups, vl)
    weight = weight.detach().float()  # any strides: a Hugging Face weight is a transposed view
    call("gf_quantize", FORMATS[fmt], weight.data_ptr(), *weight.stride(), n, k, k_padded, out.data_ptr(),
         scale.data_ptr(), torch.get_num_threads())
    return out, None if fmt == "bf16" else scale


def unpack(fmt: str, weight: torch.Tensor, scale: torch.Tensor | None, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`pack`'s inverse: the (n, K) weights (4-bit: the codes) and scales from panels."""
    p, vl = weight.shape[0], vector_floats()
    if fmt in ("f32", "bf16"):
        return weight.transpose(1, 2).reshape(p * vl, -1)[:n], None
    if fmt == "i8":
        return weight.permute(0, 2, 1, 3).reshape(p * vl, -1)[:n], scale
    q = torch.stack([weight & 15, weight >> 4], dim=-1)  # (P, K / 32, 4, VL, 4, 2): g, t, c, j, h
    codes = q.permute(0, 3, 1, 2, 5, 4).reshape(p * vl, -1)[:n]
    return codes, scale.transpose(1, 2).reshape(p * vl, -1)[:n]


def layer(fmt: str, n: int, k: int, weight: torch.Tensor, scale: torch.Tensor | None = None,
          bias: torch.Tensor | None = None, panels: torch.Tensor | None = None) -> Linear:
    """The C description of an (n, k) layer in `fmt` (gemv.c): float32 `weight` row-major (and
    its `panels`, made by `pack`, for products of several rows) or, where `reads_in_place(weight)`,
    a transposed view read as it is; int8 and 4-bit in panels. The tensors must outlive it."""
    if fmt == "f32" and not weight.is_contiguous():
        return Linear(FORMATS[fmt], n, k, None, _ptr(weight), None, _ptr(bias), weight.stride(1))
    return Linear(FORMATS[fmt], n, k, _ptr(weight), _ptr(panels), _ptr(scale), _ptr(bias), 0)


def reads_in_place(weight: torch.Tensor) -> bool:
    """Whether the kernels read the float32 (n, k) `weight` as it is stored: row-major, or the
    transpose of a row-major (k, ld) matrix's first n columns, n a whole number of vectors (a
    Hugging Face Conv1D weight (in, out) read as (out, in), or a third of its fused c_attn), which
    gemv.c's f32_cols_product reads where it is. Else it has to be laid out anew."""
    n, k = weight.shape
    return weight.dtype == torch.float32 and weight.device.type == "cpu" and supported("f32", k) and (
        weight.is_contiguous() or weight.stride(0) == 1 and weight.stride(1) >= n and n % vector_floats() == 0)


def call(name: str, *args) -> int | None:
    """The C function `name` on `args` (and what it returns), named `gptforge::name` in
    torch.profiler's tables when it runs. A MemoryError where the C code could not allocate its
    working memory (its output is then incomplete)."""
    lib = library()
    function = getattr(lib, name)
    if torch.autograd.profiler._is_profiler_enabled:
        with torch.profiler.record_function(f"gptforge::{name.removeprefix('gf_')}"):
            result = function(*args)
    elif _state.linear_seconds is not None and name == "gf_linear":
        start = time.perf_counter()
        result = function(*args)
        _state.linear_seconds += time.perf_counter() - start
    else:
        result = function(*args)
    if lib.gf_failed():
        raise MemoryError(f"gptforge's C kernels could not allocate working memory in {name}")
    return result


def linear(x: torch.Tensor, spec: Linear) -> torch.Tensor:
    """x (M, K) float32 @ W^T + bias -> (M, N) float32 for the layer `spec` (see `layer`), any M
    (64 rows at a time). Only call where `supported(fmt, K)`; no autograd."""
    x = x.contiguous()
    y = torch.empty(x.shape[0], spec.n, dtype=torch.float32)
    call("gf_linear", ctypes.byref(spec), x.data_ptr(), x.shape[0], y.data_ptr(), torch.get_num_threads())
    return y


def argmax(logits: torch.Tensor, bitmask: torch.Tensor | None = None) -> torch.Tensor:
    """`logits.argmax(-1)` for (B, V) logits, the same index (the first maximum; a NaN, the first
    NaN), in C where it can run here (float32 on CPU, rows of unit stride): 6-7x faster than PyTorch's.
    bitmask: (B, ceil(V / 32)) int32, bit j of word w allowing token 32 w + j (`structured.new_bitmask`):
    the argmax over the allowed tokens only (0 for a row that allows none), without a masked copy."""
    if (library() is None or logits.dim() != 2 or logits.dtype != torch.float32 or logits.device.type != "cpu"
            or logits.stride(1) != 1 or torch.is_grad_enabled() and logits.requires_grad
            or bitmask is not None and (bitmask.dtype != torch.int32 or bitmask.stride(1) != 1
                                        or tuple(bitmask.shape) != (logits.shape[0], (logits.shape[1] + 31) // 32))):
        if bitmask is None:
            return logits.argmax(-1)
        from ...structured import apply_bitmask
        return apply_bitmask(logits.float(), bitmask).argmax(-1)
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    if bitmask is None:
        call("gf_argmax", logits.data_ptr(), logits.shape[0], logits.shape[1], logits.stride(0), out.data_ptr(),
             torch.get_num_threads())
    else:
        call("gf_argmax_masked", logits.data_ptr(), logits.shape[0], logits.shape[1], logits.stride(0),
             bitmask.data_ptr(), bitmask.stride(0), out.data_ptr(), torch.get_num_threads())
    return out


def row_major(parts: list[torch.Tensor]) -> torch.Tensor:
    """`torch.cat(parts)`: the (n_0 + n_1 + ..., k) matrices one below the other, contiguous. A
    part that is a transposed float32 view (a Hugging Face Conv1D weight (in, out), read as
    (out, in)) is turned in C on torch's threads where the kernels run here: 6.5 GB/s on one
    thread, 11 on two, where PyTorch's copy of it runs at 1.9 on one (the page faults of the fresh
    memory it goes to cost about as much again, either way). The kernels read a Hugging Face
    weight in place where they can (`reads_in_place`); this is for the layouts they cannot."""
    out = torch.empty(sum(p.shape[0] for p in parts), parts[0].shape[1], dtype=parts[0].dtype)
    row = 0
    for part in parts:
        n, k = part.shape
        if (library() is not None and part.dtype == torch.float32 and part.device.type == "cpu" and n > 1
                and part.stride(0) == 1 and part.stride(1) >= n):
            call("gf_transpose", part.data_ptr(), k, n, part.stride(1), out[row].data_ptr(), torch.get_num_threads())
        else:
            out[row:row + n] = part
        row += n
    return out


def profile(on: bool) -> dict[str, float]:
    """Seconds spent in these kernels since the last call on this thread, by part: "products"
    (matrix products: the C blocks', the C model step's head and `linear`'s), "attention" and
    "block rest" (the C blocks' layer norms, GELU and residual adds, and the C model step's
    embeddings and final layer norm); then timing turned on or off (off by default: it costs
    a clock read per part). What benchmarks/profile_decode.py splits a step with. Zeros without
    the kernels."""
    out = (ctypes.c_double * len(BLOCK_PARTS))()
    if library() is not None:
        library().gf_block_profile(int(on), out)
    blocks = dict(zip(BLOCK_PARTS, out))
    linear_seconds, _state.linear_seconds = _state.linear_seconds or 0.0, 0.0 if on else None
    return {"products": blocks["products"] + linear_seconds, "attention": blocks["attention"],
            "block rest": blocks["rest"]}


def release_threads() -> bool:
    """Let the calling thread's OpenMP worker threads go (OpenMP's `omp_pause_resource_all`, soft),
    for a thread that hands its parallel work to another, as the server hands decoding to its
    scheduler thread. libgomp keeps a team of workers for each thread that has run parallel work,
    and while there are more of them than cores every team barely spins at its barriers before
    sleeping, so each of a decode step's ~100 parallel regions waits on wake-ups: decoding on a
    second thread ran at half the speed of the same on the main thread. The workers come back on
    this thread's next parallel work. Returns whether the OpenMP runtime did it."""
    try:
        return ctypes.CDLL("libgomp.so.1").omp_pause_resource_all(1) == 0  # 1: omp_pause_soft
    except (OSError, AttributeError):  # another OpenMP runtime, or one without pause (OpenMP < 5)
        return False


def dequantize(spec: Linear, in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An int8, 4-bit or bfloat16 layer's weights as (N, in_features) float32 or bfloat16 (what a prefill
    multiplies with), converted in C: ~10x faster than the same in PyTorch operators."""
    out = torch.empty(spec.n, in_features, dtype=dtype)
    call("gf_dequantize", ctypes.byref(spec), in_features, out.data_ptr(), dtype == torch.bfloat16,
         torch.get_num_threads())
    return out
