"""The book's state dicts: `torch.save(model.state_dict(), "model.pth")` from llms-from-scratch
(also its chapter 5 model+optimizer dict, torch.compile/DDP prefixes, or a .safetensors of the same
keys). Only a file's tensors say its shape, so `config=` is accepted for widths GPT-2 never had."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..config import GPTConfig, as_config
from ..errors import GptforgeError
from ..io import read_safetensors
from ..model import GPTModel
from .base import CheckpointFormat, build_model, torch_load


def detect(path: Path) -> bool:
    """Any single file: the last format asked, after those that recognise a file by its header."""
    return path.is_file()


# n_heads cannot be read from shapes: GPT-2's four widths have these (64-dimensional heads).
_BOOK_HEADS = {768: 12, 1024: 16, 1280: 20, 1600: 25}
_BOOK_MASK = re.compile(r"^trf_blocks\.\d+\.att\.mask$")  # the book's causal-mask buffer


def book_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a book state dict file under the book's keys, wrappers and mask buffers removed."""
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    loaded = torch_load(path)
    if isinstance(loaded, dict) and isinstance(loaded.get("model_state_dict"), dict):
        loaded = loaded["model_state_dict"]  # the book's chapter 5 saves model and optimizer together
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise GptforgeError(f"{path} does not hold a state dict (a dict of tensors)")
    state = {}
    for key, tensor in loaded.items():
        key = key.removeprefix("_orig_mod.").removeprefix("module.")  # torch.compile / DDP wrappers
        if not _BOOK_MASK.match(key):
            state[key] = tensor
    return state


def book_config(state: Mapping[str, torch.Tensor], source: str,
                config: GPTConfig | Mapping[str, Any] | str | None) -> GPTConfig:
    """The shape of a book state dict, read from its tensors; `config` (checked against them)
    supplies n_heads for widths other than GPT-2's four."""
    emb = state.get("tok_emb.weight")
    pos = state.get("pos_emb.weight")
    if emb is None or pos is None:
        raise GptforgeError(f"{source}: no tok_emb.weight/pos_emb.weight: not a state dict of the book's "
                         f"GPTModel (for Hugging Face weights pass their directory with config.json)")
    vocab_size, emb_dim = emb.shape
    n_layers = len({k.split(".")[1] for k in state if k.startswith("trf_blocks.")})
    head = state.get("out_head.weight")
    tied = head is not None and head.untyped_storage().data_ptr() == emb.untyped_storage().data_ptr()
    inferred = dict(vocab_size=vocab_size, context_length=pos.shape[0], emb_dim=emb_dim,
                    n_layers=n_layers, qkv_bias="trf_blocks.0.att.W_query.bias" in state, tie_weights=tied)
    if config is not None:
        cfg = as_config(config)
        diffs = {k: (getattr(cfg, k), v) for k, v in inferred.items() if getattr(cfg, k) != v}
        if diffs:
            raise GptforgeError(f"{source} does not match the given config: " + ", ".join(
                f"{k} is {got} in the file, {want} in the config" for k, (want, got) in diffs.items()))
        return cfg
    if emb_dim not in _BOOK_HEADS:
        raise GptforgeError(f"{source}: a state dict of width {emb_dim} does not say its number of heads; "
                         f"pass config= to gptforge.load (e.g. the book's GPT_CONFIG dict) or --config "
                         f"CONFIG.json (a GPTConfig as JSON) on the command line")
    return GPTConfig(**inferred, n_heads=_BOOK_HEADS[emb_dim])


def load_book(path: Path, dtype: torch.dtype | None,
              config: GPTConfig | Mapping[str, Any] | str | None) -> GPTModel:
    """The model in a book state dict file (`config` as in `book_config`)."""
    state = book_state(path)
    cfg = book_config(state, str(path), config)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return build_model(cfg, state, str(path))


# ----------------------------------------------------------------------------------------------


FORMAT = CheckpointFormat("book", detect, load_book, lambda path, config: book_config(book_state(path), str(path), config),
                          takes_config=True)
