"""Shared helpers for the generation tests: tiny models, a scripted model, and a Hugging Face twin."""

from __future__ import annotations

import torch
import torch.nn as nn

from gptforge import GPTConfig, GPTModel, KVCache

TINY = GPTConfig(vocab_size=256, context_length=32, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0)
TINY_GPT2 = TINY.replace(qkv_bias=True, tie_weights=True, init="gpt2")


def tiny_model(cfg: GPTConfig = TINY, seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(cfg).eval()


class ScriptedModel(nn.Module):
    """Emits a fixed token sequence (whatever the prompt), through the same interface as GPTModel:
    lets tests pick the exact tokens that cross a UTF-8 character or a stop string."""

    def __init__(self, script: list[int], vocab_size: int = 50257):
        super().__init__()
        self.cfg = GPTConfig(vocab_size=vocab_size, context_length=1024, emb_dim=8, n_heads=1, n_layers=1)
        self.script = script
        self.dummy = nn.Parameter(torch.zeros(1))
        self.prompt_len = None

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        return KVCache(self.cfg, batch_size, max_len)

    def forward(self, idx, *, cache=None, positions=None, attention_mask=None, last_only=False):
        start = cache.length
        if start == 0:
            self.prompt_len = idx.shape[1]
        cache.length = start + idx.shape[1]
        step = cache.length - self.prompt_len
        logits = torch.zeros(idx.shape[0], 1, self.cfg.vocab_size)
        logits[:, :, self.script[min(step, len(self.script) - 1)]] = 10.0
        return logits


def hf_twin(model: GPTModel):
    """The same weights in transformers' GPT2LMHeadModel (sdpa attention), mapped by hand: Conv1D
    weights are (in, out), ours (out, in); c_attn holds query, key and value side by side."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.cfg
    assert cfg.qkv_bias and cfg.tie_weights, "GPT-2's layout needs qkv_bias and a tied head"
    hf = GPT2LMHeadModel(GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.emb_dim,
        n_layer=cfg.n_layers, n_head=cfg.n_heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=None, eos_token_id=None, attn_implementation="sdpa",
    ))
    sd = model.state_dict()
    out = {"transformer.wte.weight": sd["tok_emb.weight"], "transformer.wpe.weight": sd["pos_emb.weight"],
           "transformer.ln_f.weight": sd["final_norm.scale"], "transformer.ln_f.bias": sd["final_norm.shift"],
           "lm_head.weight": sd["tok_emb.weight"]}
    for i in range(cfg.n_layers):
        p, h = f"trf_blocks.{i}.", f"transformer.h.{i}."
        out[h + "ln_1.weight"], out[h + "ln_1.bias"] = sd[p + "norm1.scale"], sd[p + "norm1.shift"]
        out[h + "ln_2.weight"], out[h + "ln_2.bias"] = sd[p + "norm2.scale"], sd[p + "norm2.shift"]
        qkv = [p + f"att.W_{n}" for n in ("query", "key", "value")]
        out[h + "attn.c_attn.weight"] = torch.cat([sd[k + ".weight"] for k in qkv]).t()
        out[h + "attn.c_attn.bias"] = torch.cat([sd[k + ".bias"] for k in qkv])
        out[h + "attn.c_proj.weight"] = sd[p + "att.out_proj.weight"].t()
        out[h + "attn.c_proj.bias"] = sd[p + "att.out_proj.bias"]
        out[h + "mlp.c_fc.weight"] = sd[p + "ff.layers.0.weight"].t()
        out[h + "mlp.c_fc.bias"] = sd[p + "ff.layers.0.bias"]
        out[h + "mlp.c_proj.weight"] = sd[p + "ff.layers.2.weight"].t()
        out[h + "mlp.c_proj.bias"] = sd[p + "ff.layers.2.bias"]
    hf.load_state_dict({k: v.contiguous() for k, v in out.items()}, strict=False)
    return hf.eval()
