"""gptforge's own checkpoint: a directory with `model.safetensors`, `config.json` (the GPTConfig
fields, the format version and the sha256 of every file, config.json's own included) and, when
training, `training_state.pt` (read only with `torch.load(weights_only=True)`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..config import GPTConfig
from ..errors import GptforgeError
from ..io import (
    atomic_directory, read_hashed, read_safetensors_from, sha256_file, sha256_of, write_file, write_safetensors,
)
from ..model import GPTModel
from ..options import check_path
from .base import (
    CHECKPOINT_FILES, CONFIG_FILE, FORMAT_NAME, FORMAT_VERSION, TRAINING_STATE_FILE, WEIGHTS_FILE,
    CheckpointFormat, ConfigArg, build_model, config_json, model_state, read_json,
)


def detect(path: Path) -> bool:
    """A directory whose config.json says `"format": "gptforge"`."""
    meta = config_json(path)
    return meta is not None and meta.get("format") == FORMAT_NAME


def save_native(model: GPTModel, out_dir: str | Path, training_state: dict[str, Any] | None = None) -> Path:
    """Write model.safetensors + config.json (+ training_state.pt) to `out_dir` atomically; see
    `checkpoint.save` for what `training_state` may hold."""
    return write_native(out_dir, model_state(model), model.cfg, model.tok_emb.weight.dtype, training_state)


def _dtype_name(dtype: torch.dtype) -> str:
    """A dtype as config.json's "dtype" holds it: 'float32', 'bfloat16', ..."""
    return str(dtype).removeprefix("torch.")


