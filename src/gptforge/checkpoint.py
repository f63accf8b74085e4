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
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .config import PRESETS, GPTConfig, as_config, preset
from .model import GPTModel
from .errors import GptforgeError

FORMAT_NAME = "gptforge"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TRAINING_STATE_FILE = "training_state.pt"
HF_BIN_FILE = "pytorch_model.bin"
SAVE_FORMATS = ("gptforge", "hf")

# mkstemp/mkdtemp create private (0600/0700) files and folders; what we publish by renaming them
# gets the permissions an ordinary open()/mkdir() would have: 0666/0777 less the process umask.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


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
    os.chmod(tmp, 0o666 & ~_UMASK)
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


# What an existing output directory may hold for a save to replace it (ours and Hugging Face's).
CHECKPOINT_FILES = frozenset({CONFIG_FILE, WEIGHTS_FILE, TRAINING_STATE_FILE, HF_BIN_FILE,
                              "generation_config.json"})


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path, replaceable: frozenset[str] = CHECKPOINT_FILES) -> Iterator[Path]:
    """Build a directory atomically: yields an empty temporary directory beside `out_dir`; when
    the block ends without error its files are fsynced and it replaces `out_dir` (an existing
    `out_dir` is moved aside first and deleted last, so a crash leaves one complete copy).
    An existing `out_dir` is only replaced when it holds nothing but files named in
    `replaceable`, so a mistyped path never deletes a project directory."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise GptforgeError(f"{out_dir} exists and is not a directory; choose another output path")
    if out_dir.is_dir():
        others = sorted(p.name for p in out_dir.iterdir() if p.name not in replaceable or not p.is_file())
        if others:
            raise GptforgeError(f"{out_dir} exists and holds other things than a checkpoint ({_short(others)}); "
                             f"refusing to replace it: choose a new or empty directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
        for file in tmp.iterdir():
            os.chmod(file, 0o666 & ~_UMASK)  # safetensors, like mkstemp, writes 0600 files
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
    with open(path, "rb") as f:
        return _sha256_of(f, chunk_bytes)


def _sha256_of(f: BinaryIO, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    f.seek(0)
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
    with open(path, "rb") as f:
        return _read_safetensors(f, path, keep, dtype)


def _read_safetensors(f: BinaryIO, path: Path, keep: Callable[[str], bool],
                      dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    size = os.fstat(f.fileno()).st_size
    f.seek(0)
    head = f.read(8)
    if len(head) < 8:
        raise GptforgeError(f"{path} is truncated: {size} bytes, too short for a safetensors header")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > size - 8:
        raise GptforgeError(f"{path} is truncated or not a safetensors file: its header claims "
                         f"{header_len} bytes but the file has {size}")
    try:
        header = json.loads(f.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GptforgeError(f"{path} is corrupted: its safetensors header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise GptforgeError(f"{path} is corrupted: its safetensors header is not a JSON object")
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
            raise GptforgeError(f"{path} is corrupted: bad header entry for tensor {name!r}") from None
        if base + end > size:
            raise GptforgeError(f"{path} is truncated: tensor {name!r} ends at byte {base + end} "
                             f"but the file has {size} bytes; save or download it again")
        nbytes = math.prod(shape) * torch.empty((), dtype=file_dtype).element_size()
        if nbytes != end - begin or begin < 0:
            raise GptforgeError(f"{path} is corrupted: tensor {name!r} of shape {shape} needs "
                             f"{nbytes} bytes, its header gives {end - begin}")
        tensor = torch.empty(shape, dtype=file_dtype)
        if nbytes:
            f.seek(base + begin)
            view = tensor.view(-1).view(torch.uint8).numpy()
            if f.readinto(memoryview(view)) != nbytes:
                raise GptforgeError(f"{path} is truncated in tensor {name!r}")
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


def build_model(cfg: GPTConfig, state: Mapping[str, torch.Tensor], source: str) -> GPTModel:
    """A GPTModel (eval mode, on the CPU) that takes ownership of `state`'s tensors (book keys; a
    tied model needs no `out_head.weight`) without allocating a second copy. Missing, unexpected
    or wrongly shaped tensors raise ValueError naming them and `source`."""
    with torch.device("meta"):  # shapes only: no memory until the state's tensors are assigned
        model = GPTModel(cfg)
    expected = {k: tuple(v.shape) for k, v in _model_state(model).items()}
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
            parts.append(f"missing tensors {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors {_short(unexpected)}")
        raise GptforgeError(f"{source}: {'; '.join(parts)} (is the file from another model or config?)")
    for name, shape in expected.items():
        got = tuple(state[name].shape)
        if got != shape:
            hint = ""
            if name in ("tok_emb.weight", "out_head.weight") and got[1:] == shape[1:]:
                hint = f" (the file has vocab_size {got[0]}, the config {cfg.vocab_size})"
            raise GptforgeError(f"{source}: tensor {name} has shape {got}, the config expects {shape}{hint}")
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
        `torch.load(weights_only=True)` can read back: tensors, numbers, strings, lists, dicts;
        anything else is a ValueError before a byte is written).
    format "hf": a Hugging Face GPT-2 directory (config.json + model.safetensors) that
        `transformers.GPT2LMHeadModel.from_pretrained` loads.
    Weights are written in the model's dtype. Returns `out_dir` as a Path.
    """
    if format not in SAVE_FORMATS:
        raise GptforgeError(f"unknown checkpoint format {format!r}; choose one of {', '.join(SAVE_FORMATS)}")
    if not isinstance(model, GPTModel):
        raise GptforgeError(f"save expects a gptforge GPTModel, got {type(model).__name__}")
    if format == "hf":
        if training_state is not None:
            raise GptforgeError("the Hugging Face format holds no training state; save with format='gptforge'")
        return save_hf(model, out_dir)
    out_dir = Path(out_dir)
    if training_state is not None:
        _check_weights_only(training_state, "training_state")
    with atomic_directory(out_dir) as tmp:
        _write_safetensors(_model_state(model), tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        files = [WEIGHTS_FILE]
        if training_state is not None:
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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise GptforgeError(f"{path} is not valid JSON ({err}); the checkpoint is corrupted") from None
    if not isinstance(data, dict):
        raise GptforgeError(f"{path} must hold a JSON object")
    return data


def _read_gptforge_meta(ckpt_dir: Path) -> tuple[dict[str, Any], GPTConfig]:
    meta = _read_json(ckpt_dir / CONFIG_FILE)
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise GptforgeError(f"{ckpt_dir}: gptforge checkpoint format version {version!r} is not supported "
                         f"(this gptforge reads version {FORMAT_VERSION}); upgrade gptforge")
    fields = {k: v for k, v in meta.items() if k not in ("format", "format_version", "dtype", "sha256")}
    try:
        cfg = GPTConfig.from_dict(fields)
    except (TypeError, ValueError) as err:
        raise GptforgeError(f"{ckpt_dir / CONFIG_FILE}: bad model config: {err}") from None
    if not isinstance(meta.get("sha256"), dict):
        raise GptforgeError(f"{ckpt_dir / CONFIG_FILE} has no sha256 table; the checkpoint is corrupted")
    return meta, cfg


def _open_verified(ckpt_dir: Path, meta: Mapping[str, Any], name: str) -> BinaryIO:
    """The checkpoint file `name`, open for reading, its sha256 checked against config.json. The
    caller reads from this same handle, so what it reads is what was verified, even if the
    directory is replaced meanwhile."""
    path = ckpt_dir / name
    expected = meta["sha256"].get(name)
    if expected is None:
        raise GptforgeError(f"{ckpt_dir / CONFIG_FILE} lists no sha256 for {name}; the checkpoint is corrupted")
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"{ckpt_dir}: {name} is missing; the checkpoint is incomplete") from None
    actual = _sha256_of(f)
    if actual != expected:
        f.close()
        raise GptforgeError(f"{path} fails its checksum (sha256 {actual[:12]}..., config.json says "
                         f"{expected[:12]}...): the file is truncated or corrupted; restore or re-save it")
    f.seek(0)
    return f


