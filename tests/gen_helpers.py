"""Shared helpers for the generation tests: tiny models, a scripted model, and a Hugging Face twin."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from gptforge import GPTConfig, GPTModel, KVCache

def generation_config(tiny_config, **changes) -> GPTConfig:
    """The generation tests' tiny model config, from the conftest `tiny_config` fixture: 256 tokens,
    32 positions, width 64, no qkv bias (changes apply on top)."""
    return GPTConfig.from_dict(tiny_config(**{"vocab_size": 256, "context_length": 32, "emb_dim": 64,
                                              "qkv_bias": False, **changes}))


def tiny_model(cfg: GPTConfig, seed: int = 0) -> GPTModel:
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


def hf_twin(model: GPTModel, attn_implementation: str = "sdpa"):
    """The same weights in transformers' GPT2LMHeadModel (sdpa attention; "eager" returns the
    attention weights), through gptforge's Hugging Face export (Conv1D layout, fused c_attn)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptforge.checkpoint import config_to_hf, state_to_hf

    hf_cfg = config_to_hf(model.cfg)
    hf_cfg.update(bos_token_id=None, eos_token_id=None)
    hf = GPT2LMHeadModel(GPT2Config(**hf_cfg, attn_implementation=attn_implementation))
    missing, unexpected = hf.load_state_dict(state_to_hf(model), strict=False)
    assert not unexpected and all(k == "lm_head.weight" or k.endswith(".attn.bias") for k in missing), missing
    return hf.eval()


def positional_model(scripts: dict[int, list[int]], context_length: int = 256, emb_dim: int = 64) -> GPTModel:
    """A real GPTModel (it saves, loads and serves) whose greedy continuation of any prompt of
    `start` tokens is `scripts[start]`: token embeddings and blocks are zero, so the position alone
    picks the next token. Scripts must not overlap in positions; emb_dim bounds their total length."""
    model = GPTModel(GPTConfig(vocab_size=50257, context_length=context_length, emb_dim=emb_dim, n_heads=4,
                               n_layers=1, drop_rate=0.0, qkv_bias=True)).eval()
    dim = 0
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for norm in (model.final_norm, model.trf_blocks[0].norm1, model.trf_blocks[0].norm2):
            norm.scale.fill_(1.0)
        for start, script in scripts.items():
            for i, token in enumerate(script):
                model.pos_emb.weight[start - 1 + i, dim] = 1.0  # the position that predicts script[i]
                model.out_head.weight[token, dim] = 10.0
                dim += 1
    assert dim <= emb_dim, "scripts too long for emb_dim"
    return model


def overflowing_model(model: GPTModel, token: int) -> GPTModel:
    """A copy of `model` whose weights are all finite but whose computation overflows float32 at
    `token`, and only there: every position from that token on gets NaN logits (later ones attend to
    it), the way a model in reduced precision can break on one input. Block 0's feed-forward gets a
    hidden unit that fires for `token` alone, whose output weight (1e38) times its activation
    overflows; the token's embedding is made large so that its direction survives LayerNorm."""
    model = copy.deepcopy(model)
    width = model.cfg.emb_dim ** 0.5
    with torch.no_grad():
        direction = torch.ones(model.cfg.emb_dim)
        direction[1::2] = -1  # zero mean; a random embedding's dot product with it is small
        direction /= width
        model.tok_emb.weight[token] = 1000 * direction  # any position embedding is small beside it
        ff = model.trf_blocks[0].ff.layers
        # LayerNorm (scale 1, shift 0) turns the token's input into direction * width (dot product with
        # `direction`: width); any other input's dot product is ~N(0, 1). Pre-activation: ~+50 for the
        # token, below -6 for the others unless 7 sigma out, where GELU is exactly 0 in float32.
        ff[0].weight[0] = 100 * direction
        ff[0].bias[0] = -100 * (width - 0.5)
        ff[2].weight[:, 0] = 1e38
    return model
