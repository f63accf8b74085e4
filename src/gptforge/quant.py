"""Faster CPU inference: weight layouts and weight-only int8 for decoding.

`prepare_for_inference(model, dtype, quantize)` turns a trained or random GPTModel into an
inference model, in place, and returns it:

- float32: each linear weight is re-laid out in memory as (in, out) contiguous while keeping its
  (out, in) shape, so the state dict and training are unchanged. At batch 1 a matrix-vector product
  is memory-bound, and MKL reads the (in, out) layout ~1.3x faster here (it is also what
  transformers' Conv1D uses). Query, key and value become views of one (in, 3 * out) matrix, so
  one matmul computes all three (`SharedQKV`).
- bfloat16: the model is cast to bf16 and every nn.Linear becomes a `PackedLinear`, whose weight is
  pre-packed once in oneDNN's blocked layout (PyTorch's plain bf16 matrix-vector kernel is no faster
  than fp32 on CPU; the packed one reads half the bytes); query/key/value are one packed matrix and
  the feed-forward's GELU is fused into its first matmul.
- int8 (weight-only): bf16 activations, and every nn.Linear (query/key/value fused) becomes an
  `Int8Linear` with per-output-channel symmetric int8 weights, multiplied through
  `torch._weight_int8pack_mm`.
- int4 (weight-only): bf16 activations, and every nn.Linear (query/key/value fused) becomes an
  `Int4Linear`: groups of 32 weights with one scale each, llama.cpp's Q4_0 scheme, multiplied
  through `torch._weight_int4pack_mm_for_cpu`.

Prepare a model last: moving or casting it afterwards (`.to(...)`) is not supported.

Packed, int8 and int4 models are for inference only (no autograd through the weights).

`inference_view(model)` is the float32 layout without touching `model`: what `generate`,
`generate_text` and `stream_text` decode with by default.

`choose_mode(dtype, quantize, flags)` is the one table of per-CPU choices (what `dtype="auto"`
resolves to, and which dtype a quantized prefill dequantizes to), a pure function of the CPU's
feature flags so that it can be tested for CPUs other than the one at hand.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import platform
import weakref
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from .errors import GptforgeError
from .lora import merge_lora

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
QUANTIZATIONS = ("none", "int8", "int4")
# Above this many rows (a prefill), dequantizing the weights and running a bf16 matmul is faster
# than the int8 matrix-vector kernel.
INT8_MAX_ROWS = 16
MULTI_ROW_HINT = 8  # the batch size oneDNN packs float32 weights for (decoding 8 sequences)
MULTI_ROW_MAX = 16  # up to this many rows the packed copy is used; a prefill stays on MKL
INT4_GROUP = 32  # weights per scale, as in llama.cpp's Q4_0


def _packed_bf16_available() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


# ----------------------------------------------------------------------------------------------
# Per-CPU choices, in one place

# CPU flags (Linux /proc/cpuinfo names) meaning bf16 matmuls run in hardware; without them PyTorch
# emulates bf16 and a bf16 prefill ran 5.5x slower than float32 (an AVX2-only EPYC, issue 14).
BF16_HARDWARE_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX512-BF16, Intel AMX, ARMv8.6 BF16
SHOWN_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8",
               "asimd", "sve", "bf16", "i8mm")


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


def cpu_summary() -> str:
    """One line naming this CPU, PyTorch's kernel level for it and the flags the choices read."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    flags = " ".join(flag for flag in SHOWN_FLAGS if flag in cpu_flags()) or "none of " + " ".join(SHOWN_FLAGS)
    return f"CPU: {name}; torch kernels: {torch.backends.cpu.get_cpu_capability()}; flags: {flags}"


@dataclasses.dataclass(frozen=True)
class InferenceMode:
    """What a model is prepared as: `dtype` of the activations (and unquantized weights),
    `quantize` of the linear weights, and `prefill_dtype`, the dtype quantized weights are
    dequantized to for a prefill (many rows, where a dense matmul beats the vector kernels)."""

    dtype: str
    quantize: str
    prefill_dtype: torch.dtype


