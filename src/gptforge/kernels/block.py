"""A TransformerBlock whose decode steps run as one C call (block.c's `gf_block_decode`).

`fuse_blocks(model)` (called by `quant.prepare_for_inference` for float32, int8 and 4-bit CPU
models) turns each block of a prepared model into a `FusedTransformerBlock`: same parameters,
same state-dict keys, same `forward`. A decode step (one new token per row, up to
`kernels.MAX_ROWS` rows, float32, no autograd) goes through the C block; anything else (a
prefill, training, a cache it cannot read) through `TransformerBlock.forward`, PyTorch's.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn as nn

from ..model import GELU, TransformerBlock
from . import MAX_ROWS, Linear, _ptr, call, f32_panels, layer, library, supported, vector_floats


class _Block(ctypes.Structure):  # block.c's gf_block
    _fields_ = [("d", ctypes.c_int64), ("heads", ctypes.c_int64), ("ln1_w", ctypes.c_void_p),
                ("ln1_b", ctypes.c_void_p), ("ln2_w", ctypes.c_void_p), ("ln2_b", ctypes.c_void_p),
                ("eps", ctypes.c_double), ("qkv", Linear), ("proj", Linear), ("fc1", Linear), ("fc2", Linear)]


def _linear_spec(module: nn.Module, keep: list) -> Linear | None:
    """The C description of a prepared linear layer (float32, int8 or 4-bit), or None if the
    kernels cannot run it; `keep` collects the tensors the description points into."""
    if hasattr(module, "fmt"):  # quant's Int8Linear / Int4Linear
        if not module.panels or module.in_padded != module.in_features:
            return None
        keep.extend(t for t in (module.weight_data, module.scale, module.bias) if t is not None)
        return module.spec()
    weight, bias = _float32_weights(module)  # a Float32Linear or SharedQKV: float32 (out, in)
    if weight.dtype != torch.float32 or not weight.is_contiguous() or not supported("f32", weight.shape[1]):
        return None
    keep.extend(t for t in (weight, bias) if t is not None)
    return layer("f32", weight.shape[0], weight.shape[1], weight, None, bias)


def _float32_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    if hasattr(module, "_weight"):  # SharedQKV
        return module._weight[0], module._bias[0] if module._bias else None
    return module.weight.detach(), None if module.bias is None else module.bias.detach()


def _block_spec(block: TransformerBlock) -> tuple[_Block, list] | None:
    att, layers = block.att, block.ff.layers
    d, heads, floats = att.d_out, att.num_heads, vector_floats()
    norms = (block.norm1.scale, block.norm1.shift, block.norm2.scale, block.norm2.shift)
    if (att.fused_qkv is None or not floats or (d // heads) % floats or d // heads > 256 or (4 * d) % floats
            or block.norm1.eps != block.norm2.eps or any(p.dtype != torch.float32 for p in norms)
            or not isinstance(layers[1], GELU)):
        return None
    keep = [p.detach() for p in norms]
    linears = [_linear_spec(module, keep) for module in FusedTransformerBlock._linears(block)]
    if any(spec is None for spec in linears):
        return None
    return _Block(d, heads, *(_ptr(p) for p in keep[:4]), block.norm1.eps, *linears), keep


class FusedTransformerBlock(TransformerBlock):
    """A TransformerBlock whose decode steps run in C (see the module docstring)."""

    def _linears(self) -> tuple[nn.Module, ...]:
        return self.att.fused_qkv, self.att.out_proj, self.ff.layers[0], self.ff.layers[2]

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                start: int = 0, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = x.shape
        spec = self.__dict__.get("_c_block")
        if (spec is None or t != 1 or kv is None or b > MAX_ROWS or x.dtype != torch.float32 or self.training
                or (torch.is_grad_enabled() and x.requires_grad)):
            return super().forward(x, kv, start, attn_mask)
        keys, values = kv  # (B, heads, max_len, head_dim) each, float32 or fp16, rows at a regular stride
        inner = (keys.shape[2] * keys.shape[3], keys.shape[3], 1)
        if (keys.dtype not in (torch.float32, torch.float16) or values.dtype != keys.dtype
                or keys.stride()[1:] != inner or values.stride() != keys.stride()
                or (attn_mask is not None and attn_mask.dtype != torch.bool)):
            return super().forward(x, kv, start, attn_mask)
        if b > 1:  # several rows: float32 layers multiply through their panels
            for linear, module, weight in self.__dict__["_f32_layers"]:
                linear.wp = f32_panels(module, weight, module.weights_version()).data_ptr()
        mask = None if attn_mask is None else _row_mask(attn_mask, b, start)
        out = x.contiguous().clone()  # the residual stream, updated in place by the C block
        call("gf_block_decode", ctypes.addressof(spec[0]), out.data_ptr(), b, keys.data_ptr(), values.data_ptr(),
             keys.stride(0), keys.shape[2], start, keys.dtype == torch.float16, _ptr(mask), torch.get_num_threads())
        return out


# The last mask given to a block, as (the mask, rows, start, C's (rows, start + 1) bytes): every
# block of a forward pass gets the same one.
_LAST_MASK: list[tuple | None] = [None]


def _row_mask(attn_mask: torch.Tensor, b: int, start: int) -> torch.Tensor:
    last = _LAST_MASK[0]
    if last is not None and last[0] is attn_mask and last[1:3] == (b, start):
        return last[3]
    mask = attn_mask.expand(b, 1, 1, start + 1).reshape(b, start + 1).contiguous()
    _LAST_MASK[0] = (attn_mask, b, start, mask)
    return mask


def fuse_blocks(model: nn.Module) -> None:
    """Turn each block of a prepared model into a FusedTransformerBlock where the kernels can run
    it (in place; parameters and keys unchanged)."""
    if library() is None:
        return
    for block in getattr(model, "trf_blocks", []):
        if type(block) is TransformerBlock:
            spec = _block_spec(block)
            if spec is not None:
                block.__class__ = FusedTransformerBlock
                block.__dict__["_c_block"] = spec
                # float32 layers: where a step of several rows points the C block at their panels
                block.__dict__["_f32_layers"] = [
                    (getattr(spec[0], name), module, _float32_weights(module)[0])
                    for name, module in zip(("qkv", "proj", "fc1", "fc2"), block._linears())
                    if getattr(spec[0], name).fmt == 0]
