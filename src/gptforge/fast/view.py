"""`inference_view(model)`: the float32 fast layout of a model, made beside it without changing it
and reading its own weights, what `generate`, `generate_text` and `stream_text` decode with."""

from __future__ import annotations

import copy
import weakref

import torch
import torch.nn as nn

from ..lora import has_lora, merge_lora
from ..model import GPTModel
from . import kernels
from .linears import Float32Linear, PackedLinear, _WeightOnlyLinear
from .policy import choose_mode
from .prepare import _prepare_float32

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
    weight the kernels cannot read where it is (`kernels.reads_in_place`) is copied into the
    view, so its version counter (bumped by every in-place change through autograd's tensors:
    optimizer steps, load_state_dict) is part of it."""
    return (tuple(type(m) for m in model.modules()),
            *((p.data_ptr(), p.shape, p.stride(), p.dtype, p.device,
               0 if p.is_contiguous() or p.dim() == 2 and kernels.reads_in_place(p) else p._version)
              for p in model.parameters()))


def _prepared(model: nn.Module) -> bool:
    """Whether `prepare_for_inference` has made `model` over (its layers are the fast path's)."""
    return any(isinstance(m, (Float32Linear, PackedLinear, _WeightOnlyLinear)) or getattr(m, "fused_qkv", None) is not None
               for m in model.modules())


def inference_view(model: nn.Module) -> nn.Module:
    """The float32 inference layout of `prepare_for_inference`, as a separate, cached module that
    computes the same function as `model` without changing it: `model`'s parameters, state dict,
    training flag and optimizer see nothing. The view holds no weights of its own: it multiplies
    `model`'s own tensors (query, key and value as three products, a batch's rows from the
    row-major weights), so any change to their values, however made, is in its next output; it is
    made anew when a parameter is replaced by another tensor or the module tree changes. Weights
    stored transposed (a Hugging Face checkpoint mapped without a copy) are read in place too;
    only a layout the kernels cannot read (`kernels.reads_in_place`) is laid out row-major
    once, and the view made anew when such a weight changes in place. A model
    with LoRA adapters gets a new view each call (its merged weights are new tensors). Returned
    unchanged: a model that is not a plain float32 GPTModel on CPU, or one already prepared."""
    blocks = getattr(model, "trf_blocks", None)
    first = next(model.parameters(), None)
    if (type(model) is not GPTModel or blocks is None or first is None or first.dtype != torch.float32
            or first.device.type != "cpu" or _prepared(model)):
        return model
    key = _weights_key(model)
    cached = _VIEWS.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        view = _shallow_module_copy(model, {}).eval()
        merge_lora(view)
        _prepare_float32(view, choose_mode("float32").kernel_rows, panels=False)
    if not has_lora(model):
        _VIEWS[model] = (key, view)
    return view