def choose_mode(dtype: str = "auto", quantize: str = "none", flags: frozenset[str] | None = None,
                device_type: str = "cpu") -> InferenceMode:
    """The inference mode for `dtype` ('auto', 'float32' or 'bfloat16') and `quantize` on a CPU
    with feature `flags` (default: this one's).

    'auto' never trades accuracy for speed by itself: without quantization it is float32 (exactly
    the seed's outputs); with int8/int4 weights the activations are bf16, because torch's int8 and
    int4 matrix-vector kernels are ~14x slower with float32 activations (measured on an EPYC). A
    quantized prefill dequantizes to bf16 only where the CPU has bf16 hardware, else to float32.
    """
    if quantize not in QUANTIZATIONS:
        raise GptforgeError(f"quantize must be one of {', '.join(QUANTIZATIONS)}, got {quantize!r}")
    if dtype != "auto":
        dtype = str(parse_dtype(dtype)).removeprefix("torch.")
    flags = cpu_flags() if flags is None else flags
    bf16_hardware = any(flag in flags for flag in BF16_HARDWARE_FLAGS)
    if quantize != "none" and device_type == "cpu":
        dtype = "bfloat16"
    elif dtype == "auto":
        dtype = "float32"
    prefill = torch.bfloat16 if bf16_hardware or device_type != "cpu" else torch.float32
    return InferenceMode(dtype, quantize, prefill)


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
    """A quantized linear: a few rows (decode) through its packed kernel, many rows (prefill) through
    its weights dequantized to `prefill_dtype`. Subclasses give `few_rows` and `dequantized`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous()  # (M, in)
        if x2.shape[0] <= INT8_MAX_ROWS:
            out = self.few_rows(x2)  # (M, out)
            if self.bias is not None:
                out = out + self.bias
        else:
            bias = None if self.bias is None else self.bias.to(self.prefill_dtype)
            out = F.linear(x2.to(self.prefill_dtype), self.dequantized(self.prefill_dtype), bias).to(torch.bfloat16)
        return out.reshape(*shape[:-1], self.out_features)


class Int8Linear(_WeightOnlyLinear):
    """Weight-only int8 linear: w ~= int8 (out, in) * scale (out,), per output channel, symmetric.
    x: (..., in) bf16 -> (..., out) bf16."""

    def __init__(self, linear: nn.Linear, prefill_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.prefill_dtype = prefill_dtype  # what a prefill dequantizes to (`choose_mode`)
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,)
        self.register_buffer("weight_int8", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
        self.register_buffer("bias", bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def few_rows(self, x2: torch.Tensor) -> torch.Tensor:
        """(M, in) bf16 -> (M, out) through the int8 kernel, without the bias."""
        return torch._weight_int8pack_mm(x2, self.weight_int8, self.scale)

    def dequantized(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The weight (out, in) these int8 values and (bf16) scales stand for, in `dtype`."""
        return self.weight_int8.to(dtype) * self.scale.to(dtype)[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


class Int4Linear(_WeightOnlyLinear):
    """Weight-only 4-bit linear, group-wise symmetric as llama.cpp's Q4_0: each run of 32 weights
    along a row shares one scale d = (its value of largest magnitude) / -8, and w ~= (q - 8) * d
    with q in [0, 15] (Q4_0's rounding; d kept in bf16, the kernel's scale type). Up to
    INT8_MAX_ROWS rows go through torch's int4 CPU kernel (`torch._weight_int4pack_mm_for_cpu`,
    bf16 activations: its float32 path is ~30x slower); a prefill dequantizes the weight and runs
    one matmul in `prefill_dtype` (`choose_mode`: bf16 where the CPU has bf16 hardware, else float32).
    x: (..., in) bf16 -> (..., out) bf16."""

    def __init__(self, linear: nn.Linear, group_size: int = INT4_GROUP, prefill_dtype: torch.dtype | None = None):
        super().__init__()
        weight = linear.weight.detach().float()
        out_f, in_f = weight.shape
        if in_f % group_size:
            raise GptforgeError(f"int4 needs in_features divisible by {group_size}, got {in_f}")
        pad = -out_f % 64  # whole 64-row blocks: the packed layout `dequantized` reads
        weight = torch.cat([weight, weight.new_zeros(pad, in_f)])
        groups = weight.reshape(out_f + pad, in_f // group_size, group_size)
        d = groups.gather(-1, groups.abs().argmax(-1, keepdim=True)) / -8  # (N, in/g, 1)
        inverse = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = (groups * inverse + 8.5).floor().clamp(0, 15).to(torch.int32).reshape(out_f + pad, in_f)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))  # (N, in/2) uint8
        scale = d.squeeze(-1).t().contiguous()  # (in/g, N)
        self.register_buffer("scale_zeros", torch.stack([scale, torch.zeros_like(scale)], -1).to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.bfloat16))
        self.in_features, self.out_features, self.group_size = in_f, out_f, group_size
        self.prefill_dtype = prefill_dtype or choose_mode("auto", "int4").prefill_dtype  # what a prefill dequantizes to

    def few_rows(self, x2: torch.Tensor) -> torch.Tensor:
        """(M, in) bf16 -> (M, out) through the int4 kernel, without the bias (or the padding rows)."""
        out = torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scale_zeros)
        return out[:, :self.out_features]

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight (out, in) these 4-bit values and scales stand for. The CPU packing stores each
        block of 64 rows as (in, 32) bytes: row j in the low nibbles, row j + 32 in the high ones."""
        n_padded = self.packed.shape[0]
        blocks = self.packed.view(n_padded // 64, self.in_features, 32)
        q = torch.cat([blocks & 15, blocks >> 4], dim=2).transpose(1, 2).reshape(n_padded, self.in_features)
        scale = self.scale_zeros[..., 0].t().to(dtype).repeat_interleave(self.group_size, dim=1)  # (N, in)
        return ((q.to(dtype) - 8) * scale)[:self.out_features]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4 weight-only, groups of {self.group_size}")


def _swap_linears(module: nn.Module, make: Any) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, make(child))
        else:
            _swap_linears(child, make)


class SharedQKV(nn.Module):
    """float32 fused projection whose weight is one contiguous (in, 3 * out) matrix that the three
    separate W_query / W_key / W_value parameters are views of: one matmul, and the state dict,
    the parameters and training stay exactly as they were. (Holds no parameters of its own.)"""

    def __init__(self, att: nn.Module):
        super().__init__()
        linears = (att.W_query, att.W_key, att.W_value)
        fused_t = torch.cat([lin.weight.detach().t() for lin in linears], dim=1).contiguous()  # (in, 3*out)
        n = att.d_out
        for i, lin in enumerate(linears):
            lin.weight.data = fused_t[:, i * n:(i + 1) * n].t()  # (out, in) view into the fused matrix
        self._weight = (fused_t.t(),)  # a tuple, so the view is not registered as a parameter again
        self._bias = None
        if att.W_query.bias is not None:
            fused_b = torch.cat([lin.bias.detach() for lin in linears])
            for i, lin in enumerate(linears):
                lin.bias.data = fused_b[i * n:(i + 1) * n]
            self._bias = (fused_b,)

        self._kernel = _MultiRowKernel(self._weight[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._kernel(x, self._bias[0] if self._bias else None)


class _MultiRowKernel:
    """The product x @ weight.T for a float32 (out, in) weight stored as (in, out): one row (a
    decode step at batch 1, or a long prefill) through MKL, 2..MULTI_ROW_MAX rows (decoding a
    batch) through a oneDNN-packed copy, about 2x faster at 8 rows here. The copy is made on
    first use and remade when the weight changes (version, storage or an optimizer step)."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.packed: torch.Tensor | None = None
        self.key: tuple = ()

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        differentiable = self.weight.requires_grad and torch.is_grad_enabled()  # training: autograd's path
        if not 1 < rows <= MULTI_ROW_MAX or differentiable or not torch.backends.mkldnn.is_available():
            return F.linear(x, self.weight, bias)
        key = (self.weight.data_ptr(), self.weight._version, _OPTIMIZER_STEPS[0])
        if self.packed is None or key != self.key:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach().contiguous(), MULTI_ROW_HINT)
            self.key = key
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")


