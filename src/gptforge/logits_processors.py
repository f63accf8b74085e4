"""Logits processors: small callables, each mapping (logits (B, V) float32, ids (B, T) int64) to
logits (B, V). `ids` are the tokens so far (prompt and generated); negative entries are padding and
are ignored. `GenerationConfig.processors` builds the pipeline; a server may call them directly.

Numerically safe for every value their options accept: given finite logits, none returns NaN or
+inf, and each leaves at least one token finite (so sampling afterwards never fails). Extreme values
approach their limit (a temperature of 1e-38 is greedy, a top_p of 1e-300 keeps the top token)."""

from __future__ import annotations

import dataclasses

import torch


def _token_counts(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, T) ids -> (B, V) float32 occurrence counts, ignoring negative (padding) ids."""
    index = torch.where(ids < 0, vocab_size, ids)  # padding goes to an extra column, dropped below
    counts = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.float32, device=ids.device)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float32))
    return counts[:, :vocab_size]


def _clamp_finite(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`values` in `dtype`, what overflows it held at its largest finite magnitude (-inf stays -inf)."""
    info = torch.finfo(dtype)
    return values.clamp(min=info.min, max=info.max).to(dtype).where(values != float("-inf"), float("-inf"))


@dataclasses.dataclass(frozen=True)
class RepetitionPenalty:
    """CTRL's / Hugging Face's repetition penalty: a token already present has its logit divided
    by `penalty` if positive, multiplied if negative (penalty > 1 discourages repeats)."""

    penalty: float

    def __call__(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        seen = _token_counts(ids, logits.shape[-1]) > 0
        wide = logits.double()  # a tiny or huge penalty would overflow float32 (+inf, then NaN in softmax)
        penalized = torch.where(wide > 0, wide / self.penalty, wide * self.penalty)
        return torch.where(seen, _clamp_finite(penalized, logits.dtype), logits)


@dataclasses.dataclass(frozen=True)
class PresenceFrequencyPenalty:
    """OpenAI's penalties: logit -= presence * [count > 0] + frequency * count."""

    presence: float
    frequency: float

    def __call__(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        counts = _token_counts(ids, logits.shape[-1])
        return logits - self.presence * (counts > 0).float() - self.frequency * counts


@dataclasses.dataclass(frozen=True)
class Temperature:
    """Divide logits by the temperature (> 0): below 1 sharpens, above 1 flattens. Each row is first
    shifted so that its largest logit is 0 (softmax is unchanged): a tiny temperature then sends the
    others to -inf (greedy, its limit) instead of overflowing them to +inf; the division is done in
    float64, so a temperature below float32's smallest number divides as itself, not as 0."""

    temperature: float

    def __call__(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        top = logits.amax(-1, keepdim=True).clamp(min=torch.finfo(logits.dtype).min)  # a row of -inf stays -inf
        return ((logits - top).double() / self.temperature).to(logits.dtype)


@dataclasses.dataclass(frozen=True)
class TopK:
    """Keep exactly the `k` highest logits; the rest become -inf. Ties at the k-th value are
    broken towards the lower token id, so exactly k survive (nanoGPT's `logits < v[-1]` keeps
    every tied token instead)."""

    k: int

    def __call__(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.k >= logits.shape[-1]:
            return logits
        kth = torch.topk(logits, self.k, dim=-1).values[:, -1:]  # (B, 1)
        above = logits > kth
        tied = logits == kth
        room = self.k - above.sum(-1, keepdim=True)  # (B, 1) slots left for tied tokens
        keep = above | (tied & (tied.cumsum(-1) <= room))
        return logits.masked_fill(~keep, float("-inf"))


@dataclasses.dataclass(frozen=True)
class TopP:
    """Nucleus sampling: keep the smallest set of most probable tokens whose probability sums to
    at least `p` (the most probable token always survives)."""

    p: float

    def __call__(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # probability of the more likely tokens
        drop_sorted = mass_before >= self.p  # (a p below float32's range compares as 0: drops all...)
        drop_sorted[:, 0] = False  # ...but the most probable token always survives
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        return logits.masked_fill(drop, float("-inf"))


@dataclasses.dataclass(frozen=True)
class MinP:
    """Keep tokens whose probability is at least `p` times the most probable token's."""

    p: float

    def __call__(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        probs = logits.softmax(-1)
        floor = self.p * probs.max(-1, keepdim=True).values
        return logits.masked_fill(probs < floor, float("-inf"))
