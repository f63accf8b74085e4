"""Checkpoints: turning a name or a path into a model, and a model back into files.

The front: `resolve` (what a name means), `detect_format`, `load`, `load_config`, `save`. Each
format lives in its own module and is found through the table `FORMATS`:
- `native` (gptforge): model.safetensors + config.json with checksums (+ training_state.pt);
- `adapter` ("lora"): a native directory holding only LoRA adapters (+ a classifier's head) and
  naming its base model by path and checksum; asked before `native`;
- `hf`: Hugging Face GPT-2 directories (exported with GPT-2's tokenizer files);
- `gguf`: llama.cpp's single-file format, GPT-2 architecture (tokenizer embedded, f32 to q4_0);
- `book`: the book's `.pth` state dicts (any single file: it stays last).
`hub` turns hub ids into local Hugging Face directories; `base` holds what formats share.

Adding a format: write `checkpoint/<name>.py` with `detect`, `load`, `load_config`
(and `save` if it can be written) and a `FORMAT = CheckpointFormat(...)` (see `base.py`), then add
`<name>.FORMAT` to `FORMATS` below, before `book` when it is recognised as a single file.

Every write is atomic (`gptforge.io`); pickles are only read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..config import PRESETS, GPTConfig, preset
from ..device import resolve_device
from ..errors import GptforgeError, did_you_mean
from ..lora import has_lora
from ..io import atomic_directory, atomic_write, atomic_write_bytes, read_safetensors, sha256_file
from ..model import GPTModel
from ..options import check_path
from . import adapter, book, gguf, hf, hub, native
from .base import (
    CHECKPOINT_FILES, CONFIG_FILE, FORMAT_NAME, FORMAT_VERSION, HF_BIN_FILE, RUN_CHECKPOINT_DIR,
    TRAINING_STATE_FILE, WEIGHTS_FILE, CheckpointFormat, build_model, model_state,
)
from .hf import config_from_hf, config_to_hf, save_hf, state_from_hf, state_to_hf
from .native import load_training_state

# Every format, in the order `detect_format` asks them (the first that recognises a path wins).
FORMATS: dict[str, CheckpointFormat] = {
    fmt.name: fmt for fmt in (adapter.FORMAT, native.FORMAT, hf.FORMAT, gguf.FORMAT, book.FORMAT)}
SAVE_FORMATS = tuple(name for name, fmt in FORMATS.items() if fmt.save is not None)

__all__ = [
    "BUILTIN_MODELS", "CHECKPOINT_FILES", "CONFIG_FILE", "FORMATS", "FORMAT_NAME", "FORMAT_VERSION",
    "HF_BIN_FILE", "RUN_CHECKPOINT_DIR", "SAVE_FORMATS", "TRAINING_STATE_FILE", "WEIGHTS_FILE", "CheckpointFormat",
    "atomic_directory", "atomic_write", "atomic_write_bytes", "build_model", "builtin_model_path",
    "config_from_hf", "config_to_hf", "detect_format", "load", "load_config", "load_training_state",
    "model_state", "read_safetensors", "resolve", "resolve_device", "save", "save_hf", "sha256_file",
    "state_from_hf", "state_to_hf",
]


def save(model: GPTModel, out_dir: str | Path, format: str = "gptforge",
         training_state: dict[str, Any] | None = None, gguf_type: str | None = None) -> Path:
    """Write `model` to the directory `out_dir`, atomically (an existing one is replaced whole).

    format "gptforge": model.safetensors + config.json (GPTConfig fields, format version, sha256 of
        each file) + training_state.pt when `training_state` is given (a dict of optimizer and
        scheduler state dicts, RNG state tensors and plain numbers/strings: whatever
        `torch.load(weights_only=True)` can read back: tensors, numbers, strings, lists, dicts;
        anything else is a ValueError before a byte is written).
    format "hf": a Hugging Face GPT-2 directory (config.json + model.safetensors, and for GPT-2's
        vocabulary its tokenizer files and generation_config.json) that
        `transformers.GPT2LMHeadModel.from_pretrained` and `AutoTokenizer` load.
    format "gguf": `out_dir` is one file (model.gguf) that llama.cpp runs as is: GPT-2's tokenizer
        embedded, weight matrices in `gguf_type` ('f32' by default, 'f16', 'bf16', 'q8_0', 'q4_0').
    Weights are written in the model's dtype (gguf: in `gguf_type`). Returns `out_dir` as a Path.
    """
    if not str(check_path("out_dir", out_dir)).strip():  # Path("") is the current directory
        raise GptforgeError("the output path is empty; name a new directory (or a .gguf file)")
    if format not in SAVE_FORMATS:
        raise GptforgeError(f"unknown checkpoint format {format!r}; choose one of {', '.join(SAVE_FORMATS)}")
    if not isinstance(model, GPTModel):
        raise GptforgeError(f"save expects a gptforge GPTModel, got {type(model).__name__}")
    options = {} if gguf_type is None else {"gguf_type": gguf_type}
    if options and format != "gguf":
        raise GptforgeError(f"gguf_type is for format='gguf'; format {format!r} keeps the model's dtype")
    if has_lora(model):  # only the adapters (and a classifier's head) are written, naming the base
        if format != FORMAT_NAME:
            raise GptforgeError(f"a model with LoRA adapters is saved as a gptforge adapter checkpoint; for "
                                f"{format}, merge it first (gptforge convert --merge-lora)")
        return adapter.save_adapter(model, Path(out_dir), training_state)
    return FORMATS[format].save(model, Path(out_dir), training_state, **options)


def detect_format(path: str | Path) -> str:
    """The name of the format (a key of `FORMATS`: 'lora', 'gptforge', 'hf', 'gguf', 'book') of an existing
    checkpoint path; GptforgeError when no format recognises it, FileNotFoundError when absent."""
    path = Path(path)
    if not (path.is_dir() or path.is_file()):
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir() and not (path / CONFIG_FILE).is_file():
        raise GptforgeError(f"{path} is a directory without {CONFIG_FILE}: not a gptforge or "
                            f"Hugging Face checkpoint")
    for fmt in FORMATS.values():
        if fmt.detect(path):
            return fmt.name
    raise GptforgeError(f"{path / CONFIG_FILE} is neither a gptforge config (\"format\": \"gptforge\") nor a "
                        f"Hugging Face GPT-2 config (\"model_type\": \"gpt2\")")


# Models shipped inside the package (gptforge checkpoint directories under gptforge/assets/).
BUILTIN_MODELS = {"gptforge-shakespeare": "assets/gptforge-shakespeare"}


def builtin_model_path(name: str) -> Path | None:
    """The directory of a model shipped with gptforge, or None when `name` is not one."""
    relative = BUILTIN_MODELS.get(str(name).lower())
    return Path(__file__).parent.parent / relative if relative else None


def resolve(name_or_path: str | Path, weights: bool = True) -> tuple[str, Path | None]:
    """What a model name means: ('preset', None), or (format, local path) for a checkpoint on disk
    or a hub id (downloaded into, or found in, the Hugging Face cache; only its config.json when
    `weights` is False). A training run's --out folder means the checkpoint inside it."""
    name = str(check_path("the model (a preset name, a checkpoint path or a hub id)", name_or_path))
    if not name.strip():  # Path("") is ".", whatever happens to be there
        raise GptforgeError("no model given (an empty name); name a preset, a checkpoint or a hub id")
    path = Path(name)
    if name.lower() in PRESETS:
        return "preset", None
    if (builtin := builtin_model_path(name)) is not None:
        if not (builtin / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"the built-in model {name!r} is missing from this installation ({builtin})")
        return "gptforge", builtin
    if path.is_dir() and not (path / CONFIG_FILE).is_file() and (path / RUN_CHECKPOINT_DIR / CONFIG_FILE).is_file():
        path = path / RUN_CHECKPOINT_DIR  # a train/finetune run's --out folder: the model it saved
    if path.exists():
        return detect_format(path), path
    if "/" not in name and (hint := did_you_mean(name, [*PRESETS, *BUILTIN_MODELS])):
        raise FileNotFoundError(f"no preset or file named {name!r}{hint}")  # a typo, not a hub id
    if hub.looks_like_hub_id(name):
        snapshot = hub.hub_download(name, weights)
        return detect_format(snapshot), snapshot
    raise FileNotFoundError(f"no preset or file named {name!r}; presets are {', '.join(PRESETS)}")


