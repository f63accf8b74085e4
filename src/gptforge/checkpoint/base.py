"""What every checkpoint format shares: file names, the format table's entry type, and building a
model from a state dict in the book's key layout (the one place tensors become a GPTModel)."""

from __future__ import annotations

import contextlib
import json
import math
import pickle
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..config import GPTConfig
from ..errors import GptforgeError
from ..io import short_list
from ..model import GPTModel

FORMAT_NAME = "gptforge"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# Where a run of `train` / `finetune` keeps its model, inside the run's --out folder.
RUN_CHECKPOINT_DIR = "checkpoint"
TRAINING_STATE_FILE = "training_state.pt"
HF_BIN_FILE = "pytorch_model.bin"

# Hugging Face's tokenizer and generation files, written beside an HF export of a GPT-2-vocabulary model.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                      "special_tokens_map.json")
GENERATION_CONFIG_FILE = "generation_config.json"

# What an existing output directory may hold for a save to replace it (ours and Hugging Face's).
CHECKPOINT_FILES = frozenset({CONFIG_FILE, WEIGHTS_FILE, TRAINING_STATE_FILE, HF_BIN_FILE,
                              GENERATION_CONFIG_FILE, *HF_TOKENIZER_FILES})

ConfigArg = GPTConfig | Mapping[str, Any] | str | None


@dataclass(frozen=True)
class CheckpointFormat:
    """One checkpoint format, as the front (`gptforge.checkpoint`) sees it. A new format is a module
    that builds one of these and one line in `checkpoint.FORMATS`.

    detect(path) -> bool: does this existing file or directory hold the format? Cheap (a config
        or a header, never the weights). Formats are asked in table order; the first yes wins.
    load(path, dtype, config) -> GPTModel on the CPU in eval mode, floating weights in `dtype`
        (None: as stored). `config` is None unless `takes_config`.
    load_config(path, config) -> GPTConfig, reading as little as possible.
    save(model, out_dir, training_state) -> out_dir, atomically; None for a read-only format.
    takes_config: the files do not carry the full shape (the book's state dicts), so `config=` is
        accepted; for every other format a config is refused as a mistake.
    """

    name: str
    detect: Callable[[Path], bool]
    load: Callable[[Path, torch.dtype | None, ConfigArg], GPTModel]
    load_config: Callable[[Path, ConfigArg], GPTConfig]
    save: Callable[[GPTModel, Path, dict[str, Any] | None], Path] | None = None
    takes_config: bool = False


