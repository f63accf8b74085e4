"""The fast path's linear layers: float32 ones that run on gptforge's kernels from the model's own
weights (`Float32Linear`: same parameters and state-dict keys), weight-only bf16, int8
and 4-bit ones whose weights are stored in the kernels' panel order (`Bf16Linear`, `Int8Linear`,
`Int4Linear`, with PyTorch's kernels where gptforge's do not run), and oneDNN's pre-packed bf16
(`PackedLinear`, where the kernels do not run)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .policy import INT4_GROUP, KERNEL_PAD_IN, MAX_DECODE_ROWS, PAD_IN_FEATURES, _most_rows, choose_mode


class PackedLinear(nn.Module):
    """A bf16 nn.Linear whose weight is pre-packed for oneDNN (CPU). x: (..., in) bf16 -> (..., out).
    `gelu_tanh=True` fuses the tanh-approximated GELU that follows it into the same kernel."""

    def __init__(self, linear: nn.Linear, gelu_tanh: bool = False):
        super().__init__()
        weight = linear.weight.detach().to(torch.bfloat16)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        self.bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16).clone()
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
        self.in_padded = -(-linear.in_features // KERNEL_PAD_IN) * KERNEL_PAD_IN
        self.panels = kernels.supported(self.fmt, self.in_padded)  # stored for gptforge's kernels
        if not self.panels:
            self.in_padded = -(-linear.in_features // PAD_IN_FEATURES) * PAD_IN_FEATURES
        self.prefill_dtype = prefill_dtype  # what a prefill dequantizes to (`choose_mode`)
        self.kernel_rows = kernel_rows  # the most rows of a product on gptforge's kernels (None: any)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
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
    _torch_pack: tuple | None = None  # PyTorch's int4 packing and scales, made on first use (torch_rows)

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
        if self._torch_pack is None:
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


def _float32_linear(owner: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., in) @ weight (out, in).T + bias: up to `owner.kernel_rows` rows (a prefill, where
    choose_mode says) through gptforge's kernel (where it runs here), from the weights as they are
    stored (row-major, or a Hugging Face transpose read in place): the panel-ordered copy is made
    only for a batch's decode steps (blocks.py). More rows, and training, through PyTorch."""
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if (0 < rows <= _most_rows(owner.kernel_rows) and x.dtype == torch.float32 and kernels.reads_in_place(weight)
            and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
            and x.device.type == "cpu"):
        spec = kernels.layer("f32", weight.shape[0], k, weight, None, bias)
        return kernels.linear(x.reshape(rows, k), spec).reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class Float32Linear(nn.Linear):
    """An nn.Linear (same parameters and state-dict keys) whose decode steps run on gptforge's
    kernel; set by `prepare_for_inference(model, "float32")` and in an inference view."""

    kernel_rows: int | None = MAX_DECODE_ROWS  # see _float32_linear; prepare_for_inference sets choose_mode's
    panel_copy: tuple | None = None  # a batch's copy of the weights in the kernels' panel order (blocks.f32_panels)

    def weights_version(self) -> int:
        return self.weight._version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _float32_linear(self, x, self.weight, self.bias)