class Float32Linear(nn.Linear):
    """An nn.Linear (same parameters and state-dict keys) whose products of a few rows run on a
    oneDNN-packed copy of its weight (`_MultiRowKernel`); set by `prepare_for_inference(model, "float32")`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.__dict__.get("_kernel")
        if kernel is None or kernel.weight is not self.weight:
            kernel = self.__dict__["_kernel"] = _MultiRowKernel(self.weight)
        return kernel(x, self.bias)


def _pack_linears(model: nn.Module) -> None:
    """Make every plain nn.Linear a Float32Linear (in place: parameters and keys unchanged)."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = Float32Linear


def _fuse_qkv(model: nn.Module, make) -> None:
    """Give each attention layer one fused query/key/value projection built by `make`."""
    for block in getattr(model, "trf_blocks", []):
        block.att.fused_qkv = make(block.att)


def _concat_qkv(att: nn.Module) -> nn.Linear:
    linears = (att.W_query, att.W_key, att.W_value)
    fused = nn.Linear(att.W_query.in_features, 3 * att.d_out, bias=att.W_query.bias is not None)
    fused.weight.data = torch.cat([lin.weight.detach() for lin in linears]).to(att.W_query.weight.dtype)
    if fused.bias is not None:
        fused.bias.data = torch.cat([lin.bias.detach() for lin in linears]).to(att.W_query.weight.dtype)
    return fused