def config_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`/config.json for a directory that has one, else None."""
    config = path / CONFIG_FILE
    return read_json(config) if path.is_dir() and config.is_file() else None


def model_state(model: GPTModel) -> dict[str, torch.Tensor]:
    """The model's tensors under the book's keys, without the tied head (it is the embedding)."""
    state = model.state_dict()
    if model.cfg.tie_weights:
        state.pop("out_head.weight", None)
    return state


_INITIALISERS = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_", "trunc_normal_")


@contextlib.contextmanager
def _no_weight_init() -> Iterator[None]:
    """Skip nn.init's initialisers (as transformers' no_init_weights does): on the meta device they
    compute nothing, yet their first call imports torch._dynamo, ~1-4 s of a cold start."""
    saved = {name: getattr(nn.init, name) for name in _INITIALISERS}
    try:
        for name in _INITIALISERS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def check_finite_weights(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or inf: such a model loads, then fails or talks nonsense at its
    first token. GptforgeError naming `source`, the first such tensor and how many values are bad."""
    for name, tensor in state.items():
        if not tensor.is_floating_point() or not tensor.numel():
            continue
        # one fast pass: a NaN or inf anywhere makes the sum NaN or inf (finite values rarely overflow it)
        if math.isfinite(float(tensor.sum(dtype=torch.float32))):
            continue
        bad = int((~torch.isfinite(tensor)).sum())
        if not bad:  # finite values whose sum overflowed float32
            continue
        raise GptforgeError(f"{source}: tensor {name} has {bad} of its {tensor.numel()} values not finite (NaN or "
                            "inf): the checkpoint is corrupted or was saved from a diverged run; use another one")


def build_model(cfg: GPTConfig, state: Mapping[str, torch.Tensor], source: str, *,
                check_finite: bool = True) -> GPTModel:
    """A GPTModel (eval mode, on the CPU) that takes ownership of `state`'s tensors (book keys; a
    tied model needs no `out_head.weight`) without allocating a second copy. Missing, unexpected
    or wrongly shaped tensors raise ValueError naming them and `source`, and so do weights that
    are not finite (`check_finite_weights`; `check_finite=False` skips that pass)."""
    with torch.device("meta"), _no_weight_init():  # shapes only: no memory until the state is assigned
        model = GPTModel(cfg)
    expected = {k: tuple(v.shape) for k, v in model_state(model).items()}
    state = dict(state)
    if cfg.tie_weights:
        head = state.pop("out_head.weight", None)
        if head is not None and head.shape != state.get("tok_emb.weight", head).shape:
            raise GptforgeError(f"{source}: tied output head has shape {tuple(head.shape)}, expected "
                             f"{expected['tok_emb.weight']}")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {short_list(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors {short_list(unexpected)}")
        raise GptforgeError(f"{source}: {'; '.join(parts)} (is the file from another model or config?)")
    for name, shape in expected.items():
        got = tuple(state[name].shape)
        if got != shape:
            hint = ""
            if name in ("tok_emb.weight", "out_head.weight") and got[1:] == shape[1:]:
                hint = f" (the file has vocab_size {got[0]}, the config {cfg.vocab_size})"
            raise GptforgeError(f"{source}: tensor {name} has shape {got}, the config expects {shape}{hint}")
    if check_finite:
        check_finite_weights(state, source)
    dtypes = {t.dtype for t in state.values()}
    if len(dtypes) > 1:  # mixed precision on disk: one model dtype, the widest
        wide = max(dtypes, key=lambda d: torch.finfo(d).bits if d.is_floating_point else 0)
        state = {k: v.to(wide) for k, v in state.items()}
    if cfg.tie_weights:
        state["out_head.weight"] = state["tok_emb.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_weights:
        model.out_head.weight = model.tok_emb.weight  # one tensor again: assign made two Parameters
    return model.eval()



def read_json(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON object (config.json, an index); corrupted or not an object: GptforgeError."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise GptforgeError(f"{path} is not valid JSON ({err}); the checkpoint is corrupted") from None
    if not isinstance(data, dict):
        raise GptforgeError(f"{path} must hold a JSON object")
    return data


def torch_load(path: Path) -> Any:
    """A pickled checkpoint, read safely (tensors and plain containers only). Every single file
    no other format claims ends here, so a file of the wrong kind is named as such."""
    if Path(path).suffix.lower() == ".gguf":  # gguf.detect found no magic bytes
        raise GptforgeError(f"{path} is not a GGUF file (it does not start with GGUF's magic bytes): is it "
                            "empty, truncated or another file renamed?")
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if head[:1] in (b"{", b"["):
        raise GptforgeError(f"{path} is JSON, not a checkpoint: give a checkpoint directory, GGUF file, state "
                            "dict or preset (a model config JSON is for `gptforge train --model`, or --config "
                            "beside a book state dict)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message is a page of advice to turn weights_only off
        raise GptforgeError(f"{path} cannot be read as a PyTorch state dict: it is not a weights-only pickle "
                            "(tensors and plain containers); is it a checkpoint?") from None
    except Exception as err:  # truncated zips, foreign pickles and more come as different types
        raise GptforgeError(f"{path} cannot be read as a PyTorch state dict ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); is it truncated or not a "
                         f"checkpoint? (only weights-only pickles are accepted)") from None

