"""Faster CPU inference: weight layouts, fused projections and 8- and 4-bit weights for decoding.

`prepare_for_inference(model, dtype, quantize)` turns a trained or random GPTModel into an
inference model, in place, and returns it:

- float32: query, key and value become views of one (3 * out, in) matrix, so one product computes
  all three (`SharedQKV`); every nn.Linear becomes a `Float32Linear` (same parameters and keys).
  A decode step's few rows go through gptforge's own kernel (`gptforge.kernels`, which streams
  each weight once: PyTorch's reads them at about half the memory bandwidth; a batch's decode
  steps through a second copy of the weights in the kernels' panel order, made on first use), and
  a short prefill's products too (`choose_mode`'s rows); a long prefill and a training step through
  PyTorch.
- bfloat16: the model's weights are rounded to bf16. Where gptforge's kernels run (CPU), every
  nn.Linear (query/key/value fused) becomes a `Bf16Linear`: bf16 weights in the kernels' panel
  order, float32 activations and sums, half float32's bytes to stream at a decode step; the rest
  of the model (embeddings, norms) holds its bf16 values as float32, and decoding runs on the
  kernels as float32's does. Elsewhere the model is cast to bf16 and every nn.Linear becomes a
  `PackedLinear`, whose weight is pre-packed once in oneDNN's blocked layout (query/key/value
  one packed matrix, the feed-forward's GELU fused into its first matmul).
- int8 (weight-only): every nn.Linear (query/key/value fused) becomes an `Int8Linear` with
  per-output-channel symmetric int8 weights.
- int4 (weight-only): every nn.Linear becomes an `Int4Linear`: groups of 32 weights with one scale
  each, llama.cpp's Q4_0 scheme.
  For int8 and int4, a decode step's rows go through gptforge's integer kernels (activations
  quantized per block of 32 as llama.cpp's Q8_0, float32 in and out; the weights stored in the
  kernels' panel order, the KV cache as Q8_0 rows) where this CPU has them, else through PyTorch's
  weight-only kernels (bf16 activations, weights row by row). A prefill's products go through the
  same kernels too (64 rows at a time), except on a CPU with AMX, where one of more than 64 rows
  dequantizes the weights to bf16 for one matmul, as every prefill does without the kernels (to
  this CPU's fastest dense dtype: `choose_mode`).

Prepare a model last: moving or casting it afterwards (`.to(...)`) is not supported.

Packed, int8 and int4 models are for inference only (no autograd through the weights).

`inference_view(model)` is the float32 layout without touching `model`, reading `model`'s own
weights (no copy): what `generate`, `generate_text` and `stream_text` decode with by default.

`choose_mode(dtype, quantize, flags)` is the one table of per-CPU choices (what `dtype="auto"`
resolves to, how many rows of a float32 or quantized product gptforge's kernels take, and which
dtype a quantized prefill dequantizes to beyond that), a pure function of the CPU's
feature flags so that it can be tested for CPUs other than the one at hand.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import warnings
import weakref
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .cpu import cpu_flags, has_bf16_hardware
from .errors import GptforgeError
from .kernels.block import fuse_blocks
from .lora import has_lora, merge_lora
from .model import KV_Q8_0, GPTModel

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
PAD_IN_FEATURES = 128  # quantized weights' inputs are zero-padded to this multiple (whole kernel vectors)


def _packed_bf16_available() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


# ----------------------------------------------------------------------------------------------
# Per-CPU choices, in one place

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


class PackedLinear(nn.Module):
    """A bf16 nn.Linear whose weight is pre-packed for oneDNN (CPU). x: (..., in) bf16 -> (..., out).
    `gelu_tanh=True` fuses the tanh-approximated GELU that follows it into the same kernel."""

    def __init__(self, linear: nn.Linear, gelu_tanh: bool = False):
        super().__init__()
        weight = linear.weight.detach().to(torch.bfloat16)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        self.bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
        self.activation, self.algorithm = ("gelu", "tanh") if gelu_tanh else ("none", "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, self.activation, [], self.algorithm)

    def extra_repr(self) -> str:
        fused = ", fused GELU(tanh)" if self.activation == "gelu" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16 oneDNN-packed{fused}"


class _WeightOnlyLinear(nn.Module):
    """A weight-only linear (int8, 4-bit, bf16): a decode step's few rows through gptforge's kernel
    for `fmt` where it runs, else through `torch_rows` (PyTorch's kernel); many rows (a prefill) through
    the weights dequantized to `prefill_dtype`. x: (..., in) float -> (..., out), x's dtype.
    Subclasses store the weights with their inputs zero-padded to `in_padded`, in the kernels'
    panel order where they run (`panels`; `kernels.pack`), and give `fmt`, `weight_data` (the
    stored values), `torch_rows` and `_dequantized_in_torch`."""

    fmt = ""
    dequantized_dtype = torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (M, in)
        if x2.shape[0] <= self.vector_rows():
            if self.in_padded != self.in_features:
                x2 = F.pad(x2, (0, self.in_padded - self.in_features))
            if self.panels:
                out = kernels.linear(x2.float(), self.spec())
            else:
                out = self.torch_rows(x2.to(torch.bfloat16).contiguous()).float()
                out = out if self.bias is None else out + self.bias
        else:
            bias = None if self.bias is None else self.bias.to(self.prefill_dtype)
            out = F.linear(x2.to(self.prefill_dtype), self.dequantized(self.prefill_dtype), bias)
        return out.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def vector_rows(self) -> int | float:
        """The most rows a product runs with without dequantizing the weights: `kernel_rows` on
        gptforge's kernels, MAX_DECODE_ROWS on PyTorch's weight-only ones."""
        return _most_rows(self.kernel_rows) if self.panels else MAX_DECODE_ROWS

    def _set_common(self, linear: nn.Linear, prefill_dtype: torch.dtype, kernel_rows: int | None) -> torch.Tensor:
        """Sizes, bias, prefill dtype and kernel rows from `linear` and `choose_mode`; returns its
        weight (out, in) float32."""
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.in_padded = -(-linear.in_features // PAD_IN_FEATURES) * PAD_IN_FEATURES
        self.prefill_dtype = prefill_dtype  # what a prefill dequantizes to (`choose_mode`)
        self.kernel_rows = kernel_rows  # the most rows of a product on gptforge's kernels (None: any)
        self.panels = kernels.supported(self.fmt, self.in_padded)  # stored for gptforge's kernels
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())
        return linear.weight.detach().float()

    def _padded(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` (out, in) with its inputs zero-padded to `in_padded`."""
        return F.pad(weight, (0, self.in_padded - self.in_features))

    def spec(self) -> kernels.Linear:
        """The C kernels' description of this layer (only where `panels`)."""
        return kernels.layer(self.fmt, self.out_features, self.in_padded, self.weight_data, self.scale, self.bias)

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight (out, in) the stored values and scales stand for, in `dtype` (default: the
        class's `dequantized_dtype`), converted in C where the kernels run."""
        dtype = dtype or self.dequantized_dtype
        if self.panels and dtype in (torch.float32, torch.bfloat16):
            return kernels.dequantize(self.spec(), self.in_features, dtype)
        return self._dequantized_in_torch(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.fmt} weight-only"


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float32 -> int8 values (out, in) and per-row scales (out,): symmetric, scale =
    max |w| / 127, w ~= q * scale. (`kernels.quantize` gives the same, in panels.)"""
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,)
    return torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def quantize_q4_0(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float32, in a whole number of groups of 32 -> llama.cpp's Q4_0: codes q (out, in)
    uint8 in [0, 15] and scales d (out, in / 32), w ~= (q - 8) * d. A group's d is its first value
    of largest magnitude over -8. (`kernels.quantize` gives the same, in panels.)"""
    groups = weight.reshape(weight.shape[0], -1, INT4_GROUP)
    d = groups.gather(-1, groups.abs().argmax(-1, keepdim=True)) / -8  # (out, in/32, 1)
    inverse = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = (groups * inverse + 8.5).floor().clamp(0, 15).to(torch.uint8)  # Q4_0's rounding
    return q.reshape(weight.shape[0], -1), d.reshape(weight.shape[0], -1)


class Bf16Linear(_WeightOnlyLinear):
    """Weight-only bfloat16 linear: the weights rounded to bf16 (as `.to(torch.bfloat16)`), in the
    kernels' panel order where they run (else row-major: see `rows`); on the kernels the
    activations and the sums stay float32, so the products are float32's with bf16 weights."""

    fmt = "bf16"
    dequantized_dtype = torch.bfloat16
    scale = None

    def __init__(self, linear: nn.Linear, prefill_dtype: torch.dtype = torch.bfloat16,
                 kernel_rows: int | None = MAX_DECODE_ROWS):
        super().__init__()
        weight = self._set_common(linear, prefill_dtype, kernel_rows)
        self.register_buffer("weight_bf16", kernels.quantize("bf16", weight, self.in_padded)[0] if self.panels
                             else self._padded(weight).to(torch.bfloat16))

    @property
    def weight_data(self) -> torch.Tensor:
        return self.weight_bf16

    def rows(self) -> torch.Tensor:
        """The bf16 weights (out, in_padded), row-major."""
        return kernels.unpack("bf16", self.weight_bf16, None, self.out_features)[0] if self.panels else self.weight_bf16

    def torch_rows(self, x2: torch.Tensor) -> torch.Tensor:
        """(M, in_padded) bf16 -> (M, out) bf16, without the bias."""
        return F.linear(x2, self.rows())

    def _dequantized_in_torch(self, dtype: torch.dtype) -> torch.Tensor:
        return self.rows()[:, :self.in_features].to(dtype)


class Int8Linear(_WeightOnlyLinear):
    """Weight-only int8 linear: w ~= int8 (out, in) * scale (out,), per output channel, symmetric.
    `weight_int8` holds the int8 values (in the kernels' panel order where `panels`: see `rows`)."""

    fmt = "i8"
    dequantized_dtype = torch.bfloat16

    def __init__(self, linear: nn.Linear, prefill_dtype: torch.dtype = torch.bfloat16,
                 kernel_rows: int | None = MAX_DECODE_ROWS):
        super().__init__()
        weight = self._set_common(linear, prefill_dtype, kernel_rows)
        q, scale = kernels.quantize("i8", weight, self.in_padded) if self.panels else quantize_int8(self._padded(weight))
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale)

    @property
    def weight_data(self) -> torch.Tensor:
        return self.weight_int8

    def rows(self) -> torch.Tensor:
        """The int8 values (out, in_padded), row-major."""
        return kernels.unpack("i8", self.weight_int8, None, self.out_features)[0] if self.panels else self.weight_int8

    def torch_rows(self, x2: torch.Tensor) -> torch.Tensor:
        """(M, in_padded) bf16 -> (M, out) bf16 through PyTorch's int8 kernel, without the bias."""
        return torch._weight_int8pack_mm(x2, self.rows(), self.scale.to(torch.bfloat16))

    def _dequantized_in_torch(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.rows()[:, :self.in_features].float() * self.scale[:, None]).to(dtype)


def _q4_0_bytes(q: torch.Tensor) -> torch.Tensor:
    """4-bit codes (out, in) uint8 as Q4_0's bytes (out, in / 2): in each group of 32, byte j holds
    weight j in its low nibble and weight j + 16 in its high one."""
    groups = q.view(q.shape[0], -1, INT4_GROUP)
    return (groups[..., :INT4_GROUP // 2] | (groups[..., INT4_GROUP // 2:] << 4)).reshape(q.shape[0], -1)


class Int4Linear(_WeightOnlyLinear):
    """Weight-only 4-bit linear, llama.cpp's Q4_0: each run of 32 weights along a row shares one
    scale d = (its value of largest magnitude) / -8, and w ~= (q - 8) * d with q in [0, 15].
    `packed` and `scale` hold them: in the kernels' panel order where `panels`, else as Q4_0's
    bytes (out, in / 2) uint8 (byte j of a group: q of weight j in the low nibble, of weight
    j + 16 in the high one) and the d's (out, in / 32) float32; `q4_0` gives the latter always."""

    fmt = "q4"

    def __init__(self, linear: nn.Linear, prefill_dtype: torch.dtype | None = None,
                 kernel_rows: int | None = MAX_DECODE_ROWS):
        super().__init__()
        weight = self._set_common(linear, prefill_dtype or choose_mode("auto", "int4").prefill_dtype, kernel_rows)
        if self.panels:
            packed, scale = kernels.quantize("q4", weight, self.in_padded)
        else:
            q, scale = quantize_q4_0(self._padded(weight))
            packed = _q4_0_bytes(q)
        self.register_buffer("packed", packed.contiguous())
        self.register_buffer("scale", scale.contiguous())

    @property
    def weight_data(self) -> torch.Tensor:
        return self.packed

    def codes(self) -> torch.Tensor:
        """The 4-bit values q (out, in_padded) int32, 0..15."""
        if self.panels:
            return kernels.unpack("q4", self.packed, self.scale, self.out_features)[0].to(torch.int32)
        groups = self.packed.view(self.out_features, -1, INT4_GROUP // 2).to(torch.int32)
        return torch.cat([groups & 15, groups >> 4], dim=-1).reshape(self.out_features, -1)

    def scales(self) -> torch.Tensor:
        """The groups' scales d (out, in_padded / 32) float32, row-major."""
        return kernels.unpack("q4", self.packed, self.scale, self.out_features)[1] if self.panels else self.scale

    def q4_0(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Q4_0's bytes (out, in_padded / 2) uint8 and scales (out, in_padded / 32) float32."""
        return (_q4_0_bytes(self.codes().to(torch.uint8)) if self.panels else self.packed), self.scales()

    def torch_rows(self, x2: torch.Tensor) -> torch.Tensor:
        """(M, in_padded) bf16 -> (M, out) bf16 through PyTorch's int4 kernel, without the bias
        (its packing, made on first use, wants whole blocks of 64 rows)."""
        if "_torch_pack" not in self.__dict__:
            pad = -self.out_features % 64
            q = F.pad(self.codes(), (0, 0, 0, pad))
            scale = F.pad(self.scales(), (0, 0, 0, pad)).t().contiguous()  # (in/32, out + pad)
            self._torch_pack = (torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1),
                                torch.stack([scale, torch.zeros_like(scale)], -1).to(torch.bfloat16))
        packed, scale_zeros = self._torch_pack
        return torch._weight_int4pack_mm_for_cpu(x2, packed, INT4_GROUP, scale_zeros)[:, :self.out_features]

    def _dequantized_in_torch(self, dtype: torch.dtype) -> torch.Tensor:
        scale = self.scales().repeat_interleave(INT4_GROUP, dim=1)
        return ((self.codes().float() - 8) * scale)[:, :self.in_features].to(dtype)


def _swap_linears(module: nn.Module, make: Any) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, make(child))
        else:
            _swap_linears(child, make)


def _most_rows(kernel_rows: int | None) -> int | float:
    """A `kernel_rows` (choose_mode) as a bound on a product's rows: None is no bound."""
    return float("inf") if kernel_rows is None else kernel_rows


def _float32_linear(owner: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., in) @ weight (out, in).T + bias: up to `owner.kernel_rows` rows (a prefill, where
    choose_mode says) through gptforge's kernel (where it runs here), from the row-major weights:
    the panel-ordered copy is made only for a batch's decode steps (kernels/block.py). More rows,
    and training, through PyTorch."""
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if (0 < rows <= _most_rows(owner.kernel_rows) and x.dtype == torch.float32 and weight.is_contiguous()
            and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
            and x.device.type == "cpu" and kernels.supported("f32", k)):
        spec = kernels.layer("f32", weight.shape[0], k, weight, None, bias)
        return kernels.linear(x.reshape(rows, k), spec).reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class SharedQKV(nn.Module):
    """float32 fused projection whose weight is one contiguous (3 * out, in) matrix that the three
    separate W_query / W_key / W_value parameters are views of: one product, and the state dict,
    the parameters and training stay exactly as they were. (Holds no parameters of its own.)"""

    kernel_rows: int | None = MAX_DECODE_ROWS  # see _float32_linear; prepare_for_inference sets choose_mode's

    def __init__(self, att: nn.Module):
        super().__init__()
        linears = (att.W_query, att.W_key, att.W_value)
        fused = kernels.row_major([lin.weight.detach() for lin in linears])  # (3*out, in)
        n = att.d_out
        for i, lin in enumerate(linears):
            lin.weight.data = fused[i * n:(i + 1) * n]  # (out, in) view into the fused matrix
        self._weight = (fused,)  # a tuple, so the view is not registered as a parameter again
        self._parts = tuple(lin.weight for lin in linears)
        self._bias = None
        if att.W_query.bias is not None:
            fused_b = torch.cat([lin.bias.detach() for lin in linears])
            for i, lin in enumerate(linears):
                lin.bias.data = fused_b[i * n:(i + 1) * n]
            self._bias = (fused_b,)

    def weights_version(self) -> int:
        """Grows whenever the weights change in place (the fused matrix has a version counter of its
        own: the parameters' views of it do not bump it)."""
        return sum(p._version for p in self._parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _float32_linear(self, x, self._weight[0], self._bias[0] if self._bias else None)


class Float32Linear(nn.Linear):
    """An nn.Linear (same parameters and state-dict keys) whose decode steps run on gptforge's
    kernel; set by `prepare_for_inference(model, "float32")`."""

    kernel_rows: int | None = MAX_DECODE_ROWS  # see _float32_linear; prepare_for_inference sets choose_mode's

    def weights_version(self) -> int:
        return self.weight._version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _float32_linear(self, x, self.weight, self.bias)


def _pack_linears(model: nn.Module) -> None:
    """Make every plain nn.Linear a Float32Linear (in place: parameters and keys unchanged), its
    weight stored (out, in) contiguous as the kernel reads it (Hugging Face's layout is (in, out))."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = Float32Linear
            if not module.weight.is_contiguous():
                module.weight.data = kernels.row_major([module.weight.data])


def _fuse_qkv(model: nn.Module, make) -> None:
    """Give each attention layer one fused query/key/value projection built by `make`."""
    for block in getattr(model, "trf_blocks", []):
        block.att.fused_qkv = make(block.att)


def _concat_qkv(att: nn.Module) -> nn.Linear:
    """One Linear (3 d_out, in) holding the query, key and value projections one below the other."""
    linears = (att.W_query, att.W_key, att.W_value)
    dtype = att.W_query.weight.dtype
    fused = nn.Linear(att.W_query.in_features, 3 * att.d_out, bias=att.W_query.bias is not None,
                      device="meta")  # no random initialization of weights about to be replaced
    fused.weight = nn.Parameter(kernels.row_major([lin.weight.detach() for lin in linears]).to(dtype))
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat([lin.bias.detach() for lin in linears]).to(dtype))
    return fused


def _drop_separate_qkv(model: nn.Module) -> None:
    """Inference-only models keep just the fused projection (no second copy of the weights)."""
    for block in getattr(model, "trf_blocks", []):
        block.att.W_query = block.att.W_key = block.att.W_value = None


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


@torch.no_grad()
def prepare_for_inference(model: nn.Module, dtype: str | torch.dtype = "float32",
                          quantize: str = "none") -> nn.Module:
    """Make `model` (a GPTModel) fast for generation on CPU, in place; returns it in eval mode.

    dtype: 'auto' (this CPU's choice, `choose_mode`), 'float32' or 'bfloat16', the activations'
        (and unquantized weights') type.
    quantize: 'none', 'int8' (weight-only int8) or 'int4' (weight-only 4-bit groups as llama.cpp's
        Q4_0); the activations are then float32 where gptforge's kernels run, else bf16, whatever
        `dtype` says (`choose_mode`).
    On a non-CPU device only the dtype changes.
    """
    if not isinstance(model, GPTModel):
        raise GptforgeError(f"prepare_for_inference expects a gptforge GPTModel (gptforge.load gives one), got "
                            f"{type(model).__name__}")
    device_type = next(model.parameters()).device.type
    mode = choose_mode(dtype, quantize, device_type=device_type)
    torch_dtype = DTYPES[mode.dtype]
    flags = cpu_flags()
    if (torch_dtype == torch.bfloat16 and device_type == "cpu" and flags and not kernels.available()
            and not has_bf16_hardware(flags)):
        # 'auto' never comes here: only a bf16 asked for by name on such a CPU, where gptforge's
        # kernels (whose bf16 weights meet float32 activations: Bf16Linear) do not run
        warnings.warn("gptforge: this CPU has no bf16 hardware, so PyTorch emulates bf16 matrix products (0.3 "
                      "GFLOP/s measured on an AVX2-only EPYC): --dtype float32 (or auto) or --quantize int8 "
                      "run far faster here", stacklevel=2)
    model.eval()
    merge_lora(model)  # the layouts below read plain Linear weights: adapters are added into them first
    weight_only = {"int8": Int8Linear, "int4": Int4Linear}.get(quantize)
    if device_type == "cpu" and weight_only is None and torch_dtype == torch.bfloat16 and kernels.available():
        weight_only = Bf16Linear  # bf16 weights on gptforge's kernels, float32 activations
        model.float()
        # every other parameter (embeddings, norms, biases) takes its bf16 value, held as float32 as
        # the C step reads it; the linears' weights are rounded as Bf16Linear stores them (not twice)
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                if not (isinstance(module, nn.Linear) and name == "weight"):
                    param.data = param.data.to(torch.bfloat16).float()
    else:
        model.to(torch_dtype)
    if device_type != "cpu":
        return model
    if weight_only is not None:
        make = functools.partial(weight_only, prefill_dtype=mode.prefill_dtype, kernel_rows=mode.kernel_rows)
        _fuse_qkv(model, lambda att: make(_concat_qkv(att)))
        _drop_separate_qkv(model)
        _swap_linears(model, make)
        if kernels.available() and (torch_dtype == torch.float32 or weight_only is Bf16Linear):
            fuse_blocks(model)
            if weight_only is not Bf16Linear:
                # the cache as Q8_0 rows: a quarter of float32's bytes for attention to read (fp16's half)
                model.kv_dtype = KV_Q8_0 if model.cfg.head_dim % 32 == 0 else torch.float16
    elif torch_dtype == torch.bfloat16 and _packed_bf16_available():
        _fuse_qkv(model, lambda att: PackedLinear(_concat_qkv(att)))
        _drop_separate_qkv(model)
        for block in getattr(model, "trf_blocks", []):  # Linear -> GELU becomes one fused kernel
            layers = block.ff.layers
            layers[0], layers[1] = PackedLinear(layers[0], gelu_tanh=True), nn.Identity()
        _swap_linears(model, PackedLinear)
    elif torch_dtype == torch.float32:
        _prepare_float32(model, mode.kernel_rows)
    return model


def _prepare_float32(model: nn.Module, kernel_rows: int | None, share_storage: bool = False) -> None:
    """The float32 layout on CPU: query/key/value fused (SharedQKV), Linears as Float32Linear, the
    blocks and model in C where the kernels run. share_storage=True (an inference view): every
    weight the kernels read is the model's own tensor (the three projections apart, no panels),
    except one stored transposed (a Hugging Face file mapped as it is), which is laid out anew."""
    if not share_storage:
        _fuse_qkv(model, SharedQKV)
    _pack_linears(model)
    for module in model.modules():
        if isinstance(module, (SharedQKV, Float32Linear)):
            module.kernel_rows = kernel_rows
    fuse_blocks(model, panels=not share_storage)


# model -> (the parameters' identity and versions when the view was made, the view)
_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _shallow_module_copy(module: nn.Module, params: dict[int, nn.Parameter]) -> nn.Module:
    """A copy of the module tree whose parameters are new Parameter objects on the same storage
    (tied weights stay tied), so re-laying them out leaves the original's untouched."""
    clone = copy.copy(module)
    clone._parameters = {
        name: None if p is None else params.setdefault(id(p), nn.Parameter(p.detach(), requires_grad=False))
        for name, p in module._parameters.items()}
    clone._buffers = dict(module._buffers)
    clone._modules = {name: None if m is None else _shallow_module_copy(m, params)
                      for name, m in module._modules.items()}
    return clone


def _weights_key(model: nn.Module) -> tuple:
    """What the view is made from: each parameter's tensor (its memory, dtype and device) and the
    module tree's shape. The view reads the same memory, so a change of values (an optimizer step,
    load_state_dict, an edit through `.data`) is seen without a rebuild; a new tensor is not. A
    weight stored transposed is copied into the view, so its version counter (bumped by every
    in-place change through autograd's tensors: optimizer steps, load_state_dict) is part of it."""
    return (tuple(type(m) for m in model.modules()),
            *((p.data_ptr(), p.shape, p.stride(), p.dtype, p.device, 0 if p.is_contiguous() else p._version)
              for p in model.parameters()))


def inference_view(model: nn.Module) -> nn.Module:
    """The float32 inference layout of `prepare_for_inference`, as a separate, cached module that
    computes the same function as `model` without changing it: `model`'s parameters, state dict,
    training flag and optimizer see nothing. The view holds no weights of its own: it multiplies
    `model`'s own tensors (query, key and value as three products, a batch's rows from the
    row-major weights), so any change to their values, however made, is in its next output; it is
    made anew when a parameter is replaced by another tensor or the module tree changes. Weights
    stored transposed (a Hugging Face checkpoint mapped without a copy) are the exception: the
    view lays them out row-major once, and is made anew when one of them changes in place. A model
    with LoRA adapters gets a new view each call (its merged weights are new tensors). Returned
    unchanged: a model that is not a plain float32 GPTModel on CPU, or one already prepared."""
    blocks = getattr(model, "trf_blocks", None)
    first = next(model.parameters(), None)
    if (blocks is None or first is None or first.dtype != torch.float32 or first.device.type != "cpu"
            or any(getattr(block.att, "fused_qkv", None) is not None for block in blocks)):
        return model
    key = _weights_key(model)
    cached = _VIEWS.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        view = _shallow_module_copy(model, {}).eval()
        merge_lora(view)
        _prepare_float32(view, choose_mode("float32").kernel_rows, share_storage=True)
    if not has_lora(model):
        _VIEWS[model] = (key, view)
    return view
