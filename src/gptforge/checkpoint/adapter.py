"""LoRA adapter checkpoints: a gptforge checkpoint directory that holds only the LoRA matrices (and,
for a classifier, its new head) and names its base model with the base's checksum.

config.json is the native one (format, format_version, the GPTConfig fields, dtype, sha256) plus
`"lora": {"base", "base_sha256", "rank", "alpha", "scaling", "layers"}`. Loading one loads the
base (which must still be there, unchanged: missing is a FileNotFoundError, changed a
GptforgeError), puts the adapters back on the same layers and fills in the saved tensors; the
result is a model with LoRA layers that `lora.merge_lora` turns into a plain one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..config import GPTConfig
from ..errors import GptforgeError
from ..io import read_safetensors_from, sha256_file
from ..lora import LoRALayer, apply_lora, lora_layers
from ..model import GPTModel
from . import native
from .base import (
    CONFIG_FILE, FORMAT_NAME, WEIGHTS_FILE, CheckpointFormat, ConfigArg, check_finite_weights, config_json,
)

ADAPTER_KEY = "lora"


def detect(path: Path) -> bool:
    """A gptforge checkpoint directory whose config.json has a "lora" entry."""
    meta = config_json(path)
    return meta is not None and meta.get("format") == FORMAT_NAME and ADAPTER_KEY in meta


def base_reference(name: str | Path) -> tuple[str, str]:
    """(how to find the base again, its checksum) for a model name or path. A local path is kept
    absolute; a built-in name or hub id as given. A preset (random weights) cannot be a base."""
    from . import resolve  # the front resolves names; imported here, the front imports this module

    if str(name).lower().endswith(".json") and Path(str(name)).is_file():
        raise GptforgeError(f"a LoRA checkpoint needs a saved base model, and {name} is a model config (random "
                            "weights); train it first, then adapt its checkpoint")
    fmt, path = resolve(name)
    if fmt == "preset":
        raise GptforgeError(f"a LoRA checkpoint needs a saved base model, and {name!r} is a preset (random "
                            "weights); save it first (gptforge convert) or adapt a checkpoint")
    if fmt == ADAPTER_KEY:
        raise GptforgeError(f"{name} is itself a LoRA checkpoint; merge it first (gptforge convert "
                            "--merge-lora) and adapt the merged model")
    return (str(Path(name).resolve()) if Path(str(name)).exists() else str(name)), weights_digest(fmt, path)


def weights_digest(fmt: str, path: Path) -> str:
    """The sha256 identifying a base model's weights: from a gptforge config.json's table (verified
    whenever it loads), else of its weight files."""
    if fmt == FORMAT_NAME:
        return native._read_gptforge_meta(path)[0]["sha256"][WEIGHTS_FILE]
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
    digests = [sha256_file(f) for f in files]
    return digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an adapter checkpoint stores: the LoRA matrices, and a classifier's head."""
    keep_head = model.cfg.classifier is not None
    return {k: v for k, v in model.state_dict().items()
            if ".lora." in f".{k}" or (keep_head and k.startswith("out_head."))}


def save_adapter(model: GPTModel, out_dir: Path, training_state: dict[str, Any] | None = None) -> Path:
    """Write the adapter checkpoint of a model with LoRA layers; `model.lora_base` names its base
    (set by whoever applied LoRA: finetuning, training, or loading an adapter)."""
    base = getattr(model, "lora_base", None)
    if base is None:
        raise GptforgeError("this LoRA model does not say which base model it adapts (model.lora_base); "
                            "merge it (lora.merge_lora) to save a plain checkpoint")
    base_name, base_sha = base if isinstance(base, tuple) else base_reference(base)
    model.lora_base = (base_name, base_sha)
    layers = lora_layers(model)
    first = next(iter(layers.values())).lora
    lora = {"base": base_name, "base_sha256": base_sha, "rank": first.rank, "alpha": first.alpha,
            "scaling": first.scaling, "layers": list(layers)}
    return native.write_native(out_dir, adapter_state(model), model.cfg, first.A.dtype, training_state,
                               {ADAPTER_KEY: lora})