def _relayout_in_out(model: nn.Module) -> None:
    """Store each Linear weight (out, in) as the transpose of a contiguous (in, out) tensor."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.is_contiguous() and module.weight.dim() == 2:
            module.weight.data = module.weight.data.t().contiguous().t()


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
    quantize: 'none', 'int8' (weight-only int8; activations are then bf16 whatever `dtype` says) or
        'int4' (weight-only 4-bit groups as llama.cpp's Q4_0; activations bf16 likewise).
    On a non-CPU device only the dtype changes.
    """
    device_type = next(model.parameters()).device.type
    mode = choose_mode(dtype, quantize, device_type=device_type)
    torch_dtype = DTYPES[mode.dtype]
    model.eval()
    merge_lora(model)  # the layouts below read plain Linear weights: adapters are added into them first
    model.to(torch_dtype)
    if device_type != "cpu":
        return model
    if quantize == "int8":
        make = functools.partial(Int8Linear, prefill_dtype=mode.prefill_dtype)
        _fuse_qkv(model, lambda att: make(_concat_qkv(att)))
        _drop_separate_qkv(model)
        _swap_linears(model, make)
    elif quantize == "int4":
        make4 = functools.partial(Int4Linear, prefill_dtype=mode.prefill_dtype)
        _fuse_qkv(model, lambda att: make4(_concat_qkv(att)))
        _drop_separate_qkv(model)
        _swap_linears(model, make4)
    elif torch_dtype == torch.bfloat16 and _packed_bf16_available():
        _fuse_qkv(model, lambda att: PackedLinear(_concat_qkv(att)))
        _drop_separate_qkv(model)
        for block in getattr(model, "trf_blocks", []):  # Linear -> GELU becomes one fused kernel
            layers = block.ff.layers
            layers[0], layers[1] = PackedLinear(layers[0], gelu_tanh=True), nn.Identity()
        _swap_linears(model, PackedLinear)
    elif torch_dtype == torch.float32:
        _fuse_qkv(model, SharedQKV)  # first, so the relayout skips query/key/value (already views)
        _relayout_in_out(model)
        _pack_linears(model)
    return model


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


# Optimizer steps taken in this process. Fused AdamW updates parameters without bumping their
# version counters, so every optimizer step also counts here (a global post-step hook).
_OPTIMIZER_STEPS = [0]


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def _weights_key(model: nn.Module) -> tuple:
    # load_state_dict, .to() and unfused optimizers change a version counter or a data pointer.
    return (_OPTIMIZER_STEPS[0], *((p.data_ptr(), p._version, p.dtype, p.device) for p in model.parameters()))


def inference_view(model: nn.Module) -> nn.Module:
    """The float32 inference layout of `prepare_for_inference`, as a separate, cached module that
    computes the same function as `model` without changing it: `model`'s parameters, state dict,
    training flag and optimizer see nothing. The view costs one extra copy of the linear weights
    (kept while `model` lives, rebuilt when its weights change). Returned unchanged: a model that is
    not a plain float32 GPTModel on CPU, or one already prepared."""
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
        view = prepare_for_inference(_shallow_module_copy(model, {}), "float32")
    _VIEWS[model] = (key, view)
    return view