def write_native(out_dir: str | Path, tensors: Mapping[str, torch.Tensor], cfg: GPTConfig, dtype: torch.dtype,
                 training_state: dict[str, Any] | None = None, extra: Mapping[str, Any] | None = None) -> Path:
    """A gptforge checkpoint directory of `tensors`, atomically: config.json holds `cfg`'s fields,
    the `extra` entries (an adapter's "lora"), `dtype` and the sha256 of every file written."""
    out_dir = Path(out_dir)
    if training_state is not None:
        _check_weights_only(training_state, "training_state")
    with atomic_directory(out_dir, CHECKPOINT_FILES) as tmp:
        write_safetensors(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        files = [WEIGHTS_FILE]
        if training_state is not None:
            write_file(tmp / TRAINING_STATE_FILE, lambda: _torch_save(training_state, tmp / TRAINING_STATE_FILE))
            files.append(TRAINING_STATE_FILE)
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            **cfg.to_dict(),
            **(extra or {}),
            "dtype": _dtype_name(dtype),
            "sha256": {name: sha256_file(tmp / name) for name in files},
        }
        meta["sha256"][CONFIG_FILE] = config_digest(meta)
        write_file(tmp / CONFIG_FILE, lambda: (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n"))
    return out_dir


def _torch_save(obj: Any, path: Path) -> None:
    """torch.save through a Python file: a failed write (a full disk) is then an OSError that torch's
    own RuntimeError carries as its context, which `write_file` reports (its path saving fails without it)."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def config_digest(meta: Mapping[str, Any]) -> str:
    """The sha256 config.json keeps of itself: of its content without that entry, as compact JSON
    with sorted keys (so re-indenting the file keeps it valid; changing a value does not)."""
    table = {k: v for k, v in meta.get("sha256", {}).items() if k != CONFIG_FILE}
    canonical = json.dumps({**meta, "sha256": table}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


_PLAIN = (torch.Tensor, int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def _check_weights_only(obj: Any, where: str) -> None:
    """Refuse, at save time, what `torch.load(weights_only=True)` would refuse at load time."""
    if where == "training_state" and not isinstance(obj, dict):
        raise GptforgeError(f"training_state must be a dict, got {type(obj).__name__}")
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise GptforgeError(f"{where} has a key of type {type(key).__name__}; use str or int keys")
            _check_weights_only(value, f"{where}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check_weights_only(value, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN):
        raise GptforgeError(f"{where} is a {type(obj).__module__}.{type(obj).__name__}, which a weights-only "
                         f"load cannot read back; store tensors, numbers, strings, lists and dicts "
                         f"(e.g. torch.from_numpy(array) for a numpy RNG state)")



def _read_gptforge_meta(ckpt_dir: Path) -> tuple[dict[str, Any], GPTConfig]:
    meta = read_json(ckpt_dir / CONFIG_FILE)
    return meta, parse_meta(meta, ckpt_dir)


def parse_meta(meta: Mapping[str, Any], ckpt_dir: Path) -> GPTConfig:
    """The GPTConfig in a gptforge config.json's fields (format version, sha256 table and the
    file's own checksum checked)."""
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise GptforgeError(f"{ckpt_dir}: gptforge checkpoint format version {version!r} is not supported "
                         f"(this gptforge reads version {FORMAT_VERSION}); upgrade gptforge")
    if not isinstance(meta.get("sha256"), dict):
        raise GptforgeError(f"{ckpt_dir / CONFIG_FILE} has no sha256 table; the checkpoint is corrupted")
    expected = meta["sha256"].get(CONFIG_FILE)  # (checkpoints written before it was kept have none)
    if expected is not None and expected != config_digest(meta):
        raise GptforgeError(f"{ckpt_dir / CONFIG_FILE} fails its checksum: a value in it changed after it was "
                            f"saved (corrupted, or edited by hand; if you edited it on purpose, delete the "
                            f'"{CONFIG_FILE}" entry of its "sha256" table)')
    fields = {k: v for k, v in meta.items() if k not in ("format", "format_version", "dtype", "sha256", "lora")}
    try:
        cfg = GPTConfig.from_dict(fields)
    except (TypeError, ValueError) as err:
        raise GptforgeError(f"{ckpt_dir / CONFIG_FILE}: bad model config: {err}") from None
    return cfg


def _open_verified(ckpt_dir: Path, meta: Mapping[str, Any], name: str, *,
                   whole: bool = False) -> BinaryIO | memoryview:
    """The checkpoint file `name`, open for reading, its sha256 checked against config.json. The
    caller reads from this same handle, so what it reads is what was verified, even if the
    directory is replaced meanwhile. whole: instead, the file's bytes in memory, read once and
    hashed as they come in (`read_hashed`)."""
    path = ckpt_dir / name
    expected = meta["sha256"].get(name)
    if expected is None:
        raise GptforgeError(f"{ckpt_dir / CONFIG_FILE} lists no sha256 for {name}; the checkpoint is corrupted")
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"{ckpt_dir}: {name} is missing; the checkpoint is incomplete") from None
    try:
        data, actual = read_hashed(f) if whole else (None, sha256_of(f))
        if actual != expected:
            raise GptforgeError(f"{path} fails its checksum (sha256 {actual[:12]}..., config.json says "
                                f"{expected[:12]}...): the file is truncated or corrupted; restore or re-save it")
    except BaseException:
        f.close()
        raise
    if whole:
        f.close()
        return data
    f.seek(0)
    return f


def load_native(ckpt_dir: Path, dtype: torch.dtype | None) -> GPTModel:
    """The model in a gptforge checkpoint directory, its weights' sha256 verified first. In the
    dtype it was saved in, the weights are views of the file's bytes, read once; converted, each
    tensor is read by itself (the peak stays at one copy of the weights)."""
    meta, cfg = _read_gptforge_meta(ckpt_dir)
    path = ckpt_dir / WEIGHTS_FILE
    if dtype is None or _dtype_name(dtype) == meta.get("dtype"):
        state = read_safetensors_from(None, path, lambda name: True, dtype,
                                      data=_open_verified(ckpt_dir, meta, WEIGHTS_FILE, whole=True))
    else:
        with _open_verified(ckpt_dir, meta, WEIGHTS_FILE) as f:
            state = read_safetensors_from(f, path, lambda name: True, dtype)
    return build_model(cfg, state, str(path))



def _load(ckpt_dir: Path, dtype: torch.dtype | None, config: ConfigArg = None) -> GPTModel:
    return load_native(ckpt_dir, dtype)


def _load_config(ckpt_dir: Path, config: ConfigArg = None) -> GPTConfig:
    return _read_gptforge_meta(ckpt_dir)[1]


def load_training_state(ckpt_dir: str | Path) -> dict[str, Any] | None:
    """The training state saved with a gptforge checkpoint (checksum verified, read with
    `torch.load(weights_only=True)`), or None when the checkpoint has none."""
    ckpt_dir = Path(check_path("ckpt_dir", ckpt_dir))
    if not ckpt_dir.exists():
        raise FileNotFoundError(f"{ckpt_dir} does not exist")
    if not detect(ckpt_dir):
        raise GptforgeError(f"{ckpt_dir} is not a gptforge checkpoint directory; only those hold training state")
    meta, _ = _read_gptforge_meta(ckpt_dir)
    if TRAINING_STATE_FILE not in meta["sha256"]:
        return None
    with _open_verified(ckpt_dir, meta, TRAINING_STATE_FILE) as f:
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except Exception as err:  # unpickling errors come in many types
            raise GptforgeError(f"{ckpt_dir / TRAINING_STATE_FILE} cannot be read as a training state: {err}") from None


# ----------------------------------------------------------------------------------------------
# Hugging Face GPT-2: config mapping and key mapping


FORMAT = CheckpointFormat("gptforge", detect, _load, _load_config, save_native)
