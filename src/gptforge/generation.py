"""Text generation: the seed's greedy loop, and a KV-cached engine with sampling, stopping,
batching and streaming.

- `generate_text_simple` is the seed's loop, kept exactly as the book defines it.
- `GenerationConfig` holds every decoding option, validated; `config.processors` is the pipeline of
  small logits processors it implies (penalties, temperature, top-k, top-p, min-p).
- `next_tokens(logits, ids, config, generator)` is one decoding step on a (B, V) logits tensor:
  the function a server calls per request.
- `generate(model, idx, max_new_tokens, **options)` returns ids shaped like `generate_text_simple`'s;
  `generate_text` is text in, text out; `stream_text` yields text as it is produced.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn

from .fast import kernels
from .config import check_language_model, known_fields
from .errors import GptforgeError
from .logits_processors import (  # noqa: F401  (re-exported: they were defined here)
    MinP, PresenceFrequencyPenalty, RepetitionPenalty, Temperature, TopK, TopP,
)
from .model import KV_Q8_0, KVCache
from .options import SEED_MAX, check_fields, check_value, option
from .fast import inference_view
from .tokenizer import ENDOFTEXT_ID, Tokenizer, as_tokenizer


def _check_ids(idx: torch.Tensor, vocab_size: int | None = None) -> None:
    if not isinstance(idx, torch.Tensor):
        raise GptforgeError(f"idx must be a torch.Tensor of token ids, got {type(idx).__name__}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise GptforgeError(f"idx must hold integer token ids (int64 or int32), got dtype {idx.dtype}")
    if idx.dim() != 2 or idx.shape[0] == 0 or idx.shape[1] == 0:
        raise GptforgeError(f"idx must have shape (batch, tokens) with both > 0, got {tuple(idx.shape)}")
    if vocab_size is not None and (int(idx.min()) < 0 or int(idx.max()) >= vocab_size):
        raise GptforgeError(f"token ids must lie in [0, {vocab_size}), got values in [{int(idx.min())}, "
                            f"{int(idx.max())}]")


def generate_text_simple(model: nn.Module, idx: torch.Tensor, max_new_tokens: int,
                         context_size: int) -> torch.Tensor:
    """The seed's greedy decoding. idx: (B, T) ids; returns (B, T + max_new_tokens).

    Each step crops the context to the last `context_size` tokens, runs the whole model on it,
    and appends the argmax of the last position's logits (softmax is monotonic, so it is skipped).
    """
    _check_ids(idx, getattr(getattr(model, "cfg", None), "vocab_size", None))  # the book's model has no cfg
    check_value("max_new_tokens", max_new_tokens, "int", minimum=0)
    check_value("context_size", context_size, "int", minimum=1)
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
    tokenizer = as_tokenizer(tokenizer)
    return tokenizer.encode(prompt) or [tokenizer.eot_id]


# --------------------------------------------------------------------------- configuration

def stop_string_tuple(value: Any, name: str = "GenerationConfig.stop_strings") -> tuple[str, ...]:
    """Stop strings as a tuple: one str or a list of non-empty ones (an empty one would stop at once)."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Sequence) or not all(isinstance(s, str) and s for s in value):
        raise GptforgeError(f"{name} must be a list of non-empty strings, got {value!r}")
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Every decoding option, validated on construction (a bad value is a GptforgeError naming it).
    Each field's help text and range live in its metadata: the `gptforge generate` flags and the
    validation both come from there.

    stop_token_ids end a row after one of these ids (kept in the ids, not in the text); stop_strings
    end it when the generated text contains one, also across token boundaries (the text output ends
    just before it). seed makes sampling repeatable through a private torch.Generator (global RNG
    untouched); None draws from torch's global generator. The penalties apply in greedy mode too
    (as in Hugging Face); the others only when sampling.
    """

    max_new_tokens: int = option(50, "tokens to generate at most (stopping may end a row earlier)", minimum=0)
    temperature: float = option(0.0, "0 = greedy (argmax); > 0 samples from softmax(logits / temperature)",
                                minimum=0)
    top_k: int | None = option(None, "sample among exactly the k most likely tokens", minimum=1)
    top_p: float = option(1.0, "nucleus sampling: keep the most likely tokens up to this total probability "
                               "(1 = off)", above=0, maximum=1)
    min_p: float = option(0.0, "drop tokens less likely than min-p x the most likely one (0 = off)",
                          minimum=0, maximum=1)
    repetition_penalty: float = option(1.0, "> 1 discourages tokens already in the context (1 = off)", above=0)
    presence_penalty: float = option(0.0, "OpenAI-style additive penalty on tokens present, in [-2, 2]",
                                     minimum=-2, maximum=2)
    frequency_penalty: float = option(0.0, "OpenAI-style additive penalty per occurrence, in [-2, 2]",
                                      minimum=-2, maximum=2)
    stop_token_ids: tuple[int, ...] = option(
        (ENDOFTEXT_ID,), "comma-separated ids that end generation, 'none' for none (50256 = <|endoftext|>)",
        metavar="IDS")
    stop_strings: tuple[str, ...] = option(
        (), "stop when the generated text contains TEXT (repeatable; \\n escapes allowed)", flag="--stop")
    num_return_sequences: int = option(1, "samples to draw per prompt (needs temperature > 0)", minimum=1)
    seed: int | None = option(None, "seeds sampling through a private generator", minimum=0, maximum=SEED_MAX)
    pad_token_id: int = option(ENDOFTEXT_ID, "fills finished rows and left padding in returned ids",
                               minimum=0, cli=False)

    def __post_init__(self) -> None:
        check_fields(self)
        object.__setattr__(self, "stop_token_ids", self._id_tuple("stop_token_ids", self.stop_token_ids))
        object.__setattr__(self, "stop_strings", stop_string_tuple(self.stop_strings))
        if self.num_return_sequences > 1 and self.temperature == 0:
            raise GptforgeError("GenerationConfig.num_return_sequences > 1 needs sampling: set temperature > 0 "
                                "(greedy decoding would return identical sequences)")

    @staticmethod
    def _id_tuple(name: str, value: Any) -> tuple[int, ...]:
        if value is None:
            return ()
        if isinstance(value, int) and not isinstance(value, bool):
            value = (value,)
        if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, set, frozenset)):
            raise GptforgeError(f"GenerationConfig.{name} must be a list of token ids, got {value!r}")
        for v in value:
            check_value(f"each of GenerationConfig.{name}", v, "int", minimum=0, maximum=2**63 - 1)  # int64 ids
        return tuple(value)

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    @functools.cached_property
    def processors(self) -> tuple[Any, ...]:
        """The logits processors these options imply, in the order they apply."""
        steps: list[Any] = []
        if self.repetition_penalty != 1:
            steps.append(RepetitionPenalty(self.repetition_penalty))
        if self.presence_penalty or self.frequency_penalty:
            steps.append(PresenceFrequencyPenalty(self.presence_penalty, self.frequency_penalty))
        if self.do_sample:
            if self.temperature != 1:
                steps.append(Temperature(self.temperature))
            if self.top_k is not None:
                steps.append(TopK(self.top_k))
            if self.top_p < 1:
                steps.append(TopP(self.top_p))
            if self.min_p > 0:
                steps.append(MinP(self.min_p))
        return tuple(steps)

    @property
    def plain_greedy(self) -> bool:
        """Whether the next token is just the argmax of the logits (no sampling, no processors)."""
        return not self.do_sample and not self.processors

    @property
    def needs_context(self) -> bool:
        """Whether a processor reads the ids so far (the penalties do)."""
        return self.repetition_penalty != 1 or bool(self.presence_penalty or self.frequency_penalty)

    def replace(self, **changes: Any) -> GenerationConfig:
        return dataclasses.replace(self, **known_fields(GenerationConfig, changes, "generation options"))

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """A private generator seeded with `seed`, or None (torch's global one) without a seed."""
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)

    @classmethod
    def from_options(cls, config: GenerationConfig | None = None, **options: Any) -> GenerationConfig:
        """`config` (or the defaults) with `options` applied; an unknown option is a ValueError."""
        if config is not None and not isinstance(config, cls):
            raise GptforgeError(f"config must be a GenerationConfig (or pass its fields as keywords), got "
                                f"{type(config).__name__}")
        base = config or cls()
        return dataclasses.replace(base, **known_fields(cls, options, "generation options")) if options else base


