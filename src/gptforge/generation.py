"""Text generation. `generate_text_simple` is the seed's greedy loop, kept exactly as the book
defines it; `generate_text` is the text-in, text-out helper."""

from __future__ import annotations

import torch
import torch.nn as nn

from .tokenizer import Tokenizer, get_tokenizer


def _check_ids(idx: torch.Tensor) -> None:
    if not isinstance(idx, torch.Tensor):
        raise ValueError(f"idx must be a torch.Tensor of token ids, got {type(idx).__name__}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"idx must hold integer token ids (int64 or int32), got dtype {idx.dtype}")
    if idx.dim() != 2 or idx.shape[0] == 0 or idx.shape[1] == 0:
        raise ValueError(f"idx must have shape (batch, tokens) with both > 0, got {tuple(idx.shape)}")


def _check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def generate_text_simple(model: nn.Module, idx: torch.Tensor, max_new_tokens: int,
                         context_size: int) -> torch.Tensor:
    """The seed's greedy decoding. idx: (B, T) ids; returns (B, T + max_new_tokens).

    Each step crops the context to the last `context_size` tokens, runs the whole model on it,
    and appends the argmax of the last position's logits (softmax is monotonic, so it is skipped).
    """
    _check_ids(idx)
    _check_count("max_new_tokens", max_new_tokens, 0)
    _check_count("context_size", context_size, 1)
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]  # (B, <= context_size)
        with torch.no_grad():
            logits = model(idx_cond)  # (B, T, vocab)
        idx_next = torch.argmax(logits[:, -1, :], dim=-1, keepdim=True)  # (B, 1)
        idx = torch.cat((idx, idx_next.to(idx.dtype)), dim=1)  # (B, T + 1)
    return idx


def prompt_ids(prompt: str, tokenizer: Tokenizer | None = None) -> list[int]:
    """Token ids of a prompt; an empty prompt starts from `<|endoftext|>` (unconditional
    generation, as GPT-2's own sampling scripts do)."""
    tokenizer = tokenizer or get_tokenizer()
    return tokenizer.encode(prompt) or [tokenizer.eot_id]


@torch.no_grad()
def generate_text(model: nn.Module, prompt: str, max_new_tokens: int,
                  tokenizer: Tokenizer | None = None) -> str:
    """Greedy continuation of `prompt` (text in, prompt plus continuation out), in eval mode."""
    tokenizer = tokenizer or get_tokenizer()
    device = next(model.parameters()).device
    idx = torch.tensor([prompt_ids(prompt, tokenizer)], device=device)
    was_training = model.training
    model.eval()
    try:
        out = generate_text_simple(model, idx, max_new_tokens, model.cfg.context_length)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0].tolist())
