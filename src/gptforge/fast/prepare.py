"""`prepare_for_inference(model, dtype, quantize)`: a GPTModel made fast for generation, in place
(the layouts and layers of `linears.py`, the blocks in C of `blocks.py`, by `policy.choose_mode`)."""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
import torch.nn as nn

from ..cpu import cpu_flags, has_bf16_hardware
from ..errors import GptforgeError
from ..lora import merge_lora
from ..model import KV_Q8_0, GPTModel
from . import kernels
from .blocks import fuse_blocks
from .linears import Bf16Linear, Float32Linear, Int4Linear, Int8Linear, PackedLinear
from .policy import DTYPES, _packed_bf16_available, choose_mode


def _swap_linears(module: nn.Module, make: Any) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, make(child))
        else:
            _swap_linears(child, make)


def _pack_linears(model: nn.Module, in_place: bool) -> None:
    """Make every plain nn.Linear a Float32Linear (in place: parameters and keys unchanged), its
    weight stored (out, in) contiguous as the kernels read it fastest, laid out anew where it is
    not; in_place: Hugging Face's (in, out) is kept as it is where the kernels read it there too
    (`kernels.reads_in_place`: no copy, the first logits sooner, the decode steps at 0.8-1.0x the speed)."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = Float32Linear
            weight = module.weight
            if not weight.is_contiguous() and not (in_place and kernels.reads_in_place(weight)):
                module.weight.data = kernels.row_major([weight.data])


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
    _warn_emulated_bf16(torch_dtype, device_type)
    model.eval()
    merge_lora(model)  # the layouts below read plain Linear weights: adapters are added into them first
    weight_only = {"int8": Int8Linear, "int4": Int4Linear}.get(quantize)
    if device_type == "cpu" and weight_only is None and torch_dtype == torch.bfloat16 and kernels.available():
        weight_only = Bf16Linear  # bf16 weights on gptforge's kernels, float32 activations
        _round_to_bf16_as_float32(model)
    else:
        model.to(torch_dtype)
    if device_type != "cpu":
        return model
    if weight_only is not None:
        make = functools.partial(weight_only, prefill_dtype=mode.prefill_dtype, kernel_rows=mode.kernel_rows)
        _fuse_qkv(model, lambda att: make(_concat_qkv(att)))
        _drop_separate_qkv(model)
        _swap_linears(model, make)
        _own_memory(model)
        if kernels.available() and (torch_dtype == torch.float32 or weight_only is Bf16Linear):
            fuse_blocks(model)
            if weight_only is not Bf16Linear:
                # the cache as Q8_0 rows: a quarter of float32's bytes for attention to read (fp16's half)
                model.kv_dtype = KV_Q8_0 if model.cfg.head_dim % 32 == 0 else torch.float16
    elif torch_dtype == torch.bfloat16 and _packed_bf16_available():
        _prepare_packed_bf16(model)
    elif torch_dtype == torch.float32:
        _prepare_float32(model, mode.kernel_rows)
    return model


def _warn_emulated_bf16(torch_dtype: torch.dtype, device_type: str) -> None:
    """Say so when bf16 asked for by name would run on PyTorch's emulated bf16 products here ('auto'
    never chooses that): a CPU without bf16 hardware where gptforge's kernels (whose bf16 weights
    meet float32 activations: Bf16Linear) do not run."""
    flags = cpu_flags()
    if (torch_dtype == torch.bfloat16 and device_type == "cpu" and flags and not kernels.available()
            and not has_bf16_hardware(flags)):
        warnings.warn("gptforge: this CPU has no bf16 hardware, so PyTorch emulates bf16 matrix products (0.3 "
                      "GFLOP/s measured on an AVX2-only EPYC): --dtype float32 (or auto) or --quantize int8 "
                      "run far faster here", stacklevel=3)


def _round_to_bf16_as_float32(model: nn.Module) -> None:
    """Every parameter but the linears' weights (embeddings, norms, biases) takes its bf16 value,
    held as float32 as the C step reads it; the linears' weights are rounded as Bf16Linear stores
    them (not twice)."""
    model.float()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not (isinstance(module, nn.Linear) and name == "weight"):
                param.data = param.data.to(torch.bfloat16).float()


def _prepare_packed_bf16(model: nn.Module) -> None:
    """bf16 where gptforge's kernels do not run: every Linear pre-packed for oneDNN (PackedLinear),
    query/key/value one matrix, the feed-forward's GELU fused into its first product."""
    _fuse_qkv(model, lambda att: PackedLinear(_concat_qkv(att)))
    _drop_separate_qkv(model)
    for block in getattr(model, "trf_blocks", []):  # Linear -> GELU becomes one fused kernel
        layers = block.ff.layers
        layers[0], layers[1] = PackedLinear(layers[0], gelu_tanh=True), nn.Identity()
    _swap_linears(model, PackedLinear)
    _own_memory(model)


def _own_memory(model: nn.Module) -> None:
    """Give every parameter left (embeddings, norms) memory of its own. A loaded checkpoint's
    tensors are views of the file's bytes, read (or mapped) as one block: once the linear weights
    are replaced by converted ones, an embedding table still viewing the block would keep all of it
    alive, the float32 weights included (GPT-2 1558M int8: 6.2 GB of them beside the 1.6 GB it
    decodes with). The converted layers' own tensors (their biases too) are new already."""
    for param in model.parameters():
        param.data = param.data.clone()


def _prepare_float32(model: nn.Module, kernel_rows: int | None, panels: bool = True) -> None:
    """The float32 layout on CPU: Linears as Float32Linear, the blocks and model in C where the
    kernels run, every weight they read the model's own tensor (query, key and value three
    products: fusing them would copy them beside the model's own, 1.5 GB more at GPT-2 1558M),
    except one stored transposed (a Hugging Face file mapped as it is), which is laid out anew.
    panels=True (`prepare_for_inference`): a batch's decode steps read a second copy of the
    weights in the kernels' panel order, made on its first such step. False (an inference view,
    which copies nothing): always the weights as stored, a Hugging Face layout read in place."""
    _pack_linears(model, in_place=not panels)
    for module in model.modules():
        if isinstance(module, Float32Linear):
            module.kernel_rows = kernel_rows
    fuse_blocks(model, panels=panels)