def next_tokens(logits: torch.Tensor, ids: torch.Tensor | None, config: GenerationConfig,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One decoding step: the next token of each row.

    logits: (B, V) scores of the next position, any float dtype (processed in float32).
    ids: (B, T) int64 tokens so far (prompt and generated), read by the penalties only; negative
        entries count as padding and are ignored. May be None when `config.needs_context` is False.
    config: the decoding options; greedy (argmax) when `config.temperature == 0`.
    generator: the torch.Generator to sample from (e.g. `config.make_generator()`, kept across the
        steps of one request); None uses torch's global generator.
    Returns (B,) int64 token ids. Stopping is the caller's business (see `StopChecker`).
    Every option value that GenerationConfig accepts samples without failing; logits that are not
    finite (NaN or inf: the model overflowed) raise NonFiniteLogits instead of giving a token.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise GptforgeError(f"logits must be a tensor of shape (batch, vocab), got {_shape_or_type(logits)}")
    if not isinstance(config, GenerationConfig):
        raise GptforgeError(f"config must be a GenerationConfig, got {type(config).__name__}")
    check_finite_logits(logits)
    if config.plain_greedy:
        return kernels.argmax(logits)
    processors = config.processors
    if config.needs_context:  # shapes only: no device sync per step
        if ids is None:
            raise GptforgeError("the penalties need the ids so far: pass ids of shape (batch, tokens)")
        if (not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != logits.shape[0]
                or ids.dtype not in (torch.int64, torch.int32)):
            raise GptforgeError(f"ids must be an int64 tensor of shape ({logits.shape[0]}, tokens), one row per "
                                f"row of logits, got {_shape_or_type(ids)}")
    scores = logits.float()
    for process in processors:
        scores = process(scores, ids)
    if not config.do_sample:
        return kernels.argmax(scores)
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


class NonFiniteLogits(GptforgeError):
    """The model's scores for the next token hold NaN or inf: nothing can be sampled from them."""


def finite_rows(logits: torch.Tensor) -> torch.Tensor:
    """(B,) bool: which rows of (B, V) logits are a distribution (see check_finite_logits), in one
    pass: a row's largest score is NaN if any is, +inf if any is, -inf if none is finite."""
    return torch.isfinite(logits.amax(-1))


def check_finite_logits(logits: torch.Tensor) -> None:
    """Raise NonFiniteLogits unless every row of the (B, V) `logits` is a distribution: no NaN, no
    +inf, at least one finite score. -inf is a token ruled out (a grammar's mask, a ban, a bias)."""
    finite = finite_rows(logits)
    if not bool(finite.all()):
        rows = (~finite).nonzero().flatten().tolist()
        raise NonFiniteLogits(
            f"the model's next-token scores are not finite (NaN or inf) in row{'s' * (len(rows) > 1)} "
            f"{', '.join(map(str, rows[:8]))}: its computation overflowed; in float16/bfloat16, try float32")


def _shape_or_type(value: Any) -> str:
    return f"shape {tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__


# --------------------------------------------------------------------------- text and stopping

class TextStream:
    """Turns generated token ids into text incrementally, for one sequence.

    `push(token_id)` returns the text that is now safe to show: never half of a UTF-8 character
    spanning tokens, and never text that might turn out to be the start of a stop string. When a
    stop string appears (also across token boundaries) the text before it is returned, `stopped`
    becomes True and later pushes return "". `finish()` returns what was held back.
    """

    def __init__(self, tokenizer: Tokenizer | None = None, stop_strings: Sequence[str] = ()):
        self.tokenizer = as_tokenizer(tokenizer)
        self.stop_strings = stop_string_tuple(stop_strings, "stop_strings")
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""
        self.text = ""  # everything returned so far
        self.stopped = False

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self._held += self._decoder.decode(self.tokenizer.decode_bytes([token_id]))
        return self._release(final=False)

    def finish(self) -> str:
        """The text still held back (an unfinished character becomes U+FFFD)."""
        if self.stopped:
            return ""
        self._held += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        held = self._held
        hits = [i for i in (held.find(s) for s in self.stop_strings) if i >= 0]
        if hits:
            out, self._held, self.stopped = held[:min(hits)], "", True
        else:
            keep = 0 if final else self._partial_stop_length(held)
            out, self._held = held[:len(held) - keep], held[len(held) - keep:]
        self.text += out
        return out

    def _partial_stop_length(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        best = 0
        for stop in self.stop_strings:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best


# --------------------------------------------------------------------------- batching

def left_pad(sequences: Sequence[Sequence[int]] | Sequence[torch.Tensor], pad_token_id: int = ENDOFTEXT_ID,
             device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> (ids (B, T_max) int64, attention_mask (B, T_max) int64),
    padded on the left so every prompt ends at the last column; the mask is 1 on real tokens."""
    check_value("pad_token_id", pad_token_id, "int", minimum=0)
    if isinstance(sequences, (str, bytes)) or not isinstance(sequences, (Sequence, torch.Tensor)):
        raise GptforgeError(f"prompts must be a list of token id lists, got {type(sequences).__name__}")
    rows = [_id_row(s) for s in sequences]
    if not rows or any(len(r) == 0 for r in rows):
        raise GptforgeError("each prompt needs at least one token id (an empty text prompt is [50256])")
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_token_id] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def _id_row(prompt: Any) -> list[int]:
    """One prompt's ids as a list: a 1-D list, tuple, array or tensor of integers (a flat list of
    ints where a list of prompts belongs, or a float id, would otherwise pass as something else)."""
    try:
        row = prompt if isinstance(prompt, torch.Tensor) else torch.as_tensor(prompt)
    except (TypeError, ValueError, RuntimeError):
        row = None
    if (isinstance(prompt, (str, bytes)) or row is None or row.dim() != 1
            or (row.numel() and (row.dtype.is_floating_point or row.dtype.is_complex or row.dtype == torch.bool))):
        raise GptforgeError(f"each prompt must be a list of integer token ids, got {prompt!r:.60} (one prompt of "
                            "ids goes in a list: [[id, ...]])")
    return row.tolist()


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 mask -> (B, T) position ids counting real tokens from 0 (padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# --------------------------------------------------------------------------- the engine

@dataclasses.dataclass
class _Step:
    tokens: torch.Tensor  # (B,) this step's token per row (pad_token_id for rows already finished)
    done: torch.Tensor  # (B,) bool, rows finished after this step
    texts: list[str] | None  # per row, text released by this step (with `detokenize` or stop strings)


def _check_model(model: nn.Module) -> None:
    if not hasattr(model, "new_cache") or not hasattr(model, "cfg"):
        raise GptforgeError(f"generation needs a gptforge GPTModel, got {type(model).__name__}")
    check_language_model(model.cfg)


@torch.no_grad()
def _forward(model: nn.Module, ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """The model's last-position logits (B, V), without autograd. (No-grad per call, not around
    the whole generator: a suspended generator must not leak grad mode to its caller.)"""
    return model(ids, last_only=True, **kwargs)[:, -1]


def _decode_steps(model: nn.Module, idx: torch.Tensor, attention_mask: torch.Tensor | None,
                  config: GenerationConfig, generator: torch.Generator | None,
                  tokenizer: Tokenizer | None, detokenize: bool = False) -> Iterator[_Step]:
    """Prefill once, then decode one token per step against the KV cache.

    Past `context_length` the seed's crop semantics apply: the model sees the last
    `context_length` tokens at positions 0..context_length-1, so every such step recomputes that
    window (absolute position embeddings leave no cache to reuse).
    """
    b, t = idx.shape
    ctx = model.cfg.context_length
    device = idx.device
    padded = attention_mask is not None and not bool(attention_mask.all())
    mask = attention_mask.long() if padded else None
    seq = idx
    # Penalties see the context with padding marked -1.
    context = (torch.where(mask.bool(), idx, -1) if padded else idx.clone()) if config.needs_context else None
    streams = ([TextStream(tokenizer, config.stop_strings) for _ in range(b)]
               if detokenize or config.stop_strings else None)
    stop_ids = torch.tensor(config.stop_token_ids, dtype=idx.dtype, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    pad = torch.full((b,), config.pad_token_id, dtype=idx.dtype, device=device)

    cache = None
    next_pos = None
    if t <= ctx:
        cache = model.new_cache(b, min(ctx, t + config.max_new_tokens))
        positions = positions_from_mask(mask) if padded else None
        logits = _forward(model, seq, cache=cache, positions=positions, attention_mask=mask)
        if padded:
            next_pos = mask.sum(-1, keepdim=True)  # (B, 1) position of each row's next token
    else:
        logits = _window_logits(model, seq, mask)

    for step in range(config.max_new_tokens):
        tok = next_tokens(logits, context, config, generator).to(idx.dtype)
        tok = torch.where(done, pad, tok)
        finished = done | torch.isin(tok, stop_ids)
        texts = None
        if streams is not None:
            texts = []
            rows, was_done, ended = tok.tolist(), done.tolist(), finished.tolist()
            last = step == config.max_new_tokens - 1
            for row, stream in enumerate(streams):
                text = "" if ended[row] else stream.push(rows[row])
                if not was_done[row] and (ended[row] or stream.stopped or last):
                    text += stream.finish()
                if stream.stopped:
                    finished[row] = True
                texts.append(text)
        done = finished
        yield _Step(tok, done.clone(), texts)
        if step == config.max_new_tokens - 1 or bool(done.all()):
            return
        seq = torch.cat((seq, tok[:, None]), dim=1)  # (B, T + step + 1)
        if mask is not None:
            mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
        if context is not None:
            context = torch.cat((context, tok[:, None]), dim=1)
        if seq.shape[1] <= ctx:
            positions = next_pos if padded else None
            logits = _forward(model, tok[:, None], cache=cache, positions=positions, attention_mask=mask)
            if padded:
                next_pos = next_pos + 1
        else:
            logits = _window_logits(model, seq, mask)


def _window_logits(model: nn.Module, seq: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The seed's crop: the last context_length tokens, positions from 0, no cache. (B, V)."""
    ctx = model.cfg.context_length
    window = seq[:, -ctx:]
    if mask is None or bool(mask[:, -ctx:].all()):
        return _forward(model, window)
    wmask = mask[:, -ctx:]
    return _forward(model, window, positions=positions_from_mask(wmask), attention_mask=wmask)


def _prepare(model: nn.Module, idx: Any, attention_mask: torch.Tensor | None,
             config: GenerationConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate the prompt(s); a list of id lists is left-padded. Rows repeat num_return_sequences times."""
    _check_model(model)
    device = next(model.parameters()).device
    pads_added = False
    if isinstance(idx, torch.Tensor):
        _check_ids(idx)
        idx = idx.to(device=device, dtype=torch.int64)
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != idx.shape:
                raise GptforgeError(f"attention_mask must be a tensor shaped like idx {tuple(idx.shape)}")
            attention_mask = attention_mask.to(device)
            if attention_mask.dtype.is_floating_point or bool(((attention_mask != 0) & (attention_mask != 1)).any()):
                raise GptforgeError("attention_mask must hold 1 (real token) and 0 (padding) only")
            if not bool(attention_mask[:, -1].all()):
                raise GptforgeError("attention_mask must use left padding: every row's last token must be real")
    else:
        if attention_mask is not None:
            raise GptforgeError("attention_mask goes with a padded tensor idx; a list of prompts is padded for you")
        if isinstance(idx, str) or not isinstance(idx, Sequence) or not idx:
            raise GptforgeError("idx must be a (B, T) tensor of token ids or a list of id lists"
                                + ("; for text use generate_text" if isinstance(idx, str) else ""))
        idx, attention_mask = left_pad(idx, config.pad_token_id, device)
        pads_added = not bool(attention_mask.all())
    vocab = model.cfg.vocab_size
    # Padding added here and the rows that finish first hold pad_token_id, which the model then reads.
    rows_may_finish = idx.shape[0] * config.num_return_sequences > 1 and (
        config.stop_strings or any(i < vocab for i in config.stop_token_ids))
    if config.pad_token_id >= vocab and (pads_added or rows_may_finish):
        raise GptforgeError(f"pad_token_id {config.pad_token_id} is outside the model's vocabulary of {vocab}: it "
                            f"fills padding and finished rows, which the model reads; pass pad_token_id=<an id "
                            f"below {vocab}>")
    _check_ids(idx, vocab)
    n = config.num_return_sequences
    # before any per-row work: the rows' cache, at the least a Q8_0 one, must be able to fit
    KVCache.check_fits(model.cfg, idx.shape[0] * n, min(idx.shape[1] + config.max_new_tokens,
                                                         model.cfg.context_length), device, KV_Q8_0)
    if n > 1:
        idx = idx.repeat_interleave(n, dim=0)
        attention_mask = attention_mask.repeat_interleave(n, dim=0) if attention_mask is not None else None
    return idx, attention_mask


@contextlib.contextmanager
def _decoding(model: nn.Module) -> Iterator[nn.Module]:
    """The module to decode with: `model`'s fast float32 layout (`fast.inference_view`, which leaves
    `model` and its state dict untouched) when it has one, else `model`; in eval mode (dropout off)
    for the block, its training flag restored after. Only a model in eval mode gets the view: a
    sample during training decodes the model as it is (no second copy of the weights to build
    after every step, none to hold)."""
    fast = model if model.training else inference_view(model)
    was_training = fast.training
    fast.eval()
    try:
        yield fast
    finally:
        fast.train(was_training)


def generate(model: nn.Module, idx: torch.Tensor | Sequence[Sequence[int]], max_new_tokens: int | None = None,
             config: GenerationConfig | None = None, *, attention_mask: torch.Tensor | None = None,
             tokenizer: Tokenizer | None = None, **options: Any) -> torch.Tensor:
    """Generate with a KV cache. Greedy by default, so it returns what `generate_text_simple` does.
    A plain float32 CPU model in eval mode decodes through its cached fast layout
    (`fast.inference_view`): `model`, its state dict and its training are left as they are.

    idx: (B, T) int64 prompt ids, or a list of id lists of different lengths (left-padded here).
    max_new_tokens: overrides `config.max_new_tokens`.
    config / options: a GenerationConfig and/or its fields as keywords (`temperature=0.8, top_k=50`).
    attention_mask: (B, T) 1/0 for an idx that is already left-padded.
    tokenizer: decodes text for stop strings (default: GPT-2's).
    Returns (B * num_return_sequences, T + n) int64 with n <= max_new_tokens (fewer when every row
    stopped): each prompt, then its tokens; a row that stopped early is filled with
    `pad_token_id`, and shorter prompts of a list are left-padded with it.
    """
    if max_new_tokens is not None:
        options["max_new_tokens"] = max_new_tokens
    config = GenerationConfig.from_options(config, **options)
    tokenizer = as_tokenizer(tokenizer) if tokenizer is not None else None  # loaded only for stop strings
    idx, attention_mask = _prepare(model, idx, attention_mask, config)
    if config.max_new_tokens == 0:
        return idx
    generator = config.make_generator(idx.device)
    with _decoding(model) as fast:
        new = [step.tokens for step in _decode_steps(fast, idx, attention_mask, config, generator, tokenizer)]
    return torch.cat((idx, torch.stack(new, dim=1)), dim=1)


def generate_text(model: nn.Module, prompt: str | Sequence[str], max_new_tokens: int | None = None,
                  tokenizer: Tokenizer | None = None, config: GenerationConfig | None = None,
                  **options: Any) -> str | list[str]:
    """Text in, text out: each prompt followed by its continuation (stop ids and stop strings cut
    the continuation and are not included). One prompt and one sequence give a str, otherwise a
    list of B * num_return_sequences strings, in prompt order."""
    tokenizer = as_tokenizer(tokenizer)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, Sequence) else []
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise GptforgeError("prompt must be a string or a non-empty list of strings")
    if max_new_tokens is not None:
        options["max_new_tokens"] = max_new_tokens
    config = GenerationConfig.from_options(config, **options)
    idx, mask = _prepare(model, [prompt_ids(p, tokenizer) for p in prompts], None, config)
    generator = config.make_generator(idx.device)
    texts = ["" for _ in range(idx.shape[0])]
    if config.max_new_tokens > 0:
        with _decoding(model) as fast:
            for step in _decode_steps(fast, idx, mask, config, generator, tokenizer, detokenize=True):
                texts = [t + s for t, s in zip(texts, step.texts)]
    heads = [p for p in prompts for _ in range(config.num_return_sequences)]
    out = [h + t for h, t in zip(heads, texts)]
    return out[0] if isinstance(prompt, str) and len(out) == 1 else out


def stream_text(model: nn.Module, prompt: str | Sequence[int], max_new_tokens: int | None = None,
                tokenizer: Tokenizer | None = None, config: GenerationConfig | None = None,
                **options: Any) -> Iterator[str]:
    """Yield the continuation of one prompt (text or ids) as it is produced, chunk by chunk.

    A chunk never ends inside a UTF-8 character that spans tokens, and text that could begin a stop
    string is held until it is clear; the stop string itself is never yielded. The prompt is not
    repeated. `num_return_sequences` must be 1. Bad arguments raise here, before the first chunk is
    asked for.
    """
    tokenizer = as_tokenizer(tokenizer)
    if max_new_tokens is not None:
        options["max_new_tokens"] = max_new_tokens
    config = GenerationConfig.from_options(config, **options)
    if config.num_return_sequences != 1:
        raise GptforgeError("stream_text streams one sequence: num_return_sequences must be 1")
    ids = prompt_ids(prompt, tokenizer) if isinstance(prompt, str) else prompt
    idx, mask = _prepare(model, [ids], None, config)
    return _stream(model, idx, mask, config, tokenizer)


def _stream(model: nn.Module, idx: torch.Tensor, mask: torch.Tensor | None, config: GenerationConfig,
            tokenizer: Tokenizer) -> Iterator[str]:
    if config.max_new_tokens == 0:
        return
    generator = config.make_generator(idx.device)
    with _decoding(model) as fast:
        for step in _decode_steps(fast, idx, mask, config, generator, tokenizer, detokenize=True):
            if step.texts[0]:
                yield step.texts[0]
