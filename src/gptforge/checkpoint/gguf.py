"""GGUF, llama.cpp's single-file format, for GPT-2 models: written and read with the `gguf` package
(the llama.cpp project's own Python reader and writer).

Written as llama.cpp's `convert_hf_to_gguf.py` writes GPT-2 (architecture "gpt2"): the tensor
names and layouts below, 1-D tensors, norms and the position embedding always F32, every other
weight matrix in the chosen type (f32, f16, bf16, q8_0 or q4_0; a matrix whose rows do not split into
32-value blocks falls back to F16, as the converter does). GPT-2's tokenizer is embedded (model
"gpt2", pre-tokenizer "gpt-2", tokens, token types, merges, <|endoftext|> = 50256 as bos, eos and unk, none added),
so llama.cpp needs nothing else. Our GPTConfig is stored too (`gptforge.config`) so that what
GGUF cannot say (no qkv bias, dropout, init scheme) survives a round trip.

Read: any GPT-2 GGUF (ours or the converter's); quantized tensors are dequantized to float32.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from ..config import GPTConfig
from ..errors import GptforgeError
from ..io import atomic_write
from ..model import GPTModel
from ..tokenizer import ENDOFTEXT_ID, gpt2_vocab
from .base import ConfigArg, CheckpointFormat, build_model, model_state

GGUF_MAGIC = b"GGUF"
ARCH = "gpt2"
CONFIG_KEY = "gptforge.config"
LAYER_NORM_EPS = 1e-5  # gptforge's LayerNorm, GPT-2's
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")

# Our names (the book's) -> llama.cpp's, for everything but the fused query/key/value projection.
_TOP = {
    "tok_emb.weight": "token_embd.weight", "pos_emb.weight": "position_embd.weight",
    "final_norm.scale": "output_norm.weight", "final_norm.shift": "output_norm.bias",
    "out_head.weight": "output.weight",
}
_BLOCK = {
    "norm1.scale": "attn_norm.weight", "norm1.shift": "attn_norm.bias",
    "att.out_proj.weight": "attn_output.weight", "att.out_proj.bias": "attn_output.bias",
    "norm2.scale": "ffn_norm.weight", "norm2.shift": "ffn_norm.bias",
    "ff.layers.0.weight": "ffn_up.weight", "ff.layers.0.bias": "ffn_up.bias",
    "ff.layers.2.weight": "ffn_down.weight", "ff.layers.2.bias": "ffn_down.bias",
}
_QKV = ("att.W_query", "att.W_key", "att.W_value")


def detect(path: Path) -> bool:
    """A file that starts with GGUF's magic bytes."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


# ----------------------------------------------------------------------------------------------
# Writing


