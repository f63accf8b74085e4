"""Checkpoints: turning a name or a path into a model, and a model back into files.

Formats
- gptforge (ours): a directory with `model.safetensors`, `config.json` (the GPTConfig fields, the
  format version and the sha256 of every file) and, when training, `training_state.pt`.
- Hugging Face GPT-2: a directory with `config.json` and `model.safetensors` or `pytorch_model.bin`
  (GPT2LMHeadModel or bare GPT2Model keys). Conv1D weights are stored (in, out): they are
  transposed here, at the boundary, and the fused `c_attn` is split into W_query/W_key/W_value.
- The book's state dicts: `torch.save(model.state_dict(), "model.pth")` from llms-from-scratch.

Every write goes to a temporary name, is fsynced and then renamed into place, so a crash leaves
either the old checkpoint or the new one, never half of one. Pickled files are only ever read with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .config import PRESETS, GPTConfig, as_config, preset
from .model import GPTModel

FORMAT_NAME = "gptforge"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TRAINING_STATE_FILE = "training_state.pt"
HF_BIN_FILE = "pytorch_model.bin"
SAVE_FORMATS = ("gptforge", "hf")


# ----------------------------------------------------------------------------------------------
# Atomic writes


def _fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write one file atomically: `write(tmp_path)` fills a temporary file beside `path`, which is
    fsynced and renamed over `path`. On any error the temporary file is removed and `path` is
    left as it was. Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """`atomic_write` for bytes already in memory (a JSON file, a small state)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path) -> Iterator[Path]:
    """Build a directory atomically: yields an empty temporary directory beside `out_dir`; when
    the block ends without error its files are fsynced and it replaces `out_dir` (an existing
    `out_dir` is moved aside first and deleted last, so a crash leaves one complete copy)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a directory; choose another output path")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield tmp
        for file in tmp.iterdir():
            _fsync_file(file)
        _fsync_dir(tmp)
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
        os.replace(tmp, out_dir)
        _fsync_dir(out_dir.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Safetensors, read with one copy: each tensor is allocated once and filled with readinto, so the
# peak is the weights plus nothing (no mmap pages counted twice, no intermediate buffers).

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors(path: str | Path, keep: Callable[[str], bool] = lambda name: True,
                     dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file whose names pass `keep`, on the CPU, converted to `dtype`
    (floating tensors only) when given. Raises ValueError for a truncated or malformed file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is truncated: {size} bytes, too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise ValueError(f"{path} is truncated or not a safetensors file: its header claims "
                             f"{header_len} bytes but the file has {size}")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is corrupted: its safetensors header is not valid JSON ({err})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path} is corrupted: its safetensors header is not a JSON object")
        base = 8 + header_len
        tensors: dict[str, torch.Tensor] = {}
        for name, info in header.items():
            if name == "__metadata__" or not keep(name):
                continue
            try:
                file_dtype = _ST_DTYPES[info["dtype"]]
                shape = [int(n) for n in info["shape"]]
                begin, end = (int(n) for n in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{path} is corrupted: bad header entry for tensor {name!r}") from None
            if base + end > size:
                raise ValueError(f"{path} is truncated: tensor {name!r} ends at byte {base + end} "
                                 f"but the file has {size} bytes; save or download it again")
            tensor = torch.empty(shape, dtype=file_dtype)
            nbytes = tensor.numel() * tensor.element_size()
            if nbytes != end - begin:
                raise ValueError(f"{path} is corrupted: tensor {name!r} of shape {shape} needs "
                                 f"{nbytes} bytes, its header gives {end - begin}")
            if nbytes:
                f.seek(base + begin)
                view = tensor.view(-1).view(torch.uint8).numpy()
                if f.readinto(memoryview(view)) != nbytes:
                    raise ValueError(f"{path} is truncated in tensor {name!r}")
            if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                tensor = tensor.to(dtype)
            tensors[name] = tensor
    return tensors


def _write_safetensors(tensors: Mapping[str, torch.Tensor], path: Path,
                       metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)


# ----------------------------------------------------------------------------------------------
# Building a model from a state dict in the book's key layout


def _model_state(model: GPTModel) -> dict[str, torch.Tensor]:
    """The model's tensors under the book's keys, without the tied head (it is the embedding)."""
    state = model.state_dict()
    if model.cfg.tie_weights:
        state.pop("out_head.weight", None)
    return state


def _expected_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = GPTModel(cfg)
    return {k: tuple(v.shape) for k, v in _model_state(model).items()}


def build_model(cfg: GPTConfig, state: Mapping[str, torch.Tensor], source: str) -> GPTModel:
    """A GPTModel (eval mode, on the CPU) that takes ownership of `state`'s tensors (book keys; a
    tied model needs no `out_head.weight`) without allocating a second copy. Missing, unexpected
    or wrongly shaped tensors raise ValueError naming them and `source`."""
    expected = _expected_shapes(cfg)
    state = dict(state)
    if cfg.tie_weights:
        head = state.pop("out_head.weight", None)
        if head is not None and head.shape != state.get("tok_emb.weight", head).shape:
            raise ValueError(f"{source}: tied output head has shape {tuple(head.shape)}, expected "
                             f"{expected['tok_emb.weight']}")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors {_short(unexpected)}")
        raise ValueError(f"{source}: {'; '.join(parts)} (is the file from another model or config?)")
    for name, shape in expected.items():
        got = tuple(state[name].shape)
        if got != shape:
            hint = ""
            if name in ("tok_emb.weight", "out_head.weight") and got[1:] == shape[1:]:
                hint = f" (the file has vocab_size {got[0]}, the config {cfg.vocab_size})"
            raise ValueError(f"{source}: tensor {name} has shape {got}, the config expects {shape}{hint}")
    dtypes = {t.dtype for t in state.values()}
    if len(dtypes) > 1:  # mixed precision on disk: one model dtype, the widest
        wide = max(dtypes, key=lambda d: torch.finfo(d).bits if d.is_floating_point else 0)
        state = {k: v.to(wide) for k, v in state.items()}
    with torch.device("meta"):
        model = GPTModel(cfg)
    if cfg.tie_weights:
        state["out_head.weight"] = state["tok_emb.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_weights:
        model.out_head.weight = model.tok_emb.weight  # one tensor again: assign made two Parameters
    return model.eval()


def _short(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


# ----------------------------------------------------------------------------------------------
# Our format


def save(model: GPTModel, out_dir: str | Path, format: str = "gptforge",
         training_state: dict[str, Any] | None = None) -> Path:
    """Write `model` to the directory `out_dir`, atomically (an existing one is replaced whole).

    format "gptforge": model.safetensors + config.json (GPTConfig fields, format version, sha256 of
        each file) + training_state.pt when `training_state` is given (a dict of optimizer and
        scheduler state dicts, RNG state tensors and plain numbers/strings: whatever
        `torch.load(weights_only=True)` can read back).
    format "hf": a Hugging Face GPT-2 directory (config.json + model.safetensors) that
        `transformers.GPT2LMHeadModel.from_pretrained` loads.
    Weights are written in the model's dtype. Returns `out_dir` as a Path.
    """
    if format not in SAVE_FORMATS:
        raise ValueError(f"unknown checkpoint format {format!r}; choose one of {', '.join(SAVE_FORMATS)}")
    if not isinstance(model, GPTModel):
        raise ValueError(f"save expects a gptforge GPTModel, got {type(model).__name__}")
    if format == "hf":
        if training_state is not None:
            raise ValueError("the Hugging Face format holds no training state; save with format='gptforge'")
        return save_hf(model, out_dir)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        _write_safetensors(_model_state(model), tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        files = [WEIGHTS_FILE]
        if training_state is not None:
            if not isinstance(training_state, dict):
                raise ValueError(f"training_state must be a dict, got {type(training_state).__name__}")
            torch.save(training_state, tmp / TRAINING_STATE_FILE)
            files.append(TRAINING_STATE_FILE)
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            **model.cfg.to_dict(),
            "dtype": str(model.tok_emb.weight.dtype).removeprefix("torch."),
            "sha256": {name: sha256_file(tmp / name) for name in files},
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the checkpoint is corrupted") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _read_gptforge_meta(ckpt_dir: Path) -> tuple[dict[str, Any], GPTConfig]:
    meta = _read_json(ckpt_dir / CONFIG_FILE)
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{ckpt_dir}: gptforge checkpoint format version {version!r} is not supported "
                         f"(this gptforge reads version {FORMAT_VERSION}); upgrade gptforge")
    fields = {k: v for k, v in meta.items() if k not in ("format", "format_version", "dtype", "sha256")}
    try:
        cfg = GPTConfig.from_dict(fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{ckpt_dir / CONFIG_FILE}: bad model config: {err}") from None
    if not isinstance(meta.get("sha256"), dict):
        raise ValueError(f"{ckpt_dir / CONFIG_FILE} has no sha256 table; the checkpoint is corrupted")
    return meta, cfg


def _verify(ckpt_dir: Path, meta: Mapping[str, Any], name: str) -> Path:
    path = ckpt_dir / name
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt_dir}: {name} is missing; the checkpoint is incomplete")
    expected = meta["sha256"].get(name)
    if expected is None:
        raise ValueError(f"{ckpt_dir / CONFIG_FILE} lists no sha256 for {name}; the checkpoint is corrupted")
    actual = sha256_file(path)
    if actual != expected:
        raise ValueError(f"{path} fails its checksum (sha256 {actual[:12]}..., config.json says "
                         f"{expected[:12]}...): the file is truncated or corrupted; restore or re-save it")
    return path


def _load_gptforge(ckpt_dir: Path, dtype: torch.dtype | None) -> GPTModel:
    meta, cfg = _read_gptforge_meta(ckpt_dir)
    weights = _verify(ckpt_dir, meta, WEIGHTS_FILE)
    state = read_safetensors(weights, dtype=dtype)
    return build_model(cfg, state, str(weights))


def load_training_state(ckpt_dir: str | Path) -> dict[str, Any] | None:
    """The training state saved with a gptforge checkpoint (checksum verified, read with
    `torch.load(weights_only=True)`), or None when the checkpoint has none."""
    ckpt_dir = Path(ckpt_dir)
    if _detect_format(ckpt_dir) != "gptforge":
        raise ValueError(f"{ckpt_dir} is not a gptforge checkpoint directory; only those hold training state")
    meta, _ = _read_gptforge_meta(ckpt_dir)
    if TRAINING_STATE_FILE not in meta["sha256"]:
        return None
    path = _verify(ckpt_dir, meta, TRAINING_STATE_FILE)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise ValueError(f"{path} cannot be read as a training state: {err}") from None


# ----------------------------------------------------------------------------------------------
# Finding out what a path is


def _detect_format(path: Path) -> str:
    """'gptforge', 'hf' or 'book' for an existing path; ValueError when it is none of them."""
    if path.is_dir():
        config = path / CONFIG_FILE
        if not config.is_file():
            raise ValueError(f"{path} is a directory without {CONFIG_FILE}: not a gptforge or "
                             f"Hugging Face checkpoint")
        meta = _read_json(config)
        if meta.get("format") == FORMAT_NAME:
            return "gptforge"
        if meta.get("model_type") == "gpt2" or "n_embd" in meta:
            return "hf"
        raise ValueError(f"{config} is neither a gptforge config (\"format\": \"gptforge\") nor a "
                         f"Hugging Face GPT-2 config (\"model_type\": \"gpt2\")")
    return "book"


def load(name_or_path: str | Path, *, device: str | torch.device = "cpu",
         dtype: torch.dtype | None = None) -> GPTModel:
    """A model, in eval mode, from
    - a preset name (randomly initialised with the current torch seed: call `torch.manual_seed`
      first for a repeatable model), or
    - a gptforge checkpoint directory (checksums verified).

    dtype: convert floating weights to it (default: the dtype they were saved in).
    """
    name = str(name_or_path)
    path = Path(name)
    if name.lower() in PRESETS:
        model = GPTModel(preset(name))
    elif path.exists():
        fmt = _detect_format(path)
        if fmt == "gptforge":
            model = _load_gptforge(path, dtype)
        else:
            raise ValueError(f"{name}: loading {fmt} checkpoints is not supported yet")
    else:
        raise FileNotFoundError(
            f"no preset or file named {name!r}; presets are {', '.join(PRESETS)}"
        )
    model.to(device=device, dtype=dtype)
    return model.eval()
