"""GPT-2 in PyTorch, with the book's names: LayerNorm, GELU, MultiHeadAttention, FeedForward,
TransformerBlock, GPTModel, plus a preallocated KV cache and parameter counting.

The state-dict keys are the book's (`tok_emb`, `trf_blocks.0.att.W_query`, `ff.layers.0`, ...), so a
state dict saved from llms-from-scratch's `GPTModel` loads directly. Construction follows the book's
order with PyTorch's default initialisers, which is what reproduces the seed's figures.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .config import GPTConfig, as_config
from .device import check_fits
from .errors import GptforgeError
from .options import check_value


class LayerNorm(nn.Module):
    """The book's LayerNorm: eps 1e-5, biased variance, parameters named `scale` and `shift`."""

    def __init__(self, emb_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same formula as the book's (x - mean) / sqrt(var_biased + eps) * scale + shift, fused.
        return F.layer_norm(x, (x.shape[-1],), self.scale, self.shift, self.eps)


class GELU(nn.Module):
    """GELU with the tanh approximation, as GPT-2 and the book use."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention through `F.scaled_dot_product_attention`.

    Same parameters as the book's (W_query, W_key, W_value, out_proj) and the same result as its
    explicit masked softmax; dropout on the attention weights only in training mode.
    """

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
                 qkv_bias: bool = False):
        super().__init__()
        if d_out % num_heads != 0:
            raise GptforgeError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads})")
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.context_length = context_length
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        # Set by gptforge.fast.prepare_for_inference: one (d_in -> 3 * d_out) projection computing
        # query, key and value in a single matmul (decoding is dominated by per-call costs).
        self.fused_qkv: nn.Module | None = None

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                start: int = 0, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, d_in). kv: this layer's cache buffers, each (B, nh, max_len, hs), written at
        [start, start + T). attn_mask: (B or 1, 1, T, start + T) boolean, from `_attention_mask`
        (GPTModel builds it once for all layers); None means plain causal attention over positions
        0..T-1, or a single query that sees every cached key. Returns (B, T, d_out)."""
        b, t, _ = x.shape
        q, k, v = self.project_qkv(x)
        if kv is not None:
            k_cache, v_cache = kv
            if k_cache.dtype == KV_Q8_0:  # rows of Q8_0 blocks (GPTModel.kv_dtype)
                k_cache[:, :, start:start + t], v_cache[:, :, start:start + t] = q8_0_rows(k), q8_0_rows(v)
                k, v = q8_0_floats(k_cache[:, :, :start + t]), q8_0_floats(v_cache[:, :, :start + t])
            else:
                k_cache[:, :, start:start + t] = k
                v_cache[:, :, start:start + t] = v
                k, v = k_cache[:, :, :start + t], v_cache[:, :, :start + t]  # (B, nh, S, hs), S = start + T
                if k.dtype == torch.float16 and k.device.type == "cpu":  # a half cache (GPTModel.kv_dtype)
                    k, v = k.float(), v.float()
            q = q.to(k.dtype)  # a bf16 model on CPU attends in the cache's float32

        if attn_mask is None and start > 0 and t > 1:
            attn_mask = _attention_mask(t, start, None, x.device)
        causal = attn_mask is None and t > 1
        context = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=causal,
            dropout_p=self.dropout.p if self.training else 0.0,
        ).to(x.dtype)  # (B, nh, T, hs)
        context = context.transpose(1, 2).reshape(b, t, self.d_out)  # (B, T, d_out)
        return self.out_proj(context)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, T, d_in) -> query, key and value, each (B, nh, T, hs), split into heads."""
        b, t, _ = x.shape
        if self.fused_qkv is not None:
            qkv = self.fused_qkv(x).view(b, t, 3, self.num_heads, self.head_dim)  # (B, T, 3, nh, hs)
            return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, T, hs)
        q = self.W_query(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.W_key(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = self.W_value(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        return q, k, v


def _attention_mask(t: int, start: int, key_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Boolean mask (B or 1, 1, T, S) allowing query i (at absolute position start + i) to see keys
    j <= start + i that are not padding. A query always sees itself, so a padding row is never all
    masked (its output is discarded, but a fully masked row would make NaNs)."""
    s = start + t
    query_pos = torch.arange(start, s, device=device)[:, None]  # (T, 1)
    key_pos = torch.arange(s, device=device)[None, :]  # (1, S)
    mask = key_pos <= query_pos  # (T, S)
    if key_mask is None:
        return mask[None, None]
    mask = mask[None] & key_mask[:, None, :s].bool()  # (B, T, S)
    mask = mask | (key_pos == query_pos)[None]
    return mask[:, None]  # (B, 1, T, S)


class FeedForward(nn.Module):
    """Linear(d, 4d) -> GELU -> Linear(4d, d), in an `nn.Sequential` named `layers` as in the book."""

    def __init__(self, cfg: GPTConfig | Mapping[str, Any]):
        super().__init__()
        d = cfg["emb_dim"]
        self.layers = nn.Sequential(nn.Linear(d, 4 * d), GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + drop(att(norm1(x))), then x + drop(ff(norm2(x)))."""

    def __init__(self, cfg: GPTConfig | Mapping[str, Any]):
        super().__init__()
        self.att = MultiHeadAttention(
            d_in=cfg["emb_dim"], d_out=cfg["emb_dim"], context_length=cfg["context_length"],
            num_heads=cfg["n_heads"], dropout=cfg["drop_rate"], qkv_bias=cfg["qkv_bias"],
        )
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"])
        self.norm2 = LayerNorm(cfg["emb_dim"])
        self.drop_resid = nn.Dropout(cfg["drop_rate"])

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                start: int = 0, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        attended = self.att(self.norm1(x), kv, start, attn_mask)
        x = x + (self.drop_resid(attended) if self.training else attended)  # eval: skip the no-op call
        fed = self.ff(self.norm2(x))
        x = x + (self.drop_resid(fed) if self.training else fed)
        return x


IGNORE_INDEX = -100  # targets left out of the loss (F.cross_entropy's default ignore_index)


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits `hidden @ weight.T` against `targets`, without keeping the
    logits: the training loss of the output head, fused.

    The (N, vocab) logits are the largest tensors of a training step, several times over in
    float32 (logits, log-probabilities, their gradient). Here they are computed `chunk` rows at a
    time; each chunk's loss is summed and its gradient (softmax - one_hot) is kept, in the compute
    dtype, for backward, which turns it into the gradients of `hidden` and `weight` with two
    matmuls. Same arithmetic as `F.cross_entropy(out_head(hidden).float(), targets)`, including
    under bf16 autocast (bf16 matmuls, float32 softmax), and, as it, targets of -100 are left out
    (padding in instruction batches): the mean is over the others."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk: int = 1024) -> torch.Tensor:
        # hidden (N, d), weight (V, d), targets (N,) in [0, V) or IGNORE_INDEX
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        h, w = hidden.to(dtype), weight.to(dtype)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        n = h.shape[0]
        counted = targets != IGNORE_INDEX  # (N,)
        grad_logits = torch.empty(n, w.shape[0], dtype=dtype, device=h.device) if need_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        with torch.autocast(device_type, enabled=False):
            for start in range(0, n, chunk):
                rows = slice(start, start + chunk)
                log_probs = torch.log_softmax(h[rows] @ w.T, dim=-1, dtype=torch.float32)  # (c, V)
                keep = counted[rows]
                t = targets[rows].where(keep, 0)  # an ignored row picks id 0, then counts 0
                picked = torch.arange(t.shape[0], device=h.device), t
                target_log_probs = log_probs[picked].where(keep, 0.0)  # (c,)
                loss -= target_log_probs.sum()
                if need_grad:  # d(-log p_t)/d(logits) = softmax - one_hot
                    grad = grad_logits[rows]
                    torch.exp(log_probs, out=grad)  # the softmax, rounded once to the compute dtype
                    grad[picked] = (target_log_probs.exp() - 1).to(dtype)  # p_t - 1 from float32
                    grad[~keep] = 0
        count = counted.sum()
        ctx.save_for_backward(h, w, grad_logits, count)
        ctx.dtypes = hidden.dtype, weight.dtype
        return loss / count  # nan when every target is ignored, as F.cross_entropy

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, w, grad_logits, count = ctx.saved_tensors
        scale = grad_loss.float() / count
        grad_hidden = grad_weight = None
        with torch.autocast(h.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                grad_hidden = ((grad_logits @ w).float() * scale).to(ctx.dtypes[0])  # (N, d)
            if ctx.needs_input_grad[1]:
                grad_weight = ((grad_logits.T @ h).float() * scale).to(ctx.dtypes[1])  # (V, d)
        return grad_hidden, grad_weight, None, None


# A KVCache of this dtype holds each head's key or value vector at a position as llama.cpp's Q8_0
# blocks (`q8_0_rows`): 68 bytes for GPT-2's 64 values, against fp16's 128, where attention reads
# the whole cache at every decode step.
KV_Q8_0 = torch.uint8


def q8_0_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., hs) float, hs a multiple of 32 -> (..., hs + hs / 16) uint8, Q8_0 per block of 32
    values: d = max |x| / 127, q = round(x * (1 / d)) (to even), stored as the hs int8 q, then
    the hs / 32 d's as fp16. `q8_0_floats` reads them back."""
    blocks = x.float().unflatten(-1, (-1, 32))  # (..., hs / 32, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    q = (blocks * torch.where(d > 0, 1 / d, 0)).round().to(torch.int8)
    return torch.cat([q.flatten(-2).view(torch.uint8), d.squeeze(-1).half().view(torch.uint8)], -1)


def q8_0_floats(rows: torch.Tensor) -> torch.Tensor:
    """`q8_0_rows`' (..., hs + hs / 16) uint8 -> (..., hs) float32: each q times its block's d."""
    hs = rows.shape[-1] * 16 // 17
    q = rows[..., :hs].view(torch.int8).float().unflatten(-1, (-1, 32))  # (..., hs / 32, 32)
    return (q * rows[..., hs:].view(torch.float16).float()[..., None]).flatten(-2)


def kv_row(head_dim: int, dtype: torch.dtype) -> int:
    """A KVCache row's length, in elements of `dtype`, for heads of `head_dim` values: Q8_0 rows
    hold head_dim int8 values and head_dim / 32 fp16 scales (head_dim + head_dim / 16 bytes)."""
    return head_dim + head_dim // 16 if dtype == KV_Q8_0 else head_dim


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` positions: (layers, batch,
    heads, max_len, head_dim) tensors in `dtype`, or, for KV_Q8_0, each row head_dim + head_dim / 16
    bytes of Q8_0 blocks.

    `length` counts the positions already written; `GPTModel.forward` writes the next ones and
    advances it.
    """

    def __init__(self, cfg: GPTConfig | Mapping[str, Any] | str, batch_size: int, max_len: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        cfg = as_config(cfg)
        check_value("batch_size", batch_size, "int", minimum=1)
        max_len = cfg.context_length if max_len is None else max_len
        check_value("max_len", max_len, "int", minimum=1, maximum=cfg.context_length)
        if dtype != KV_Q8_0 and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise GptforgeError(f"a KV cache holds floats (or KV_Q8_0's bytes), got dtype {dtype}: integer "
                                "keys and values would be truncated")
        if dtype == KV_Q8_0 and cfg.head_dim % 32:
            raise GptforgeError(f"a Q8_0 KV cache needs a head size divisible by 32, got {cfg.head_dim}")
        KVCache.check_fits(cfg, batch_size, max_len, device, dtype)
        shape = (cfg.n_layers, batch_size, cfg.n_heads, max_len, kv_row(cfg.head_dim, dtype))
        # Zeros, not torch.empty: a padded slot is read under a zero attention weight, and 0 * NaN
        # from uninitialised memory would poison the row.
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0

    @staticmethod
    def check_fits(cfg: GPTConfig, batch_size: int, max_len: int, device: torch.device | str | None,
                   dtype: torch.dtype, hint: str = "generate fewer sequences at once (prompts x samples each) "
                   "or fewer tokens") -> None:
        """Refuse a cache that could never fit in `device`'s memory (see `device.check_fits`); with
        dtype KV_Q8_0, the smallest a cache can be."""
        values = 2 * cfg.n_layers * batch_size * cfg.n_heads * max_len * kv_row(cfg.head_dim, dtype)
        check_fits(values * torch.empty((), dtype=dtype).element_size(), device,
                   f"a KV cache of {batch_size} rows x {max_len} positions", hint)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[i], self.values[i]

    def rows(self, n: int, length: int) -> KVCache:
        """A view of the first `n` batch rows, positioned at `length` (the model's writes through
        it land in this cache): lets a scheduler run a step on only its active rows."""
        view = copy.copy(self)
        view.keys, view.values, view.length = self.keys[:, :n], self.values[:, :n], length
        return view

    def reset(self) -> None:
        self.length = 0


class GPTModel(nn.Module):
    """GPT-2: token + position embeddings, dropout, `n_layers` TransformerBlocks, final LayerNorm,
    bias-free output head. Accepts a GPTConfig, the book's plain dict, or a preset name."""

    # The KV cache's dtype, where not the default (see new_cache): prepare_for_inference sets
    # KV_Q8_0 for int8/int4 models decoding on gptforge's kernels (a quarter of float32's memory
    # traffic, half of fp16's).
    kv_dtype: torch.dtype | None = None
    # Activation checkpointing (training): each block's activations are recomputed in backward
    # instead of kept (torch.utils.checkpoint, non-reentrant; dropout masks are replayed).
    grad_checkpointing: bool = False

    def __init__(self, cfg: GPTConfig | Mapping[str, Any] | str):
        super().__init__()
        cfg = as_config(cfg)
        self.cfg = cfg
        # The construction order below is the book's: it decides what torch.manual_seed produces.
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = LayerNorm(cfg.emb_dim)
        if cfg.classifier is None:
            self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        else:  # the book's chapter-6 head: one output per class, with a bias
            self.out_head = nn.Linear(cfg.emb_dim, cfg.classifier.num_classes)
        if cfg.tie_weights:
            self.out_head.weight = self.tok_emb.weight  # one tensor: same storage, one gradient
        if cfg.init == "gpt2":
            self.apply_gpt2_init()

    @torch.no_grad()
    def apply_gpt2_init(self) -> None:
        """GPT-2's initialisation: normal(0, 0.02) weights, zero biases, and the two residual
        projections of each block scaled by 1/sqrt(2 * n_layers)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for block in self.trf_blocks:
            nn.init.normal_(block.att.out_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.ff.layers[2].weight, mean=0.0, std=residual_std)

    def forward(self, in_idx: torch.Tensor, *, cache: KVCache | None = None,
                positions: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                last_only: bool = False, targets: torch.Tensor | None = None) -> torch.Tensor:
        """in_idx: (B, T) token ids. Returns logits (B, T, vocab_size), or (B, 1, vocab_size) with
        `last_only` (only the last position goes through the head).

        targets: (B, T) next-token ids. Then the result is the mean cross-entropy loss (a scalar),
        computed by `LinearCrossEntropy` without materialising the logits: what training uses.

        cache: decode against cached keys/values, writing positions [cache.length, cache.length + T).
        positions: (B, T) or (T,) position ids (default: consecutive from cache.length or 0).
        attention_mask: (B, cache.length + T), 1 for real tokens and 0 for (left) padding.
        """
        x = self.hidden_states(in_idx, cache=cache, positions=positions, attention_mask=attention_mask,
                               last_only=last_only)
        if targets is not None and type(self.out_head) is nn.Linear and self.out_head.bias is None:
            return LinearCrossEntropy.apply(x.flatten(0, 1), self.out_head.weight, targets.flatten())
        logits = self.out_head(x)
        if targets is not None:  # a wrapped head (LoRA) cannot be fused: the plain loss
            return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits

    def hidden_states(self, in_idx: torch.Tensor, *, cache: KVCache | None = None,
                      positions: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                      last_only: bool = False) -> torch.Tensor:
        """in_idx: (B, T) token ids. Returns the final LayerNorm's output (B, T, emb_dim) (or (B, 1,
        emb_dim) with `last_only`): what the output head reads, and what embeddings pool. The
        other arguments are `forward`'s."""
        b, t = in_idx.shape
        start = cache.length if cache is not None else 0
        if start + t > (cache.max_len if cache is not None else self.cfg.context_length):
            limit = cache.max_len if cache is not None else self.cfg.context_length
            raise GptforgeError(f"sequence of {start + t} tokens exceeds the model's {limit} positions")
        if positions is None:
            positions = torch.arange(start, start + t, device=in_idx.device)
        x = self.tok_emb(in_idx) + self.pos_emb(positions)  # (B, T, d)
        if self.training:
            x = self.drop_emb(x)
        attn_mask = None  # built once here rather than in every layer
        if attention_mask is not None or (start > 0 and t > 1):
            attn_mask = _attention_mask(t, start, attention_mask, in_idx.device)
        recompute = self.grad_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.trf_blocks):
            if recompute:
                x = torch.utils.checkpoint.checkpoint(block, x, None, start, attn_mask, use_reentrant=False)
                continue
            x = block(x, cache.layer(i) if cache is not None else None, start, attn_mask)
        if cache is not None:
            cache.length = start + t
        if last_only:
            x = x[:, -1:, :]  # (B, 1, d)
        return self.final_norm(x)

    def num_parameters(self, exclude_head: bool = False) -> int:
        """Distinct parameters (a tied head is counted once). `exclude_head` also leaves out an
        untied output head, the seed's 'counting the output head once'."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_head and not self.cfg.tie_weights:
            total -= self.out_head.weight.numel()
        return total

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """A KV cache on this model's device, in `kv_dtype` where set, else in its dtype; on CPU
        float32, because PyTorch's CPU attention over a long bf16 cache is ~8x slower than over a
        float32 one."""
        p = self.tok_emb.weight
        dtype = self.kv_dtype or (torch.float32 if p.device.type == "cpu" else p.dtype)
        return KVCache(self.cfg, batch_size, max_len, device=p.device, dtype=dtype)


@dataclasses.dataclass(frozen=True)
class ParameterCounts:
    """Parameter counts of a config, by component. `head` is 0 when tied to the embedding."""

    embeddings: int
    attention: int
    feed_forward: int
    norms: int
    head: int
    head_shape: tuple[int, int]

    @property
    def total(self) -> int:
        """Distinct parameters: what `sum(p.numel() for p in model.parameters())` prints."""
        return self.embeddings + self.attention + self.feed_forward + self.norms + self.head

    @property
    def total_head_once(self) -> int:
        """Counting the output head once (as if tied to the embedding): the seed's 124,412,160."""
        return self.embeddings + self.attention + self.feed_forward + self.norms

    def weight_bytes(self, dtype: torch.dtype) -> int:
        return self.total * torch.empty((), dtype=dtype).element_size()


def count_parameters(cfg: GPTConfig | Mapping[str, Any] | str) -> ParameterCounts:
    """Parameter counts for any config, computed from its shape without building the model."""
    cfg = as_config(cfg)
    d, v, L = cfg.emb_dim, cfg.vocab_size, cfg.n_layers
    attention = L * (3 * d * d + (3 * d if cfg.qkv_bias else 0) + d * d + d)
    feed_forward = L * (d * 4 * d + 4 * d + 4 * d * d + d)
    norms = (2 * L + 1) * 2 * d
    head = 0 if cfg.tie_weights else v * d
    if cfg.classifier is not None:
        head = cfg.classifier.num_classes * (d + 1)
    return ParameterCounts(
        embeddings=v * d + cfg.context_length * d, attention=attention, feed_forward=feed_forward,
        norms=norms, head=head,
        head_shape=(v if cfg.classifier is None else cfg.classifier.num_classes, d),
    )
