"""A TransformerBlock, and a whole GPTModel, whose decode steps run as one C call (block.c's
`gf_block_decode` and `gf_model_decode`).

`fuse_blocks(model)` (called by `prepare_for_inference` for float32, bf16, int8 and 4-bit
CPU models) turns each block of a prepared model into a `FusedTransformerBlock` and, where every
block and the output head run in C, the model into a `FusedGPTModel`: same parameters, same
state-dict keys, same `forward`. A decode step (one new token per row, up to `kernels.MAX_ROWS`
rows, float32, no autograd) goes through C, and so does a short prefill into a cache (up to
`PREFILL_ROWS` tokens in all, the last position's logits only); anything else (a long prefill,
training, a cache it cannot read) through PyTorch's `TransformerBlock.forward` and
`GPTModel.forward`.
"""

from __future__ import annotations

import ctypes
import dataclasses

import torch
import torch.nn as nn

from ..model import GELU, KV_Q8_0, GPTModel, KVCache, TransformerBlock, kv_row
from .kernels import MAX_ROWS, Linear, _ptr, call, reads_in_place, layer, library, pack, vector_floats
from .kernels.abi import Block, Model


# The KV caches the C blocks read: dtype -> block.c's format (KV_F32, KV_F16, KV_Q8)
KV_FORMATS = {torch.float32: 0, torch.float16: 1, KV_Q8_0: 2}
# A prefill of at most this many tokens (all rows together) into a cache runs as one C call, like a
# decode step (GPT-2 124M: 1.3-1.45x PyTorch's blocks for int8 at 64-128 tokens, 1.0-1.16x for
# float32 at one row, 1.4x at several rows); longer ones through PyTorch, whose attention and
# (float32) matmuls win there. The products of a prefill stay within the layers' own
# `kernel_rows` (policy.choose_mode) too.
PREFILL_ROWS = 128


@dataclasses.dataclass
class CBlock:
    """What a FusedTransformerBlock's C step reads: its C description (`spec`), the tensors that
    points into (`keep`), and its float32 layers, pointed at their panels for a step of several
    rows (`f32_layers`: (C description, module, weight) each)."""

    spec: Block
    keep: list
    f32_layers: list


@dataclasses.dataclass
class CModel:
    """What a FusedGPTModel's C step reads: its C description and the tensors it points into, the
    forward-hook dicts of the modules it stands in for (a hook there sends every step through
    PyTorch), the output head's float32 layer (as CBlock's), and the most tokens of a prefill in C."""

    spec: Model
    keep: list
    hook_dicts: tuple
    f32_head: list
    rows: int


def _linear_spec(module: nn.Module, keep: list) -> Linear | None:
    """The C description of a prepared linear layer (float32, bf16, int8 or 4-bit), or None if the
    kernels cannot run it; `keep` collects the tensors the description points into."""
    if hasattr(module, "fmt"):  # quant's Int8Linear / Int4Linear / Bf16Linear
        if not module.panels or module.in_padded != module.in_features:
            return None
        keep.extend(t for t in (module.weight_data, module.scale, module.bias) if t is not None)
        return module.spec()
    weight, bias = _float32_weights(module)  # a Float32Linear: float32 (out, in), or its transpose in place
    if not reads_in_place(weight):
        return None
    keep.extend(t for t in (weight, bias) if t is not None)
    return layer("f32", weight.shape[0], weight.shape[1], weight, None, bias)


def _float32_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    return module.weight.detach(), None if module.bias is None else module.bias.detach()