def gguf_tensors(model: GPTModel) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights under llama.cpp's GPT-2 names, in Linear layout (out, in), float32.
    Query/key/value become one `attn_qkv` (3 * d, d) matrix, with zero biases for a model without
    qkv bias (llama.cpp's GPT-2 requires them); a tied head is not written (llama.cpp then uses
    token_embd, as it does for the converter's files)."""
    state = model_state(model)
    for ours, theirs in _TOP.items():
        if ours in state:
            yield theirs, state[ours].detach().float()
    for i, block in enumerate(model.trf_blocks):
        prefix = f"trf_blocks.{i}."
        linears = [getattr(block.att, name.split(".")[1]) for name in _QKV]
        yield f"blk.{i}.attn_qkv.weight", torch.cat([lin.weight.detach() for lin in linears]).float()
        if model.cfg.qkv_bias:
            bias = torch.cat([lin.bias.detach() for lin in linears]).float()
        else:
            bias = torch.zeros(3 * model.cfg.emb_dim)
        yield f"blk.{i}.attn_qkv.bias", bias
        for ours, theirs in _BLOCK.items():
            yield f"blk.{i}.{theirs}", state[prefix + ours].detach().float()


def _tensor_type(name: str, ndim: int, gguf_type: str) -> Any:
    """The GGML type one tensor is stored in: the converter's rules (`prepare_tensors`)."""
    from gguf import GGMLQuantizationType as Q

    if ndim <= 1 or not name.endswith(".weight") or name.endswith("_norm.weight") or name == "position_embd.weight":
        return Q.F32
    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[gguf_type]


def _add_metadata(writer: Any, cfg: GPTConfig, gguf_type: str, name: str) -> None:
    from gguf import GGML_QUANT_VERSION, LlamaFileType, TokenType

    file_types = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
                  "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_0": LlamaFileType.MOSTLY_Q4_0}
    writer.add_type("model")
    writer.add_name(name)
    writer.add_quantization_version(GGML_QUANT_VERSION)
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.emb_dim)
    writer.add_feed_forward_length(4 * cfg.emb_dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_head_count(cfg.n_heads)
    writer.add_layer_norm_eps(LAYER_NORM_EPS)
    writer.add_file_type(file_types[gguf_type])
    vocab, merges = gpt2_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    types = [TokenType.NORMAL] * len(tokens)
    types[ENDOFTEXT_ID] = TokenType.CONTROL
    pad = cfg.vocab_size - len(tokens)  # a padded vocabulary (e.g. 50304): ids no text produces
    tokens += [f"[PAD{i}]" for i in range(len(tokens), cfg.vocab_size)]
    types += [TokenType.UNUSED] * pad
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(ENDOFTEXT_ID)
    writer.add_eos_token_id(ENDOFTEXT_ID)
    writer.add_unk_token_id(ENDOFTEXT_ID)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_string(CONFIG_KEY, json.dumps(cfg.to_dict()))


def save_gguf(model: GPTModel, path: str | Path, training_state: dict[str, Any] | None = None,
              gguf_type: str = "f32") -> Path:
    """Write `model` as one GPT-2 GGUF file that llama.cpp runs as is, atomically.

    gguf_type: 'f32', 'f16', 'bf16', 'q8_0' or 'q4_0' for the weight matrices (see the module docstring).
    The model needs GPT-2's vocabulary (vocab_size >= 50257), whose tokenizer is embedded.
    Returns `path`."""
    import gguf

    if training_state is not None:
        raise GptforgeError("a GGUF file holds no training state; save with format='gptforge'")
    if gguf_type not in GGUF_TYPES:
        raise GptforgeError(f"unknown GGUF type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    if not isinstance(model, GPTModel):
        raise GptforgeError(f"save_gguf expects a gptforge GPTModel, got {type(model).__name__}")
    cfg = model.cfg
    if cfg.classifier is not None:  # as the Hugging Face format: llama.cpp reads a language model's head
        raise GptforgeError("a classifier has no GGUF form: llama.cpp would read its label head as a vocabulary; "
                            "keep it as a gptforge checkpoint")
    if cfg.vocab_size < ENDOFTEXT_ID + 1:
        raise GptforgeError(f"a GGUF file embeds GPT-2's tokenizer (50257 tokens), but this model's "
                            f"vocab_size is {cfg.vocab_size}; only GPT-2-vocabulary models can be exported")
    path = Path(path)
    if path.is_dir():
        raise GptforgeError(f"{path} is a directory; a GGUF checkpoint is one file: give a file name like model.gguf")
    if path.is_file() and path.stat().st_size > 0 and not detect(path):  # the user's file, not a checkpoint
        raise GptforgeError(f"{path} exists and is not a GGUF file; refusing to replace it: choose another "
                            "output path")

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, ARCH)
        _add_metadata(writer, cfg, gguf_type, path.stem)
        for name, tensor in gguf_tensors(model):
            data = tensor.cpu().contiguous().numpy()
            qtype = _tensor_type(name, data.ndim, gguf_type)
            try:
                data = gguf.quants.quantize(data, qtype)
            except gguf.QuantError:  # rows not a whole number of 32-value blocks
                qtype = gguf.GGMLQuantizationType.F16
                data = gguf.quants.quantize(data, qtype)
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return atomic_write(path, write)


# ----------------------------------------------------------------------------------------------
# Reading


# gguf's GGUFReader parses every string of the embedded tokenizer into numpy objects (15 s for
# GPT-2's 100k tokens and merges here); this reader skips those arrays and reads only what we use.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_BF16 = 30
_PLAIN_TYPES = {0: np.float32, 1: np.float16, _BF16: np.int16}  # GGML type ids of unquantized floats


class GGUFHeader:
    """A GGUF file's metadata (scalars and strings; arrays are skipped, stored as None) and its
    tensor table: name -> (GGML shape (ne0 first, i.e. reversed), GGML type id, absolute offset).

    Everything, header and tensors, is read through one read-only memory map of the file opened
    once: a file replaced (renamed over) while it is read is read whole as it was, never mixed with
    its replacement. `close()` (or `with`) unmaps it."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:  # mmap refuses an empty file
                raise GptforgeError(f"{path} is empty, not a GGUF file")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.size = len(self._map)
        try:
            self._parse(self._map)
        except GptforgeError:
            self.close()
            raise
        except (struct.error, UnicodeDecodeError, MemoryError, OverflowError, ValueError):  # ValueError: a seek past the end
            self.close()
            raise GptforgeError(f"{path} is truncated or corrupted: its GGUF header cannot be read") from None

    def close(self) -> None:
        try:
            self._map.close()
        except BufferError:  # a view is still alive (an exception's frames hold one): unmapped when it goes
            pass

    def __enter__(self) -> GGUFHeader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self, f: BinaryIO, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        data = f.read(size)
        if len(data) != size:
            raise struct.error("end of file")
        return struct.unpack(fmt, data)[0]

    def _string(self, f: BinaryIO) -> str:
        n = self._read(f, "<Q")
        data = f.read(n) if n <= self.size else b""
        if len(data) != n:
            raise struct.error("string past the end of the file")
        return data.decode("utf-8")

    def _value(self, f: BinaryIO, kind: int) -> Any:
        if kind == _STRING:
            return self._string(f)
        if kind == _ARRAY:
            item, count = self._read(f, "<I"), self._read(f, "<Q")
            if item == _STRING:
                for _ in range(count):
                    f.seek(self._read(f, "<Q"), 1)
            elif item in _SCALARS:
                f.seek(count * struct.calcsize(_SCALARS[item]), 1)
            else:
                raise GptforgeError(f"{self.path}: GGUF array of value type {item} is not supported")
            return None
        if kind not in _SCALARS:
            raise GptforgeError(f"{self.path}: unknown GGUF value type {kind}; is the file corrupted?")
        return self._read(f, _SCALARS[kind])

    def _parse(self, f: BinaryIO) -> None:
        if f.read(4) != GGUF_MAGIC:
            raise GptforgeError(f"{self.path} is not a GGUF file (no GGUF magic bytes)")
        version = self._read(f, "<I")
        if version not in (2, 3):
            raise GptforgeError(f"{self.path}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = self._read(f, "<Q"), self._read(f, "<Q")
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string(f)
            self.fields[key] = self._value(f, self._read(f, "<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string(f)
            shape = tuple(self._read(f, "<Q") for _ in range(self._read(f, "<I")))
            infos.append((name, shape, self._read(f, "<I"), self._read(f, "<Q")))
        alignment = int(self.fields.get("general.alignment") or 32)
        start = -(-f.tell() // alignment) * alignment
        self.tensors = {name: (shape, kind, start + offset) for name, shape, kind, offset in infos}

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, dequantized to float32, in torch's order (the GGML shape reversed)."""
        shape, kind, offset = self.tensors[name]
        torch_shape, count = tuple(reversed(shape)), math.prod(shape)
        if kind in _PLAIN_TYPES:  # read directly: importing gguf costs more than the whole load
            tensor = torch.from_numpy(self._array(name, offset, count, _PLAIN_TYPES[kind]).copy())
            return (tensor.view(torch.bfloat16) if kind == _BF16 else tensor).float().reshape(torch_shape)
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import dequantize

        try:
            qtype = GGMLQuantizationType(kind)
            block, block_bytes = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise GptforgeError(f"{self.path}: tensor {name!r} has unknown GGML type {kind}") from None
        if shape[0] % block:
            raise GptforgeError(f"{self.path}: tensor {name!r} of shape {torch_shape} is not whole {qtype.name} blocks")
        raw = self._array(name, offset, count // block * block_bytes, np.uint8)
        try:
            data = dequantize(raw.reshape(-1, shape[0] // block * block_bytes), qtype)
        except NotImplementedError:
            raise GptforgeError(f"{self.path}: tensor {name!r} is {qtype.name}, which gguf cannot dequantize; "
                                f"convert the file to f32, f16, bf16, q8_0 or q4_0") from None
        return torch.from_numpy(np.array(data, dtype=np.float32).reshape(torch_shape))  # a copy: never a view of the map

    def _array(self, name: str, offset: int, count: int, dtype: Any) -> np.ndarray:
        """`count` values of `dtype` at byte `offset`: a view of the map (copy what is kept)."""
        end = offset + count * np.dtype(dtype).itemsize
        if end > self.size:
            raise GptforgeError(f"{self.path} is truncated: tensor {name!r} ends at byte {end} "
                                f"but the file has {self.size}; convert or download it again")
        return np.frombuffer(self._map, dtype=dtype, count=count, offset=offset)


def _field(reader: GGUFHeader, key: str, path: Path, default: Any = None) -> Any:
    value = reader.fields.get(key)
    if value is None:
        if default is not None:
            return default
        raise GptforgeError(f"{path}: GGUF metadata {key!r} is missing; is this a GPT-2 GGUF file?")
    return value


def _config(reader: GGUFHeader, path: Path) -> GPTConfig:
    """The GPTConfig a GPT-2 GGUF file describes: its metadata, plus our stored config for what
    GGUF does not say (a llama.cpp file: qkv bias on, tied when it has no output.weight)."""
    arch = _field(reader, "general.architecture", path)
    if arch != ARCH:
        raise GptforgeError(f"{path} is a GGUF file for architecture {arch!r}; gptforge reads GPT-2 ({ARCH!r}) only")
    emb_dim = int(_field(reader, f"{ARCH}.embedding_length", path))
    eps = float(_field(reader, f"{ARCH}.attention.layer_norm_epsilon", path, LAYER_NORM_EPS))
    if abs(eps - LAYER_NORM_EPS) > 1e-9:
        raise GptforgeError(f"{path}: layer_norm_epsilon {eps} is not supported; gptforge's LayerNorm uses 1e-5 (GPT-2's)")
    ff = int(_field(reader, f"{ARCH}.feed_forward_length", path, 4 * emb_dim))
    if ff != 4 * emb_dim:
        raise GptforgeError(f"{path}: feed_forward_length {ff} is not 4 x embedding_length ({emb_dim}) as in GPT-2")
    names = reader.tensors
    if "token_embd.weight" not in names:
        raise GptforgeError(f"{path} has no token_embd.weight; is this a GPT-2 GGUF file?")
    shape = dict(
        vocab_size=int(names["token_embd.weight"][0][1]),  # GGML shapes are (in, out): reversed
        context_length=int(_field(reader, f"{ARCH}.context_length", path)),
        emb_dim=emb_dim,
        n_heads=int(_field(reader, f"{ARCH}.attention.head_count", path)),
        n_layers=int(_field(reader, f"{ARCH}.block_count", path)),
    )
    stored = json.loads(_field(reader, CONFIG_KEY, path, "{}"))
    extra = dict(qkv_bias=True, tie_weights="output.weight" not in names, drop_rate=0.0)
    extra.update({k: v for k, v in stored.items() if k not in shape})
    try:
        return GPTConfig.from_dict({**extra, **shape})
    except (TypeError, ValueError) as err:
        raise GptforgeError(f"{path}: bad model config: {err}") from None


def _state(reader: GGUFHeader, cfg: GPTConfig, path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors under the book's keys, dequantized; attn_qkv split into W_query/W_key/W_value."""
    theirs_to_ours = {theirs: ours for ours, theirs in _TOP.items()}
    block_keys = {theirs: ours for ours, theirs in _BLOCK.items()}
    state: dict[str, torch.Tensor] = {}
    for name in reader.tensors:
        data = reader.tensor(name)
        if name in theirs_to_ours:
            state[theirs_to_ours[name]] = data
            continue
        parts = name.split(".", 2)
        if len(parts) != 3 or parts[0] != "blk" or not parts[1].isdigit():
            raise GptforgeError(f"{path}: unexpected tensor {name!r}; is this a GPT-2 GGUF file?")
        prefix, rest = f"trf_blocks.{parts[1]}.", parts[2]
        if rest in ("attn_qkv.weight", "attn_qkv.bias"):
            if rest.endswith("bias") and not cfg.qkv_bias:
                continue  # zeros written for llama.cpp; this model has none
            kind = rest.rsplit(".", 1)[1]
            for ours, chunk in zip(_QKV, data.chunk(3, dim=0)):
                state[f"{prefix}{ours}.{kind}"] = chunk.clone()
        elif rest in block_keys:
            state[prefix + block_keys[rest]] = data
        else:
            raise GptforgeError(f"{path}: unexpected tensor {name!r}; is this a GPT-2 GGUF file?")
    return state


def load_gguf(path: str | Path, dtype: torch.dtype | None = None, config: ConfigArg = None) -> GPTModel:
    """A GPTModel (CPU, eval mode) from a GPT-2 GGUF file, ours or llama.cpp's converter's;
    quantized weights are dequantized to float32 (then converted to `dtype` when given)."""
    path = Path(path)
    with GGUFHeader(path) as reader:
        cfg = _config(reader, path)
        state = _state(reader, cfg, path)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    return build_model(cfg, state, str(path))


def load_gguf_config(path: str | Path, config: ConfigArg = None) -> GPTConfig:
    """The GPTConfig of a GPT-2 GGUF file, from its metadata (no tensor is dequantized)."""
    path = Path(path)
    with GGUFHeader(path) as reader:
        return _config(reader, path)


FORMAT = CheckpointFormat("gguf", detect, load_gguf, load_gguf_config, save_gguf)
