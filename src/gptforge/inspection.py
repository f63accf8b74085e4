"""Looking inside one forward pass: attention weights, a logit lens, tensor shapes, the model card.

`trace` runs GPTModel's blocks one by one, as `GPTModel.forward` does, but computes each layer's
attention as the book's explicit softmax(q k^T / sqrt(hs)) so that the weights can be kept. The
normal forward (scaled_dot_product_attention, no weights) is untouched: inspection is opt-in and
costs nothing when unused. What the server's `POST /v1/inspect` and `GET /v1/model_card` answer
is built here (`inspect_prompt`, `model_card`); the page at `/` draws it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from .config import GPTConfig
from .generation import GenerationConfig, next_tokens
from .model import GPTModel, count_parameters
from .tokenizer import Tokenizer

MAX_LENS_TOP_K = 20


@dataclasses.dataclass
class Trace:
    """One forward pass, kept.

    logits: (T, V) the model's output for every position (V: vocabulary, or classes for a classifier).
    hidden: n_layers tensors (T, d), the residual stream after each block (before the final norm).
    attention: {layer: (nh, T, T) float32 weights}, for the layers asked; row i is query position i.
    shapes: (name, shape) of each tensor in the order the pass made them (block 0 in detail).
    """

    logits: torch.Tensor
    hidden: list[torch.Tensor]
    attention: dict[int, torch.Tensor]
    shapes: list[tuple[str, list[int]]]


@torch.no_grad()
def trace(model: GPTModel, ids: torch.Tensor, attention_layers: tuple[int, ...] | None = None) -> Trace:
    """ids: (1, T) token ids -> a `Trace` of the model's forward pass on them (eval mode, no cache).

    attention_layers: the layers whose weights to keep (None: all). The arithmetic is the book's
    explicit masked softmax in float32, equal to `model(ids)` up to rounding."""
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"ids must have shape (1, T), got {tuple(ids.shape)}")
    keep = set(range(model.cfg.n_layers) if attention_layers is None else attention_layers)
    t = ids.shape[1]
    shapes: list[tuple[str, list[int]]] = [("token ids", list(ids.shape))]
    tok = model.tok_emb(ids)  # (1, T, d)
    pos = model.pos_emb(torch.arange(t, device=ids.device))  # (T, d)
    x = tok + pos
    shapes += [("tok_emb", list(tok.shape)), ("pos_emb", list(pos.shape)), ("embeddings", list(x.shape))]
    causal = torch.ones(t, t, dtype=torch.bool, device=ids.device).tril()
    hidden, attention = [], {}
    for i, block in enumerate(model.trf_blocks):
        att = block.att
        q, k, v = att.project_qkv(block.norm1(x))  # each (1, nh, T, hs)
        scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(att.head_dim)  # (1, nh, T, T)
        weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        context = (weights @ v.float()).to(x.dtype)  # (1, nh, T, hs)
        context = context.transpose(1, 2).reshape(1, t, att.d_out)  # (1, T, d)
        x = x + att.out_proj(context)
        ff_hidden = block.ff.layers[1](block.ff.layers[0](block.norm2(x)))  # (1, T, 4d)
        x = x + block.ff.layers[2](ff_hidden)
        if i in keep:
            attention[i] = weights[0]
        hidden.append(x[0])
        if i == 0:
            shapes += [("block 0: query, key, value (split into heads)", list(q.shape)),
                       ("block 0: attention weights", list(weights.shape)),
                       ("block 0: context (heads joined)", list(context.shape)),
                       ("block 0: feed-forward hidden", list(ff_hidden.shape)),
                       ("block 0: output", list(x.shape))]
    if model.cfg.n_layers > 1:
        rest = "block 1" if model.cfg.n_layers == 2 else f"blocks 1-{model.cfg.n_layers - 1}"
        shapes.append((f"{rest}: output", list(x.shape)))
    normed = model.final_norm(x)
    logits = model.out_head(normed)  # (1, T, V)
    shapes += [("final_norm", list(normed.shape)), ("out_head (logits)", list(logits.shape))]
    return Trace(logits[0].float(), hidden, attention, shapes)


@torch.no_grad()
def logit_lens(model: GPTModel, hidden: list[torch.Tensor], top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each layer's residual stream (T, d) read as if it were the last: final norm, head, softmax.
    Returns (probs, ids), each (n_layers, T, top_k), the top_k tokens per layer and position. The
    last layer's row is the model's own next-token distribution."""
    probs, ids = [], []
    for h in hidden:  # one layer at a time: T x V floats, not n_layers x T x V
        p = model.out_head(model.final_norm(h)).float().softmax(-1)  # (T, V)
        top = p.topk(top_k, dim=-1)
        probs.append(top.values)
        ids.append(top.indices)
    return torch.stack(probs), torch.stack(ids)