# OpenAI's trained weights in each preset's shape, on the Hugging Face hub.
TRAINED_WEIGHTS = {"gpt2-124m": "gpt2", "gpt2-355m": "gpt2-medium", "gpt2-774m": "gpt2-large",
                   "gpt2-1558m": "gpt2-xl", "book-124m": "gpt2"}


def untrained_preset_note(name: str | Path) -> str | None:
    """A line for someone about to generate from a preset (random weights, gibberish by design),
    naming the hub id of OpenAI's trained weights in its shape; None when `name` is not a preset."""
    name = str(name).lower()
    if name not in PRESETS:
        return None
    return (f"{name} is an untrained preset (random weights), so its text is gibberish; for OpenAI's trained "
            f"GPT-2 in this shape use --model {TRAINED_WEIGHTS[name]} (from the Hugging Face hub)")


def _resolve_with_config(name_or_path: str | Path, config: Any, weights: bool = True) -> tuple[str, Path | None]:
    """`resolve`, refusing a `config` for anything but a book state dict (the others carry theirs)."""
    fmt, path = resolve(name_or_path, weights)
    if config is not None and (fmt == "preset" or not FORMATS[fmt].takes_config):
        raise GptforgeError(f"config= is only for the book's state dicts; {name_or_path} carries its own config")
    return fmt, path


