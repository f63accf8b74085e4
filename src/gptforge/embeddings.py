"""Text embeddings from a GPT model: one vector per input, for search and retrieval.

The vector of a text is the mean of the final LayerNorm's outputs (the states the output head
reads, `GPTModel.hidden_states`) over the text's tokens, scaled to unit length (so that a dot
product is the cosine similarity, as OpenAI's vectors are). Mean rather than the last token's
state: GPT-2 was trained only to predict the next token, so its last position mostly encodes what
may come next (and leans on the final word or punctuation), while the mean carries every token of
the text; the last-token vectors that embedding models use come from contrastive training that
GPT-2 never had. `pooling="last"` gives the last token's state for those who want it.

Inputs are run in batches, longest first, right-padded: attention is causal, so a text's tokens
never see the padding after them and each vector is exactly the text's alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import GptforgeError
from .model import GPTModel
from .fast import inference_view
from .tokenizer import Tokenizer, as_tokenizer

POOLINGS = ("mean", "last")
BATCH_TOKENS = 8192  # a batch's padded size at most (its attention scores grow with the square of its length)

Inputs = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]]


def input_ids(inputs: Inputs, tokenizer: Tokenizer | None = None, vocab_size: int | None = None) -> list[list[int]]:
    """The token ids of each input: a text, a list of texts, one list of token ids, or a list of
    token-id lists (OpenAI's `input`). An empty input, an empty text, a wrong type or an id outside
    the vocabulary (`vocab_size`, and the tokenizer's) is a GptforgeError naming it."""
    tokenizer = as_tokenizer(tokenizer)
    if isinstance(inputs, str):
        items: list = [inputs]
    elif isinstance(inputs, Sequence) and not isinstance(inputs, (bytes, bytearray)):
        items = list(inputs)
        if items and all(_is_id(i) for i in items):
            items = [items]  # one input given as token ids
    else:
        raise GptforgeError(f"input must be a string, a list of strings or token ids, got {type(inputs).__name__}")
    if not items:
        raise GptforgeError("input must not be empty: give at least one text")
    limit = min(vocab_size or tokenizer.vocab_size, tokenizer.vocab_size)
    rows = []
    for n, item in enumerate(items):
        if isinstance(item, str):
            ids = tokenizer.encode(item)
            if not ids:
                raise GptforgeError(f"input {n} is an empty text; give each input some text")
        elif isinstance(item, Sequence) and not isinstance(item, (bytes, bytearray)) and all(_is_id(i) for i in item):
            ids = list(item)
            if not ids:
                raise GptforgeError(f"input {n} is an empty list of token ids")
            bad = [i for i in ids if not 0 <= i < limit]
            if bad:
                raise GptforgeError(f"input {n} has token ids {bad[:5]} outside the vocabulary [0, {limit})")
        else:
            raise GptforgeError(f"input {n} must be a string or a list of token ids, got {type(item).__name__}")
        rows.append(ids)
    return rows


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@torch.no_grad()
def embed(model: nn.Module, inputs: Inputs, *, pooling: str = "mean", normalize: bool = True,
          batch_size: int = 16, tokenizer: Tokenizer | None = None) -> torch.Tensor:
    """Embedding vectors (N, emb_dim), float32 on the CPU, of N inputs (texts or token ids; see
    `input_ids`) under a GPTModel (a language model or a classifier: its trunk is the same).

    pooling: "mean" of the final-norm states over each input's tokens, or the "last" token's.
    normalize: scale each vector to unit length (L2), as OpenAI's. batch_size: inputs per forward
    pass (fewer where they are long). An input longer than the model's context is a GptforgeError:
    it would have to be cut, and a vector of part of a text is not that text's."""
    if pooling not in POOLINGS:
        raise GptforgeError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise GptforgeError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(model, GPTModel):
        raise GptforgeError(f"expected a GPTModel, got {type(model).__name__}")
    rows = input_ids(inputs, tokenizer, model.cfg.vocab_size)
    context = model.cfg.context_length
    for n, ids in enumerate(rows):
        if len(ids) > context:
            raise GptforgeError(f"input {n} has {len(ids)} tokens, more than the model's context of {context}")
    view = inference_view(model.eval())  # the kernels generate uses, where the model has not been prepared
    device = next(model.parameters()).device
    out = torch.empty(len(rows), model.cfg.emb_dim)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    start = 0
    while start < len(order):
        longest = len(rows[order[start]])
        take = max(1, min(batch_size, BATCH_TOKENS // longest))
        batch = order[start:start + take]
        ids = torch.zeros(len(batch), longest, dtype=torch.long)  # right padding: causal attention never reads it
        for j, i in enumerate(batch):
            ids[j, :len(rows[i])] = torch.tensor(rows[i])
        lengths = torch.tensor([len(rows[i]) for i in batch])
        states = view.hidden_states(ids.to(device)).float().cpu()  # (b, T, d)
        if pooling == "mean":
            real = (torch.arange(longest)[None, :] < lengths[:, None]).float()  # (b, T)
            vectors = (states * real[..., None]).sum(1) / lengths[:, None]
        else:
            vectors = states[torch.arange(len(batch)), lengths - 1]
        out[torch.tensor(batch)] = vectors
        start += take
    return F.normalize(out, dim=-1) if normalize else out