def _block_spec(block: TransformerBlock) -> tuple[Block, list] | None:
    """The C description of a block and the tensors it points into, or None if C cannot run it."""
    att, layers = block.att, block.ff.layers
    d, heads, floats = att.d_out, att.num_heads, vector_floats()
    norms = (block.norm1.scale, block.norm1.shift, block.norm2.scale, block.norm2.shift)
    if (not floats or (d // heads) % floats or d // heads > 256 or (4 * d) % floats
            or block.norm1.eps != block.norm2.eps or any(p.dtype != torch.float32 for p in norms)
            or not isinstance(layers[1], GELU)):
        return None
    keep = [p.detach() for p in norms]
    named = FusedTransformerBlock._linears(block)
    specs = {name: _linear_spec(module, keep) for name, module in named.items()}
    if any(spec is None for spec in specs.values()):
        return None
    return Block(d, heads, *(_ptr(p) for p in keep[:4]), block.norm1.eps, **specs), keep


class FusedTransformerBlock(TransformerBlock):
    """A TransformerBlock whose decode steps run in C (see the module docstring)."""

    c_block: CBlock | None = None  # set by fuse_blocks

    def _linears(self) -> dict[str, nn.Module]:
        """The block's linear layers by gf_block's field names: one fused query/key/value projection
        (`qkv`) where the model was prepared, else the three apart (`q`, `k`, `v`: an inference
        view, whose C step reads the model's own matrices)."""
        att = self.att
        qkv = ({"qkv": att.fused_qkv} if att.fused_qkv is not None
               else {"q": att.W_query, "k": att.W_key, "v": att.W_value})
        return {**qkv, "proj": att.out_proj, "fc1": self.ff.layers[0], "fc2": self.ff.layers[2]}

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                start: int = 0, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = x.shape
        c = self.c_block
        if (c is None or t != 1 or kv is None or b > MAX_ROWS or x.dtype != torch.float32 or self.training
                or (torch.is_grad_enabled() and x.requires_grad)):
            return super().forward(x, kv, start, attn_mask)
        keys, values = kv  # (B, heads, max_len, head_dim) each (Q8_0: head_dim * 17 / 16 bytes)
        if (not _cache_readable(keys, values, self.att.head_dim)
                or (attn_mask is not None and attn_mask.dtype != torch.bool)):
            return super().forward(x, kv, start, attn_mask)
        if b > 1:  # several rows: float32 layers multiply through their panels
            _point_at_panels(c.f32_layers)
        mask = None if attn_mask is None else _LAST_MASK.rows(attn_mask, b, start)
        out = x.contiguous().clone()  # the residual stream, updated in place by the C block
        call("gf_block_decode", ctypes.addressof(c.spec), out.data_ptr(), b, 1, keys.data_ptr(), values.data_ptr(),
             keys.stride(0), keys.shape[2], start, KV_FORMATS[keys.dtype], _ptr(mask), torch.get_num_threads())
        return out


def _cache_readable(keys: torch.Tensor, values: torch.Tensor, head_dim: int) -> bool:
    """Whether the C blocks read this KV cache, one layer's or all of them (..., B, heads, max_len,
    row): float32, fp16 or Q8_0 rows (KV_FORMATS), keys and values alike, a row holding one head's
    head_dim values, the heads and positions of a row at their regular strides (rows and layers
    may be views into a larger cache)."""
    max_len, row = keys.shape[-2:]
    return (keys.dtype in KV_FORMATS and values.dtype == keys.dtype and not (keys.dtype == KV_Q8_0 and head_dim % 32)
            and row == kv_row(head_dim, keys.dtype)
            and keys.stride()[-3:] == (max_len * row, row, 1) and values.stride() == keys.stride())


def f32_panels(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """`pack("f32", weight)` for a float32 layer (Float32Linear), kept on it as `panel_copy`:
    made on the first decode step of a batch (a second copy of the weights; at 8 rows 1.2-1.4x
    faster than the row-major ones), remade when the weights change (a new tensor, or the layer's
    `weights_version`, its version counters' sum)."""
    key = (weight.data_ptr(), module.weights_version())
    if module.panel_copy is None or module.panel_copy[0] != key:
        module.panel_copy = (key, pack("f32", weight.detach())[0])
    return module.panel_copy[1]


def _point_at_panels(layers: list[tuple[Linear, nn.Module, torch.Tensor]], make: bool = True) -> None:
    """Point each float32 layer's C description at its panels (made or remade by f32_panels); with
    make=False, only a layer that has had them (kept up to date), others at no panels (row-major)."""
    for linear, module, weight in layers:
        has = make or module.panel_copy is not None
        linear.wp = f32_panels(module, weight).data_ptr() if has else None


def _f32_layers(specs: list[Linear], modules: list[nn.Module]) -> list[tuple[Linear, nn.Module, torch.Tensor]]:
    """The float32 ones among layers' C descriptions, with their modules and weights."""
    return [(spec, module, _float32_weights(module)[0]) for spec, module in zip(specs, modules) if spec.fmt == 0]


def _model_spec(model: GPTModel) -> tuple[Model, list] | None:
    """The C description of a model whose blocks are all fused, or None if its embeddings, final
    norm or head cannot run in C."""
    blocks = list(model.trf_blocks)
    tables = (model.tok_emb.weight, model.pos_emb.weight, model.final_norm.scale, model.final_norm.shift)
    if (not blocks or any(type(block) is not FusedTransformerBlock for block in blocks)
            or any(p.dtype != torch.float32 or not p.is_contiguous() for p in tables)):
        return None
    keep = [p.detach() for p in tables]
    head = _linear_spec(model.out_head, keep)
    if head is None:
        return None
    pointers = (ctypes.c_void_p * len(blocks))(*(ctypes.addressof(block.c_block.spec) for block in blocks))
    keep.append(pointers)
    (vocab, d), positions = tables[0].shape, tables[1].shape[0]
    spec = Model(len(blocks), d, vocab, positions, *(_ptr(p) for p in keep[:2]), ctypes.addressof(pointers),
                  *(_ptr(p) for p in keep[2:4]), model.final_norm.eps, head)
    return spec, keep


class FusedGPTModel(GPTModel):
    """A GPTModel whose decode steps run in C, whole (see the module docstring). The modules the C
    step stands in for (embeddings, blocks, final norm, head) are called as modules only by
    PyTorch's path, so while any of them has a forward hook, every step goes that way."""

    c_model: CModel | None = None  # set by fuse_blocks

    def forward(self, in_idx: torch.Tensor, *, cache: KVCache | None = None, positions: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, last_only: bool = False,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        b, t = in_idx.shape
        c = self.c_model
        step = self._c_step(c.spec, in_idx, cache, positions, attention_mask) if (
            c is not None and cache is not None and targets is None and b <= MAX_ROWS
            and (t == 1 or last_only and b * t <= c.rows)
            and not self.training and not torch.is_grad_enabled() and in_idx.device.type == "cpu"
            and not any(c.hook_dicts)) else None
        if step is None:
            return super().forward(in_idx, cache=cache, positions=positions, attention_mask=attention_mask,
                                   last_only=last_only, targets=targets)
        return step

    def _c_step(self, spec: Model, in_idx: torch.Tensor, cache: KVCache, positions: torch.Tensor | None,
                attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """(B, 1, V) logits of the last of T new tokens per row (a decode step: T = 1; a short
        prefill) in C, or None where C cannot take it (then nothing has changed): a cache of other
        rows, layout or dtype, a position past the cache or outside the tables, a token outside
        the vocabulary."""
        (b, t), start = in_idx.shape, cache.length
        keys, values = cache.keys, cache.values  # (layers, B, heads, max_len, head_dim or Q8_0's row)
        if (start + t > cache.max_len or keys.shape[1] != b or not _cache_readable(keys, values, self.cfg.head_dim)
                or (attention_mask is not None
                    and (attention_mask.shape[0] != b or attention_mask.shape[1] < start + t))):
            return None
        if positions is None:
            positions = (torch.full((b, 1), start, dtype=torch.int64) if t == 1
                         else torch.arange(start, start + t, dtype=torch.int64).expand(b, t).contiguous())
        else:
            positions = positions.to(torch.int64)
            if positions.numel() not in (t, b * t):
                return None
            positions = positions.reshape(-1, t).expand(b, t).contiguous()
        # (B, start + T) bytes; a query always sees itself (block.c)
        mask = None if attention_mask is None else (attention_mask[:, :start + t] != 0).contiguous()
        # float32 layers multiply several rows through their panels: made for a batch, used by a
        # prefill of one row where a batch has made them (else their row-major weights)
        if b * t > 1:
            self._point_at_panels(make=b > 1)
        ids = in_idx.to(torch.int64).contiguous()
        work = torch.empty(2 * b * t * self.cfg.emb_dim)
        logits = torch.empty(b, spec.head.n)
        failed = call("gf_model_decode", ctypes.addressof(spec), ids.data_ptr(), positions.data_ptr(), b, t,
                      keys.data_ptr(), values.data_ptr(), keys.stride(0), keys.stride(1), keys.shape[3], start,
                      KV_FORMATS[keys.dtype], _ptr(mask), work.data_ptr(), logits.data_ptr(),
                      torch.get_num_threads())
        if failed:
            return None
        cache.length = start + t
        return logits[:, None]

    def _point_at_panels(self, make: bool = True) -> None:
        """Point every float32 layer of the C step at its panels (made, or remade, where needed;
        with make=False, only those made before, the others at their row-major weights)."""
        for block in self.trf_blocks:
            _point_at_panels(block.c_block.f32_layers, make)
        _point_at_panels(self.c_model.f32_head, make)


def make_panels(model: nn.Module) -> None:
    """Make a FusedGPTModel's float32 panels now, which its first decode step of a batch would make
    (GPT-2 124M: ~0.6 s, a stall of every sequence in that step): for a server, at start. Does
    nothing for other models, and for int8/4-bit ones (their weights are stored in panels)."""
    if type(model) is FusedGPTModel:
        model._point_at_panels()


class _LastMask:
    """The last attention mask given to a block, as C reads it: every block of a forward pass gets
    the same one, made once."""

    def __init__(self):
        self.key: tuple = ()  # (the mask given, rows, start)
        self.mask: torch.Tensor | None = None  # its (rows, start + 1) bytes

    def rows(self, attn_mask: torch.Tensor, b: int, start: int) -> torch.Tensor:
        if not (self.key and self.key[0] is attn_mask and self.key[1:] == (b, start)):
            self.mask = attn_mask.expand(b, 1, 1, start + 1).reshape(b, start + 1).contiguous()
            self.key = (attn_mask, b, start)
        return self.mask


_LAST_MASK = _LastMask()


def fuse_blocks(model: nn.Module, panels: bool = True) -> None:
    """Turn each block of a prepared model into a FusedTransformerBlock where the kernels can run
    it, and the model into a FusedGPTModel where they run every block and the head (in place;
    parameters and keys unchanged). panels=False: float32 layers always read their row-major
    weights (no second copy in the kernels' panel order for a batch's steps, which would not see
    an in-place change of the weights made through `.data`: an inference view's choice)."""
    if library() is None:
        return
    for block in getattr(model, "trf_blocks", []):
        if type(block) is TransformerBlock:
            spec = _block_spec(block)
            if spec is not None:
                block.__class__ = FusedTransformerBlock
                # float32 layers: where a step of several rows points the C block at their panels
                named = block._linears()
                f32 = _f32_layers([getattr(spec[0], name) for name in named], list(named.values())) if panels else []
                block.c_block = CBlock(*spec, f32)
    spec = _model_spec(model) if type(model) is GPTModel else None
    if spec is not None:
        model.__class__ = FusedGPTModel
        # the forward hooks of the modules the C step stands in for: their dicts, which registering a
        # hook adds to (a check of ~15 modules' attributes each step cost ~20 us after the C call)
        modules = (model.tok_emb, model.pos_emb, *model.trf_blocks, model.final_norm, model.out_head)
        hook_dicts = tuple(d for m in modules for d in (m._forward_hooks, m._forward_pre_hooks))
        f32_head = _f32_layers([spec[0].head], [model.out_head]) if panels else []
        # the most tokens of a prefill in C: PREFILL_ROWS, within every layer's kernel_rows
        bounds = [getattr(m, "kernel_rows", None) for b in model.trf_blocks for m in b._linears().values()]
        rows = min([PREFILL_ROWS] + [bound for bound in bounds if bound is not None])
        model.c_model = CModel(*spec, hook_dicts, f32_head, rows)