@torch.no_grad()
def next_token_distribution(logits: torch.Tensor, ids: torch.Tensor, config: GenerationConfig,
                            top: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """logits: (V,) of the next position; ids: (1, T) the context (the penalties read it).
    Returns the `top` (probs, ids) of the distribution sampling draws from after `config`'s
    processors (temperature, top-k, top-p, ...; greedy: softmax(logits)), and the token that
    `generate` would pick (with `config.seed`, the first token of a completion with that seed)."""
    scores = logits.float()[None]
    for process in config.processors:
        scores = process(scores, ids)
    found = scores.softmax(-1)[0].topk(min(top, scores.shape[-1]))
    chosen = next_tokens(logits[None], ids, config, config.make_generator(logits.device))
    return found.values, found.indices, int(chosen[0])


def parameter_counts(cfg: GPTConfig) -> dict[str, dict[str, int]]:
    """Parameters by component, with the head tied to the token embedding and without (a
    classifier's head is its own either way)."""
    out = {}
    for name, tied in (("tied", True), ("untied", False)):
        counts = count_parameters(cfg.replace(tie_weights=tied and cfg.classifier is None))
        out[name] = {"token_embedding": cfg.vocab_size * cfg.emb_dim,
                     "position_embedding": cfg.context_length * cfg.emb_dim,
                     "attention": counts.attention, "feed_forward": counts.feed_forward,
                     "layer_norms": counts.norms, "output_head": counts.head, "total": counts.total}
    return out


def model_card(model: GPTModel, name: str, tokenizer: Tokenizer, example: str = "Hello, I am") -> dict[str, Any]:
    """What the page shows about the served model: its kind (what it can do), config, parameter
    counts and the tensor shapes of one forward pass on `example`."""
    cfg = model.cfg
    ids = torch.tensor([tokenizer.encode(example)], device=model.tok_emb.weight.device)
    classifier = cfg.classifier is not None
    return {
        "object": "model_card", "id": name,
        "kind": "classifier" if classifier else "language_model",
        "chat": cfg.prompt_template is not None and not classifier,
        "labels": list(cfg.classifier.labels) if classifier else None,
        "config": cfg.to_dict(),
        "tied_weights": cfg.tie_weights,
        "parameters": model.num_parameters(),
        "parameter_counts": parameter_counts(cfg),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "example": example,
        "shapes": [{"name": n, "shape": s} for n, s in trace(model, ids, ()).shapes],
    }


def _token_texts(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.decode_bytes([i]).decode("utf-8", "replace") for i in ids]


def inspect_prompt(model: GPTModel, tokenizer: Tokenizer, ids: list[int], *, attention_layers: tuple[int, ...],
                   lens_top_k: int, next_config: GenerationConfig | None = None,
                   next_top: int = 20) -> dict[str, Any]:
    """The body of `POST /v1/inspect` for prompt `ids` (checked by the caller): tokens, attention of
    `attention_layers` as [layer][head][query][key], the logit lens (lens_top_k per layer and
    position; 0 leaves it out) and, with `next_config`, the next token's top `next_top`
    distribution after its processors and the token chosen from it."""
    device = model.tok_emb.weight.device
    x = torch.tensor([ids], device=device)
    run = trace(model, x, attention_layers)
    body: dict[str, Any] = {
        "object": "inspection",
        "tokens": [{"id": i, "text": s} for i, s in zip(ids, _token_texts(tokenizer, ids))],
        "attention": [{"layer": layer, "heads": run.attention[layer].round(decimals=6).tolist()}
                      for layer in attention_layers],
        "shapes": [{"name": n, "shape": s} for n, s in run.shapes],
    }
    if lens_top_k:
        probs, top_ids = logit_lens(model, run.hidden, lens_top_k)
        texts = {i: s for i, s in zip(top_ids.unique().tolist(), _token_texts(tokenizer, top_ids.unique().tolist()))}
        body["logit_lens"] = [
            {"layer": layer, "positions": [
                [{"id": i, "text": texts[i], "prob": round(p, 6)} for i, p in zip(row_ids, row_probs)]
                for row_ids, row_probs in zip(top_ids[layer].tolist(), probs[layer].tolist())]}
            for layer in range(len(run.hidden))]
    if next_config is not None:
        probs, top_ids, chosen = next_token_distribution(run.logits[-1], x, next_config, next_top)
        kept = probs > 0  # top-k / top-p leave the rest at zero: not candidates
        top_ids = top_ids[kept].tolist()
        body["next_token"] = {
            "chosen": {"id": chosen, "text": _token_texts(tokenizer, [chosen])[0]},
            "top": [{"id": i, "text": s, "prob": round(p, 6)}
                    for i, s, p in zip(top_ids, _token_texts(tokenizer, top_ids), probs[kept].tolist())]}
    return body