def _read_meta(ckpt_dir: Path) -> tuple[dict[str, Any], dict[str, Any], GPTConfig]:
    meta = dict(config_json(ckpt_dir) or {})
    cfg = native.parse_meta(meta, ckpt_dir)  # (its checksum covers the "lora" entry too)
    lora = meta.pop(ADAPTER_KEY)
    if not isinstance(lora, dict) or not {"base", "base_sha256", "rank", "alpha", "scaling", "layers"} <= set(lora):
        raise GptforgeError(f"{ckpt_dir / CONFIG_FILE}: the \"lora\" entry is incomplete; the checkpoint is corrupted")
    return meta, lora, cfg


def load_adapter(ckpt_dir: Path, dtype: torch.dtype | None, config: ConfigArg = None) -> GPTModel:
    """The base model with this checkpoint's adapters (and head) on it, checksums verified."""
    from . import load, resolve

    meta, lora, cfg = _read_meta(ckpt_dir)
    try:
        fmt, base_path = resolve(lora["base"])
    except FileNotFoundError:
        raise FileNotFoundError(f"{ckpt_dir} is a LoRA adapter of {lora['base']}, which is not there any more; "
                                "put the base model back at that path") from None
    if fmt == "preset" or weights_digest(fmt, base_path) != lora["base_sha256"]:
        raise GptforgeError(f"{ckpt_dir} is a LoRA adapter of {lora['base']}, whose weights changed since "
                            f"(sha256 {lora['base_sha256'][:12]}... expected); restore that base model")
    model = load(lora["base"], dtype=dtype)
    _check_shape(model.cfg, cfg, ckpt_dir)
    if cfg.classifier is not None:  # the new head; its weights come from the adapter file
        model.out_head = nn.Linear(cfg.emb_dim, cfg.classifier.num_classes, dtype=model.tok_emb.weight.dtype)
    model.cfg = cfg
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = cfg.drop_rate
    wrapped = apply_lora(model, lora["rank"], lora["alpha"], lora["layers"], lora["scaling"])
    if wrapped != lora["layers"]:
        raise GptforgeError(f"{ckpt_dir}: the adapter's layers {lora['layers'][:3]}... do not match the base model")
    with native._open_verified(ckpt_dir, meta, WEIGHTS_FILE) as f:
        state = read_safetensors_from(f, ckpt_dir / WEIGHTS_FILE, lambda name: True, dtype)
    check_finite_weights(state, str(ckpt_dir / WEIGHTS_FILE))
    expected = adapter_state(model)
    if set(state) != set(expected):
        raise GptforgeError(f"{ckpt_dir / WEIGHTS_FILE} holds {sorted(set(state) ^ set(expected))[:4]} "
                            "where the adapter's config.json expects otherwise; the checkpoint is corrupted")
    model.load_state_dict(state, strict=False)
    model.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, LoRALayer):
            m.requires_grad_(True)
    model.lora_base = (lora["base"], lora["base_sha256"])
    return model.eval()


def _check_shape(base: GPTConfig, adapter: GPTConfig, ckpt_dir: Path) -> None:
    # What an adapter may change: a classifier head, dropout, an instruction model's prompt template.
    strip = {"classifier": None, "tie_weights": False, "drop_rate": 0.0, "prompt_template": None}
    if base.replace(**strip) != adapter.replace(**strip):
        raise GptforgeError(f"{ckpt_dir}: the adapter was made for another model shape than its base's")


def _load_config(ckpt_dir: Path, config: ConfigArg = None) -> GPTConfig:
    return _read_meta(ckpt_dir)[2]


FORMAT = CheckpointFormat(ADAPTER_KEY, detect, load_adapter, _load_config, None)