def _load_gptforge(ckpt_dir: Path, dtype: torch.dtype | None) -> GPTModel:
    meta, cfg = _read_gptforge_meta(ckpt_dir)
    with _open_verified(ckpt_dir, meta, WEIGHTS_FILE) as f:
        state = _read_safetensors(f, ckpt_dir / WEIGHTS_FILE, lambda name: True, dtype)
    return build_model(cfg, state, str(ckpt_dir / WEIGHTS_FILE))


def load_training_state(ckpt_dir: str | Path) -> dict[str, Any] | None:
    """The training state saved with a gptforge checkpoint (checksum verified, read with
    `torch.load(weights_only=True)`), or None when the checkpoint has none."""
    ckpt_dir = Path(ckpt_dir)
    if detect_format(ckpt_dir) != "gptforge":
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


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> GPTConfig:
    """GPTConfig from a Hugging Face GPT2Config dict (n_embd, n_layer, n_head, n_positions,
    vocab_size). Settings our model does not implement are rejected, naming the setting."""
    def get(key: str, default: Any) -> Any:
        value = hf.get(key)
        return default if value is None else value

    eps = get("layer_norm_epsilon", 1e-5)
    if abs(float(eps) - 1e-5) > 1e-12:
        raise GptforgeError(f"{source}: layer_norm_epsilon {eps} is not supported; gptforge's LayerNorm uses 1e-5 (GPT-2's)")
    act = get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise GptforgeError(f"{source}: activation_function {act!r} is not supported; gptforge uses GPT-2's "
                         f"tanh-approximated GELU ('gelu_new')")
    unsupported = {
        "n_inner": (None, 4 * int(get("n_embd", 768))),
        "scale_attn_weights": (True,), "scale_attn_by_inverse_layer_idx": (False,),
        "add_cross_attention": (False,), "is_encoder_decoder": (False,),
    }
    for key, allowed in unsupported.items():
        if key in hf and hf[key] not in allowed:
            raise GptforgeError(f"{source}: {key}={hf[key]!r} is not supported by gptforge's GPT-2")
    try:
        return GPTConfig(
            vocab_size=get("vocab_size", 50257),
            context_length=get("n_positions", get("n_ctx", 1024)),
            emb_dim=get("n_embd", 768),
            n_heads=get("n_head", 12),
            n_layers=get("n_layer", 12),
            drop_rate=float(get("resid_pdrop", 0.1)),
            qkv_bias=True,  # Conv1D c_attn always has a bias
            tie_weights=bool(get("tie_word_embeddings", True)),
        )
    except ValueError as err:
        raise GptforgeError(f"{source}: {err}") from None


