"""The per-CPU choices of the fast path, in one place: `choose_mode(dtype, quantize, flags)`, a pure
function of the CPU's feature flags (so that it can be tested for CPUs other than the one at hand),
says what `dtype="auto"` resolves to, how many rows of a float32 or quantized product gptforge's
kernels take, and which dtype a quantized prefill dequantizes to beyond that."""

from __future__ import annotations

import dataclasses

import torch

from ..cpu import cpu_flags, has_bf16_hardware
from ..errors import GptforgeError
from . import kernels

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
QUANTIZATIONS = ("none", "int8", "int4")
# A decode step's rows at most (a batch); where the kernels run, products of more (a prefill) go
# where `choose_mode`'s kernel_rows says.
MAX_DECODE_ROWS = kernels.MAX_ROWS
# Where the CPU has AMX, quantized products of more rows dequantize for oneDNN's AMX matmul: at 64
# rows gptforge's kernels take about as long as dequantizing the weights alone (measured on an
# EPYC without AMX: int8 GPT-2 124M's blocks 17 ms; no AMX machine was at hand to time the matmul).
AMX_KERNEL_ROWS = 64
AMX_FLAGS = ("amx_tile", "amx_bf16", "amx_int8")
# float32 products of more rows than this go to PyTorch's (MKL). gptforge's kernels multiply them
# from the row-major weights (no second copy): a GPT-2 124M prefill was 3x faster than MKL at 3
# tokens, 1.6x at 24 and 1.2x at 64, even at 128, 1.1x slower from 256 up (AVX-512); in the AVX2
# build (PyTorch held to AVX2) 3x, 1.5x, even at 64, 1.1x slower at 128.
F32_KERNEL_ROWS = 128
AVX2_F32_KERNEL_ROWS = 64
INT4_GROUP = 32  # weights per scale, as in llama.cpp's Q4_0
# Weight-only layers' inputs are zero-padded to a multiple of KERNEL_PAD_IN where gptforge's kernels
# run (a whole Q8_0 block, whole vectors: GPT-2 1558M's 1600 inputs stay 1600, so its blocks run in
# C), else of PAD_IN_FEATURES (PyTorch's int4 packing wants whole tiles).
KERNEL_PAD_IN = 32
PAD_IN_FEATURES = 128


def _packed_bf16_available() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()

@dataclasses.dataclass(frozen=True)
class InferenceMode:
    """What a model is prepared as: `dtype` of the activations (and unquantized weights),
    `quantize` of the linear weights, `kernel_rows`, the most rows of a float32 or quantized
    product that gptforge's kernels take (None: any number; more go to PyTorch's), and
    `prefill_dtype`, the dtype quantized weights are dequantized to for a product of more."""

    dtype: str
    quantize: str
    prefill_dtype: torch.dtype
    kernel_rows: int | None = MAX_DECODE_ROWS


def choose_mode(dtype: str = "auto", quantize: str = "none", flags: frozenset[str] | None = None,
                device_type: str = "cpu", native: bool | None = None) -> InferenceMode:
    """The inference mode for `dtype` ('auto', 'float32' or 'bfloat16') and `quantize` on a CPU
    with feature `flags` (default: this one's), where gptforge's kernels run or not (`native`;
    default: whether they do here).

    'auto' never trades accuracy for speed by itself: without quantization it is float32 (exactly
    the seed's outputs). With int8/int4 weights the activations are float32 where gptforge's
    kernels run, else bf16 (PyTorch's int8 and int4 matrix-vector kernels are ~14x slower with
    float32 activations). Where the kernels run, a quantized prefill goes through them too (on an
    EPYC with AVX-512 VNNI 1.4x faster at 1024 tokens and 3-5x at 32 than dequantizing for one
    matmul; in its AVX2 build 1.1-1.3x and 3-4x), except beyond AMX_KERNEL_ROWS rows on a CPU with
    AMX. A prefill that dequantizes does so to bf16 only where the CPU has bf16 hardware, else to
    float32. A float32 prefill goes through the kernels up to F32_KERNEL_ROWS rows with AVX-512,
    AVX2_F32_KERNEL_ROWS without; longer ones through MKL.
    """
    if quantize not in QUANTIZATIONS:
        raise GptforgeError(f"quantize must be one of {', '.join(QUANTIZATIONS)}, got {quantize!r}")
    if dtype != "auto":
        dtype = str(parse_dtype(dtype)).removeprefix("torch.")
    flags = cpu_flags() if flags is None else flags
    native = kernels.available() if native is None else native
    bf16_hardware = has_bf16_hardware(flags)
    if quantize != "none" and device_type == "cpu":
        dtype = "float32" if native else "bfloat16"
    elif dtype == "auto":
        dtype = "float32"
    prefill = torch.bfloat16 if bf16_hardware or device_type != "cpu" else torch.float32
    kernel_rows = MAX_DECODE_ROWS
    if native and device_type == "cpu":
        if quantize != "none":
            kernel_rows = AMX_KERNEL_ROWS if any(flag in flags for flag in AMX_FLAGS) else None
        else:  # float32, and bfloat16 weights (Bf16Linear) read as float32's panels are
            kernel_rows = F32_KERNEL_ROWS if "avx512f" in flags else AVX2_F32_KERNEL_ROWS
    return InferenceMode(dtype, quantize, prefill, kernel_rows)


def _most_rows(kernel_rows: int | None) -> int | float:
    """A `kernel_rows` (choose_mode) as a bound on a product's rows: None is no bound."""
    return float("inf") if kernel_rows is None else kernel_rows


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'float32' or 'bfloat16' (or the torch dtype itself) -> torch dtype; others are a ValueError."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise GptforgeError(f"dtype must be float32 or bfloat16, got {name}")
        return name
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise GptforgeError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}") from None