def load(name_or_path: str | Path, *, device: str | torch.device = "cpu",
         dtype: torch.dtype | None = None,
         config: GPTConfig | Mapping[str, Any] | str | None = None) -> GPTModel:
    """A model, in eval mode, from any of:
    - a preset name (randomly initialised with the current torch seed: call `torch.manual_seed`
      first for a repeatable model);
    - a gptforge checkpoint directory (checksums verified);
    - a Hugging Face GPT-2 directory (config.json + model.safetensors or pytorch_model.bin);
    - a GPT-2 GGUF file (ours or llama.cpp's converter's; quantized weights dequantized to float32);
    - a book state dict file (`torch.save(model.state_dict(), "model.pth")`);
    - a Hugging Face hub id ("gpt2", "openai-community/gpt2-medium"), through the hub cache.

    dtype: convert floating weights to it (default: the dtype they were saved in).
    config: the shape of a book state dict, needed only when its width is not one of GPT-2's four
        (n_heads cannot be read from the tensors); other formats carry their own config.
    """
    device = resolve_device(device) if isinstance(device, str) else device  # a bad one fails first
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise GptforgeError(f"dtype must be a floating torch.dtype (torch.float32, torch.bfloat16, torch.float16) "
                            f"or None, got {dtype!r}")
    fmt, path = _resolve_with_config(name_or_path, config)
    if fmt == "preset":
        model = GPTModel(preset(str(name_or_path)))
    else:
        model = FORMATS[fmt].load(path, dtype, config)
    model.to(device=device, dtype=dtype)
    return model.eval()


def load_config(name_or_path: str | Path,
                config: GPTConfig | Mapping[str, Any] | str | None = None) -> GPTConfig:
    """The GPTConfig of a preset or checkpoint, reading only config.json where there is one
    (`config` as in `load`, for book state dicts)."""
    fmt, path = _resolve_with_config(name_or_path, config, weights=False)
    if fmt == "preset":
        return preset(str(name_or_path))
    return FORMATS[fmt].load_config(path, config)