def config_to_hf(cfg: GPTConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A Hugging Face GPT2Config dict for `cfg` (GPT2LMHeadModel, gelu_new, eps 1e-5)."""
    hf: dict[str, Any] = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,  # older readers (llama.cpp's converter) look for it
        "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": cfg.drop_rate,
        "embd_pdrop": cfg.drop_rate,
        "attn_pdrop": cfg.drop_rate,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "use_cache": True,
        "tie_word_embeddings": cfg.tie_weights,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if cfg.vocab_size > 50256:  # GPT-2's <|endoftext|>
        hf.update(bos_token_id=50256, eos_token_id=50256)
    return hf


_HF_BUFFERS = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")  # causal-mask buffers, not weights
_HF_BLOCK = re.compile(r"^h\.(\d+)\.(.+)$")
_HF_BLOCK_KEYS = {  # HF name in a block -> (our name, transposed Conv1D weight)
    "ln_1.weight": ("norm1.scale", False), "ln_1.bias": ("norm1.shift", False),
    "attn.c_proj.weight": ("att.out_proj.weight", True), "attn.c_proj.bias": ("att.out_proj.bias", False),
    "ln_2.weight": ("norm2.scale", False), "ln_2.bias": ("norm2.shift", False),
    "mlp.c_fc.weight": ("ff.layers.0.weight", True), "mlp.c_fc.bias": ("ff.layers.0.bias", False),
    "mlp.c_proj.weight": ("ff.layers.2.weight", True), "mlp.c_proj.bias": ("ff.layers.2.bias", False),
}
_HF_TOP_KEYS = {
    "wte.weight": "tok_emb.weight", "wpe.weight": "pos_emb.weight",
    "ln_f.weight": "final_norm.scale", "ln_f.bias": "final_norm.shift", "lm_head.weight": "out_head.weight",
}


def _hf_name(key: str) -> str:
    """A GPT2LMHeadModel key without its `transformer.` prefix (GPT2Model keys have none)."""
    return key.removeprefix("transformer.")


def _keep_hf(key: str) -> bool:
    return not _HF_BUFFERS.match(_hf_name(key))


def state_from_hf(hf_state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Rename a GPT-2 state dict (GPT2LMHeadModel or GPT2Model keys) to the book's keys, consuming
    `hf_state` as it goes so that each transposed copy replaces its original. Conv1D weights
    (in, out) become Linear weights (out, in); c_attn (d, 3d) is split into W_query/W_key/W_value."""
    state: dict[str, torch.Tensor] = {}
    for key in list(hf_state):
        tensor = hf_state.pop(key)
        name = _hf_name(key)
        if _HF_BUFFERS.match(name):
            continue
        if name in _HF_TOP_KEYS:
            state[_HF_TOP_KEYS[name]] = tensor
            continue
        match = _HF_BLOCK.match(name)
        if match is None:
            raise GptforgeError(f"{source}: unexpected tensor {key!r}; is this a GPT-2 checkpoint?")
        layer, rest = match.groups()
        prefix = f"trf_blocks.{layer}."
        if rest in ("attn.c_attn.weight", "attn.c_attn.bias"):
            if tensor.shape[-1] % 3:
                raise GptforgeError(f"{source}: {key} has shape {tuple(tensor.shape)}, whose last dimension "
                                 f"is not 3 x emb_dim")
            kind = rest.rsplit(".", 1)[1]
            for part, chunk in zip(("W_query", "W_key", "W_value"), tensor.chunk(3, dim=-1)):
                state[prefix + f"att.{part}.{kind}"] = chunk.t().contiguous() if kind == "weight" else chunk.clone()
            continue
        if rest not in _HF_BLOCK_KEYS:
            raise GptforgeError(f"{source}: unexpected tensor {key!r}; is this a GPT-2 checkpoint?")
        ours, transpose = _HF_BLOCK_KEYS[rest]
        state[prefix + ours] = tensor.t().contiguous() if transpose else tensor
    return state


def state_to_hf(model: GPTModel) -> dict[str, torch.Tensor]:
    """The model's weights under GPT2LMHeadModel keys, Conv1D layout (in, out), c_attn fused.
    A model without qkv bias gets zero c_attn biases (GPT-2's Conv1D always has one)."""
    cfg = model.cfg
    out: dict[str, torch.Tensor] = {}
    ours_to_hf_block = {ours: (hf, t) for hf, (ours, t) in _HF_BLOCK_KEYS.items()}
    ours_to_hf_top = {ours: hf for hf, ours in _HF_TOP_KEYS.items()}
    for name, tensor in _model_state(model).items():
        tensor = tensor.detach()
        if name in ours_to_hf_top:
            key = ours_to_hf_top[name]
            out[key if key == "lm_head.weight" else "transformer." + key] = tensor
            continue
        _, layer, rest = name.split(".", 2)
        if rest.startswith("att.W_"):
            continue  # fused below
        hf, transpose = ours_to_hf_block[rest]
        out[f"transformer.h.{layer}.{hf}"] = tensor.t().contiguous() if transpose else tensor
    for i, block in enumerate(model.trf_blocks):
        att = block.att
        out[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat(
            [att.W_query.weight, att.W_key.weight, att.W_value.weight], dim=0).t().contiguous().detach()
        if cfg.qkv_bias:
            bias = torch.cat([att.W_query.bias, att.W_key.bias, att.W_value.bias]).detach()
        else:
            bias = att.W_query.weight.new_zeros(3 * cfg.emb_dim)
        out[f"transformer.h.{i}.attn.c_attn.bias"] = bias
    return out


def save_hf(model: GPTModel, out_dir: str | Path) -> Path:
    """Write a Hugging Face GPT-2 directory (config.json + model.safetensors) atomically."""
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        _write_safetensors(state_to_hf(model), tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        hf = config_to_hf(model.cfg, model.tok_emb.weight.dtype)
        (tmp / CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n")
    return out_dir


def _torch_load(path: Path) -> Any:
    """A pickled checkpoint, read safely (tensors and plain containers only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zips, foreign pickles and more come as different types
        raise GptforgeError(f"{path} cannot be read as a PyTorch state dict ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); is it truncated or not a "
                         f"checkpoint? (only weights-only pickles are accepted)") from None


def _hf_weight_files(hf_dir: Path) -> list[Path]:
    if (hf_dir / WEIGHTS_FILE).is_file():
        return [hf_dir / WEIGHTS_FILE]
    index = hf_dir / (WEIGHTS_FILE + ".index.json")
    if index.is_file():
        weight_map = _read_json(index).get("weight_map", {})
        return [hf_dir / name for name in sorted(set(weight_map.values()))]
    if (hf_dir / HF_BIN_FILE).is_file():
        return [hf_dir / HF_BIN_FILE]
    raise FileNotFoundError(f"{hf_dir} has a Hugging Face config.json but no {WEIGHTS_FILE} or {HF_BIN_FILE}")


def _load_hf(hf_dir: Path, dtype: torch.dtype | None) -> GPTModel:
    cfg = config_from_hf(_read_json(hf_dir / CONFIG_FILE), str(hf_dir / CONFIG_FILE))
    hf_state: dict[str, torch.Tensor] = {}
    for file in _hf_weight_files(hf_dir):
        if not file.is_file():
            raise FileNotFoundError(f"{hf_dir}: weight shard {file.name} is missing")
        if file.suffix == ".safetensors":
            hf_state.update(read_safetensors(file, keep=_keep_hf, dtype=dtype))
        else:
            loaded = _torch_load(file)
            if not isinstance(loaded, dict):
                raise GptforgeError(f"{file} does not hold a state dict")
            hf_state.update({k: v if dtype is None or not v.is_floating_point() else v.to(dtype)
                             for k, v in loaded.items() if _keep_hf(k)})
    if cfg.tie_weights:
        hf_state.pop("lm_head.weight", None)  # transformers ties it to wte whatever the file holds
    elif "lm_head.weight" not in hf_state:
        raise GptforgeError(f"{hf_dir}: config.json says tie_word_embeddings=false but the weights have no "
                         f"lm_head.weight (a bare GPT2Model has no head of its own)")
    return build_model(cfg, state_from_hf(hf_state, str(hf_dir)), str(hf_dir))


# ----------------------------------------------------------------------------------------------
# The book's state dicts

# n_heads cannot be read from shapes: GPT-2's four widths have these (64-dimensional heads).
_BOOK_HEADS = {768: 12, 1024: 16, 1280: 20, 1600: 25}
_BOOK_MASK = re.compile(r"^trf_blocks\.\d+\.att\.mask$")  # the book's causal-mask buffer


def _book_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    loaded = _torch_load(path)
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


def _book_config(state: Mapping[str, torch.Tensor], source: str,
                 config: GPTConfig | Mapping[str, Any] | str | None) -> GPTConfig:
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


def _load_book(path: Path, dtype: torch.dtype | None,
               config: GPTConfig | Mapping[str, Any] | str | None) -> GPTModel:
    state = _book_state(path)
    cfg = _book_config(state, str(path), config)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return build_model(cfg, state, str(path))


# ----------------------------------------------------------------------------------------------
# Hub ids

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class _NoHubWeights(FileNotFoundError):
    """A hub repo (or its cached copy) without GPT-2 weight files."""


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _hub_download(repo_id: str, weights: bool = True) -> Path:
    """The local snapshot directory of a Hugging Face model repo (config.json, and the weights
    unless `weights` is False), from the hub cache, downloading into it when online. Offline and
    not cached: FileNotFoundError saying how to use a local directory instead."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError
    except ImportError:
        raise GptforgeError(f"{repo_id!r} looks like a Hugging Face hub id, but huggingface_hub is not "
                         f"installed; pip install huggingface_hub, or pass a local directory") from None

    def fetch(local_only: bool) -> Path:
        config = hf_hub_download(repo_id, CONFIG_FILE, local_files_only=local_only)
        if not weights:
            return Path(config).parent
        for name in (WEIGHTS_FILE, HF_BIN_FILE):
            try:
                hf_hub_download(repo_id, name, local_files_only=local_only)
                return Path(config).parent
            except EntryNotFoundError:
                continue
        raise _NoHubWeights(f"hub model {repo_id!r} has neither {WEIGHTS_FILE} nor {HF_BIN_FILE}")

    how = (f"to use a copy on disk, pass its directory (holding config.json and model.safetensors or "
           f"pytorch_model.bin) as --model / gptforge.load(path); to cache it, run "
           f"`hf download {repo_id}` where there is a network")
    missing = f"no preset or file named {repo_id!r}"
    try:
        return fetch(local_only=True)
    except (EntryNotFoundError, _NoHubWeights):
        pass  # not (fully) in the cache
    except ValueError as err:  # huggingface_hub's id validation
        raise GptforgeError(f"{missing}, and it is not a valid hub id ({err})") from None
    if _hub_offline():
        raise FileNotFoundError(f"{missing}, and the Hugging Face hub is offline (HF_HUB_OFFLINE) with "
                                f"no cached copy of it; {how}")
    if not _hub_reachable():
        raise FileNotFoundError(f"{missing}, and the Hugging Face hub cannot be reached (no network) "
                                f"with no cached copy of it; {how}")
    try:
        return fetch(local_only=False)
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{missing}, and no such model on the Hugging Face hub; presets are "
                                f"{', '.join(PRESETS)}") from None
    except _NoHubWeights:
        raise
    except (EntryNotFoundError, HfHubHTTPError, ConnectionError, OSError) as err:
        raise FileNotFoundError(f"{missing}, and downloading it from the Hugging Face hub failed "
                                f"({type(err).__name__}); {how}") from None


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """A quick TCP probe of the hub endpoint, so that no network fails in seconds rather than
    after huggingface_hub's half-minute of retries. With a proxy configured, assume reachable."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s):
            return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------
# One loader


def detect_format(path: str | Path) -> str:
    """'gptforge', 'hf', 'gguf' or 'book' for an existing checkpoint path; ValueError otherwise."""
    path = Path(path)
    if path.is_dir():
        config = path / CONFIG_FILE
        if not config.is_file():
            raise GptforgeError(f"{path} is a directory without {CONFIG_FILE}: not a gptforge or "
                             f"Hugging Face checkpoint")
        meta = _read_json(config)
        if meta.get("format") == FORMAT_NAME:
            return "gptforge"
        if meta.get("model_type") == "gpt2" or "n_embd" in meta:
            return "hf"
        raise GptforgeError(f"{config} is neither a gptforge config (\"format\": \"gptforge\") nor a "
                         f"Hugging Face GPT-2 config (\"model_type\": \"gpt2\")")
    if path.is_file():
        from .gguf_format import is_gguf

        return "gguf" if is_gguf(path) else "book"
    raise FileNotFoundError(f"{path} does not exist")


# Models shipped inside the package (gptforge checkpoint directories under gptforge/assets/).
BUILTIN_MODELS = {"gptforge-shakespeare": "assets/gptforge-shakespeare"}


def builtin_model_path(name: str) -> Path | None:
    """The directory of a model shipped with gptforge, or None when `name` is not one."""
    relative = BUILTIN_MODELS.get(str(name).lower())
    return Path(__file__).parent / relative if relative else None


def resolve(name_or_path: str | Path, weights: bool = True) -> tuple[str, Path | None]:
    """What a model name means: ('preset', None), or (format, local path) for a checkpoint on disk
    or a hub id (downloaded into, or found in, the Hugging Face cache; only its config.json when
    `weights` is False)."""
    name = str(name_or_path)
    path = Path(name)
    if name.lower() in PRESETS:
        return "preset", None
    if (builtin := builtin_model_path(name)) is not None:
        if not (builtin / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"the built-in model {name!r} is missing from this installation ({builtin})")
        return "gptforge", builtin
    if path.exists():
        return detect_format(path), path
    if _HUB_ID.match(name) and not name.endswith((".pt", ".pth", ".bin", ".safetensors", ".json")):
        snapshot = _hub_download(name, weights)
        return detect_format(snapshot), snapshot
    raise FileNotFoundError(f"no preset or file named {name!r}; presets are {', '.join(PRESETS)}")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """A device name (`--device`) checked against this machine: `auto` picks CUDA (this process's
    GPU under torchrun), then MPS, then the CPU; an unknown or absent device is a ValueError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GptforgeError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GptforgeError("--device cuda was asked for but CUDA is not available; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise GptforgeError("--device mps was asked for but MPS is not available; use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def _resolve_with_config(name_or_path: str | Path, config: Any, weights: bool = True) -> tuple[str, Path | None]:
    """`resolve`, refusing a `config` for anything but a book state dict (the others carry theirs)."""
    fmt, path = resolve(name_or_path, weights)
    if config is not None and fmt != "book":
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
    - a book state dict file (`torch.save(model.state_dict(), "model.pth")`);
    - a Hugging Face hub id ("gpt2", "openai-community/gpt2-medium"), through the hub cache.

    dtype: convert floating weights to it (default: the dtype they were saved in).
    config: the shape of a book state dict, needed only when its width is not one of GPT-2's four
        (n_heads cannot be read from the tensors); other formats carry their own config.
    """
    device = resolve_device(device) if isinstance(device, str) else device  # a bad one fails first
    fmt, path = _resolve_with_config(name_or_path, config)
    if fmt == "preset":
        model = GPTModel(preset(str(name_or_path)))
    elif fmt == "gptforge":
        model = _load_gptforge(path, dtype)
    elif fmt == "hf":
        model = _load_hf(path, dtype)
    elif fmt == "gguf":
        from .gguf_format import load_gguf

        model = load_gguf(path, dtype)
    else:
        model = _load_book(path, dtype, config)
    model.to(device=device, dtype=dtype)
    return model.eval()


def load_config(name_or_path: str | Path,
                config: GPTConfig | Mapping[str, Any] | str | None = None) -> GPTConfig:
    """The GPTConfig of a preset or checkpoint, reading only config.json where there is one
    (`config` as in `load`, for book state dicts)."""
    fmt, path = _resolve_with_config(name_or_path, config, weights=False)
    if fmt == "preset":
        return preset(str(name_or_path))
    if fmt == "gptforge":
        return _read_gptforge_meta(path)[1]
    if fmt == "hf":
        return config_from_hf(_read_json(path / CONFIG_FILE), str(path / CONFIG_FILE))
    if fmt == "gguf":
        from .gguf_format import load_gguf_config

        return load_gguf_config(path)
    return _book_config(_book_state(path), str(path), config)
