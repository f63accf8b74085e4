"""Continuous batching: many generation requests decoded together, one batched forward step per token.

A `SequenceState` is one prompt being continued (an OpenAI "choice"). The `BatchScheduler` keeps
up to `max_batch_size` active sequences and, at each step, runs them through the model as one batch
of one token each. Sequences join and leave between steps; each keeps its own `GenerationConfig`
(temperature, top-p, penalties, stop strings) and its own seeded `torch.Generator`, and each token
goes through `generation.next_tokens` exactly as it would alone.

The batch KV cache (`max_batch_size` rows, `context_length` columns) is laid out like this:

    row 0:  . . . a a a a a a    . = padding (masked out), a/b/c = a sequence's cached positions
    row 1:  . . . . . . b b b
    row 2:  c c c c c c c c c
                            ^ column: every row writes its next token here

Active sequences occupy rows 0..n-1, so a step runs on the first n rows only. Newcomers are
prefilled together (one left-padded forward pass into a small cache of their own) and copied in,
right-aligned to the column (left padding); if a prompt is longer than the column, the existing rows are shifted right first. When the
column reaches the end of the cache, all rows are shifted left by their common padding. A finished
sequence's row is overwritten by the last row. Position ids are per row (each sequence counts its
own tokens), so padding changes nothing but the attention mask.

The scheduler runs in its own thread (`start`/`stop`); `submit` and `cancel` may be called from any
thread, and each sequence's `on_output` callback is called from the scheduler thread.

One sequence's failure is its own: if picking or reporting its token raises (e.g. the model's scores
for it are not finite), that sequence alone ends with FINISH_ERROR and the others go on. Only a
failure of the shared forward pass ends the sequences in it; every sequence taken from the queue is
answered, whatever fails.
"""

from __future__ import annotations

import codecs
import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import torch
import torch.nn as nn

from .fast import kernels
from .config import check_language_model
from .fast.blocks import make_panels
from .generation import (
    GenerationConfig, TextStream, check_finite_logits, finite_rows, left_pad, next_tokens, positions_from_mask,
)
from .model import KV_Q8_0, KVCache
from .fast import inference_view
from .structured import GrammarMatcher, apply_bitmask, new_bitmask
from .tokenizer import Tokenizer, as_tokenizer
from .errors import GptforgeError

log = logging.getLogger(__name__)

FINISH_STOP = "stop"  # a stop token or stop string
FINISH_LENGTH = "length"  # max_tokens reached
FINISH_ABORT = "abort"  # ended by a shutdown
FINISH_ERROR = "error"  # this sequence's step failed (Output.error says why)


class SchedulerClosed(RuntimeError):
    """The scheduler is shutting down and takes no new sequences."""


class SchedulerFull(RuntimeError):
    """Too many sequences are waiting; try again later."""


@dataclasses.dataclass
class TokenLogprob:
    """One token with its log-probability (natural log) under the model's raw distribution."""

    token: str
    logprob: float | None  # None for a prompt's first token (nothing predicts it)
    top: dict[str, float] | None  # the most likely alternatives, and the token itself (OpenAI's up to N + 1)
    offset: int  # character offset of the token in its text (prompt or completion)
    token_id: int | None = None
    top_ids: list[tuple[int, float]] | None = None  # exactly the N most likely (id, logprob), best first


@dataclasses.dataclass
class Output:
    """What one step of a sequence produced, passed to its `on_output` callback."""

    text: str  # text released by this step (may be "" while a character or stop string is pending)
    logprobs: list[TokenLogprob]  # this step's tokens, when the sequence asked for logprobs
    finish_reason: str | None  # None while running; then FINISH_STOP, _LENGTH, _ABORT or _ERROR
    num_tokens: int  # tokens generated so far (stop tokens included)
    prompt_logprobs: list[TokenLogprob] | None = None  # on the first output, when asked for
    error: str | None = None  # the message, with FINISH_ERROR


@dataclasses.dataclass(eq=False)
class SequenceState:
    """One prompt to continue.

    prompt_ids: the prompt's token ids (at least one).
    max_tokens: tokens to generate at most; prompt + max_tokens must fit the model's context.
    config: decoding options (its max_new_tokens and num_return_sequences are ignored: max_tokens
        counts here, and one SequenceState is one continuation). Its seed seeds this sequence's generator.
    on_output: called from the scheduler thread after each step, last with a finish_reason.
    logprobs: None for no logprobs, else how many top alternatives to report per token (0..).
    prompt_logprobs: also report the prompt's tokens' logprobs (OpenAI's echo with logprobs).
    grammar: a `structured.GrammarMatcher` the text must follow (its mask applies before the
        config's processors); the sequence stops when the grammar is complete.
    logit_bias: token id -> value added to its logit before picking (OpenAI's logit_bias).
    min_tokens: the config's stop_token_ids are forbidden until this many tokens were generated.
    Logprobs are always those of the model's raw distribution, before any of these.
    """

    prompt_ids: list[int]
    max_tokens: int
    config: GenerationConfig
    on_output: Callable[[Output], None]
    logprobs: int | None = None
    prompt_logprobs: bool = False
    cancelled: bool = False
    generated: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    grammar: GrammarMatcher | None = None
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0

    def __post_init__(self) -> None:
        self.generator: torch.Generator | None = None  # made on the model's device at admission
        self._text: TextStream | None = None
        self._chars = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._offset = 0  # characters decoded so far, for token offsets

    def push_text(self, token: int, tokenizer: Tokenizer) -> tuple[str, int]:
        """Feed one generated token to this request's text: (the text now safe to show, the character
        offset at which this token's text starts)."""
        if self._text is None:
            self._text = TextStream(tokenizer, self.config.stop_strings)
        offset = self._offset
        self._offset += len(self._chars.decode(tokenizer.decode_bytes([token])))
        return self._text.push(token), offset

    def finish_text(self) -> str:
        """The text still held back (see `TextStream.finish`); "" before any token."""
        return self._text.finish() if self._text is not None else ""

    @property
    def adjusts_logits(self) -> bool:
        """Whether its logits change before picking (a grammar, a bias, a minimum length)."""
        return self.grammar is not None or bool(self.logit_bias) or len(self.generated) < self.min_tokens

    @property
    def stopped_on_string(self) -> bool:
        """Whether a stop string has appeared in the text."""
        return self._text is not None and self._text.stopped

    @property
    def released_chars(self) -> int:
        """Characters of text released so far."""
        return len(self._text.text) if self._text is not None else 0


class BatchScheduler:
    """Decodes many sequences as one batch; see the module docstring for the cache layout.

    model: a GPTModel (put in eval mode here). tokenizer: for stop strings and logprob tokens.
    max_batch_size: sequences decoded together; more wait their turn, in arrival order.
    max_waiting: sequences allowed to wait; `submit` raises SchedulerFull beyond it.
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer | None = None, *, max_batch_size: int = 16,
                 max_waiting: int = 1024):
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise GptforgeError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        check_language_model(model.cfg)
        # its KV cache, allocated at the first request, must be able to fit (at the least a Q8_0 one)
        KVCache.check_fits(model.cfg, max_batch_size, model.cfg.context_length, next(model.parameters()).device,
                           KV_Q8_0, f"lower max_batch_size ({max_batch_size}, --max-batch-size)")
        # Decode through the same fast layout as `generate` (the model itself stays untouched).
        self.model = inference_view(model.eval())
        self.tokenizer = as_tokenizer(tokenizer)
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.context_length = model.cfg.context_length
        self.device = next(model.parameters()).device

        self._cache: KVCache | None = None  # allocated at the first admission
        self._mask = torch.zeros(max_batch_size, self.context_length, dtype=torch.long, device=self.device)
        self._positions = torch.zeros(max_batch_size, dtype=torch.long, device=self.device)  # cached tokens per row
        self._next = torch.zeros(max_batch_size, dtype=torch.long, device=self.device)  # each row's pending token
        self._column = 0  # the write column shared by all rows
        self._rows: list[SequenceState] = []  # active sequences; index = row
        self._admitting: list[SequenceState] = []  # taken off the queue, not yet in a row

        # Grammar masks: one row per batch row, filled on a worker thread while the model runs.
        self._bitmask: torch.Tensor | None = None
        self._mask_worker: concurrent.futures.ThreadPoolExecutor | None = None

        self._waiting: collections.deque[SequenceState] = collections.deque()
        self._wakeup = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._abort_at: float | None = None  # set by `drain`
        self.counters = collections.Counter(decode_steps=0, prefills=0, finished=0, cancelled=0, failed=0)

    # ------------------------------------------------------------------ the API for other threads

    def submit(self, seq: SequenceState) -> None:
        """Queue a sequence. Raises ValueError if it cannot fit the context, SchedulerClosed while
        draining or stopped, SchedulerFull if too many are waiting."""
        need = len(seq.prompt_ids) + seq.max_tokens
        if not seq.prompt_ids or need > self.context_length:
            raise GptforgeError(f"prompt ({len(seq.prompt_ids)} tokens) + max_tokens ({seq.max_tokens}) must be "
                             f"between 1 and the context length {self.context_length}")
        with self._wakeup:
            if self._stopping or self._abort_at is not None:
                raise SchedulerClosed("the server is shutting down")
            if len(self._waiting) >= self.max_waiting:
                raise SchedulerFull(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(seq)
            self._wakeup.notify()

    def cancel(self, seq: SequenceState) -> None:
        """Stop a sequence (e.g. its client went away); its row is freed before the next step."""
        seq.cancelled = True

    def drain(self, grace_s: float) -> None:
        """Take no new sequences; end the remaining ones with FINISH_ABORT after `grace_s` seconds."""
        with self._wakeup:
            self._abort_at = time.monotonic() + grace_s
            self._wakeup.notify()

    def stats(self) -> dict[str, int]:
        """Active and waiting sequences, and the running `counters` (decode steps, prefills, finished,
        cancelled, failed)."""
        return {"active": len(self._rows), "waiting": len(self._waiting), **self.counters}

    def cache_usage(self) -> float:
        """The share of the batch KV cache (max_batch_size rows x context_length positions) that
        holds tokens of active sequences, 0 to 1 (a snapshot: safe to call from any thread)."""
        held = sum(len(seq.prompt_ids) + len(seq.generated) for seq in list(self._rows))
        return held / (self.max_batch_size * self.context_length)

    def start(self) -> None:
        """Run the scheduler in a daemon thread (the calling thread's OpenMP workers are let go:
        see `kernels.release_threads`; a float32 model's panels for batches are made first: see
        `fast.blocks.make_panels`)."""
        if self._thread is None:
            if self.max_batch_size > 1:
                make_panels(self.model)
            kernels.release_threads()
            self._thread = threading.Thread(target=self._run, name="gptforge-scheduler", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End every sequence (FINISH_ABORT) and stop the thread."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._mask_worker is not None:
            self._mask_worker.shutdown(wait=False)
            self._mask_worker = None
        self._end_all(FINISH_ABORT)

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while not (self._stopping or self._waiting or self._rows):
                    self._wakeup.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as err:  # a failed shared step must not take the server down: fail its sequences
                log.exception("generation step failed")
                self._end_all(FINISH_ERROR, f"generation failed: {type(err).__name__}: {err}")

    def _abort_due(self) -> bool:
        return self._abort_at is not None and time.monotonic() >= self._abort_at

    @torch.no_grad()
    def step(self) -> None:
        """One round: drop cancelled rows, admit waiting sequences into free rows (prefilled
        together), then decode one token for every active row in a single forward pass."""
        if self._abort_due():
            self._end_all(FINISH_ABORT)
            return
        self._remove([i for i, seq in enumerate(self._rows) if seq.cancelled], cancelled=True)
        self._admit()
        if self._rows:
            self._decode()

    def _admit(self) -> None:
        """Move waiting sequences into free rows, prefilling the newcomers together. A prefill that
        fails ends the sequences in it (FINISH_ERROR), not the ones already decoding."""
        newcomers = self._admitting = []  # answered by `_end_all` too, should anything else fail
        while len(self._rows) + len(newcomers) < self.max_batch_size:
            with self._wakeup:
                if not self._waiting:
                    break
                seq = self._waiting.popleft()
                newcomers.append(seq)
            if seq.cancelled:
                newcomers.pop()
                self.counters["cancelled"] += 1
            elif seq.max_tokens == 0 and not seq.prompt_logprobs:
                newcomers.pop()
                self._emit(seq, None, None)  # nothing to compute
        # Prompt logprobs need the logits of every position: those prompts run alone.
        groups = [([s], True) for s in newcomers if s.prompt_logprobs]
        rest = [s for s in newcomers if not s.prompt_logprobs]
        groups += [(rest, False)] if rest else []
        for seqs, every_position in groups:
            try:
                self._prefill(seqs, every_position)
            except Exception as err:
                message = self._failure(err)
                for seq in seqs:
                    if seq.finish_reason is None and seq not in self._rows:
                        self._fail(seq, message)
        self._admitting = []

    def _prefill(self, seqs: list[SequenceState], every_position: bool = False) -> None:
        """Run the prompts as one left-padded batch, pick each one's first token, and give a row
        to each sequence that goes on."""
        self.counters["prefills"] += 1
        # Padding is masked out; id 0 exists in every vocabulary (50256 may not).
        ids, mask = left_pad([s.prompt_ids for s in seqs], pad_token_id=0, device=self.device)  # (k, W) each
        padded = not bool(mask.all())
        cache = self.model.new_cache(len(seqs), max_len=ids.shape[1])
        masks = self._start_masks(seqs)
        logits = self.model(
            ids, cache=cache, positions=positions_from_mask(mask) if padded else None,
            attention_mask=mask if padded else None, last_only=not every_position,
        )  # (k, W or 1, V)
        bitmask = masks.result() if masks is not None else None
        for j, seq in enumerate(seqs):
            try:
                seq.generator = seq.config.make_generator(self.device)
                prompt_lp = self._prompt_logprobs(seq, logits[j]) if every_position else None
                if seq.max_tokens == 0:
                    self._emit(seq, None, None, prompt_lp)
                    continue
                token = self._pick(seq, logits[j, -1:], bitmask, j)
                finished = self._emit(seq, token, logits[j, -1], prompt_lp)
            except Exception as err:  # this sequence's own failure: the others go on
                self._fail(seq, self._failure(err))
                continue
            if not finished:
                self._insert(seq, cache, j, token)

    def _insert(self, seq: SequenceState, prefilled: KVCache, j: int, token: int) -> None:
        """Copy row j of a prefill cache (prompt right-aligned) into a free batch row."""
        if self._cache is None:
            self._cache = self.model.new_cache(self.max_batch_size)
        if not self._rows:
            self._column = 0
        p, width = len(seq.prompt_ids), prefilled.max_len
        if p > self._column:
            self._shift(p - self._column)
        row, start = len(self._rows), self._column - p
        self._cache.keys[:, row, :, start:self._column] = prefilled.keys[:, j, :, width - p:]
        self._cache.values[:, row, :, start:self._column] = prefilled.values[:, j, :, width - p:]
        self._mask[row] = 0
        self._mask[row, start:self._column] = 1
        self._positions[row] = p
        self._next[row] = token
        self._rows.append(seq)

    def _shift(self, delta: int) -> None:
        """Move every active row's cached positions `delta` columns (right > 0, left < 0)."""
        n, end = len(self._rows), self._column
        begin = end - int(self._positions[:n].max()) if n else end  # the leftmost real column
        if n:
            for buf in (self._cache.keys, self._cache.values):
                buf[:, :n, :, begin + delta:end + delta] = buf[:, :n, :, begin:end].clone()
            kept = self._mask[:n, begin:end].clone()
            self._mask[:n] = 0
            self._mask[:n, begin + delta:end + delta] = kept
        self._column = end + delta

    def _decode(self) -> None:
        if self._column == self.context_length:
            # Full: drop the padding that all rows share. Some room is always left, because
            # prompt + max_tokens <= context and the last token never needs a cache slot.
            self._shift(-(self._column - int(self._positions[:len(self._rows)].max())))
        n, col = len(self._rows), self._column
        self._mask[:n, col] = 1
        masks = self._start_masks(self._rows)  # the grammars' masks, computed while the model runs
        logits = self.model(
            self._next[:n, None], cache=self._cache.rows(n, col),
            positions=self._positions[:n, None], attention_mask=self._mask[:n, :col + 1], last_only=True,
        )[:, 0]  # (n, V)
        self.counters["decode_steps"] += 1
        self._column += 1
        self._positions[:n] += 1
        tokens, finished = [], []
        bitmask = masks.result() if masks is not None else None
        scores = logits[:, :self.tokenizer.vocab_size]
        finite = finite_rows(scores).tolist()  # every row's check in one pass
        # greedy rows whose only change to the logits is a grammar's mask or none: one masked argmax
        # for all of them; the others (sampling, bias, penalties) pick one by one in `_pick`
        rows = [i for i, seq in enumerate(self._rows)
                if seq.config.plain_greedy and not seq.logit_bias and (seq.grammar is not None or not seq.adjusts_logits)]
        greedy = {}
        masked = [i for i in rows if self._rows[i].grammar is not None]
        unmasked = [i for i in rows if self._rows[i].grammar is None]
        if unmasked:  # one argmax of every row, kept for these
            argmax = kernels.argmax(scores).tolist()
            greedy = {i: argmax[i] for i in unmasked}
        if masked:  # the argmax over what each grammar allows (no masked copy of the logits)
            every = masked == list(range(len(self._rows)))
            picked = kernels.argmax(scores.float() if every else scores[masked].float(),
                                    bitmask[:len(masked)] if every else bitmask[masked])
            greedy.update(zip(masked, picked.tolist()))
        for i, seq in enumerate(self._rows):
            try:
                if not finite[i]:
                    check_finite_logits(logits[i:i + 1])  # raises, saying what is wrong
                if i in greedy:
                    token = greedy[i]
                    if seq.grammar is not None:
                        seq.grammar.accept(token)
                else:
                    token = self._pick(seq, logits[i:i + 1], bitmask, i)
                done = self._emit(seq, token, logits[i])
            except Exception as err:  # this sequence's own failure: its row is freed, the others go on
                self._fail(seq, self._failure(err))
                token, done = 0, True
                # its keys/values may be NaN, and a later sequence in this row reads stale slots under a
                # zero attention weight (0 * NaN = NaN): cleared
                self._cache.keys[:, i].zero_()
                self._cache.values[:, i].zero_()
            tokens.append(token)
            if done:
                finished.append(i)
        self._next[:n] = torch.tensor(tokens, device=self.device)
        self._remove(finished)

    def _remove(self, rows: list[int], cancelled: bool = False) -> None:
        """Free rows, moving the last active row into each freed one."""
        for i in sorted(rows, reverse=True):
            last = len(self._rows) - 1
            if i != last:
                col = self._column
                self._cache.keys[:, i, :, :col] = self._cache.keys[:, last, :, :col]
                self._cache.values[:, i, :, :col] = self._cache.values[:, last, :, :col]
                for per_row in (self._mask, self._positions, self._next):
                    per_row[i] = per_row[last]
                self._rows[i] = self._rows[last]
            self._rows.pop()
            if cancelled:
                self.counters["cancelled"] += 1

    def _end_all(self, reason: str, error: str | None = None) -> None:
        """Finish every active and waiting sequence with `reason` (shutdown, or a failed step)."""
        with self._wakeup:
            ended = self._rows + self._admitting + list(self._waiting)
            self._waiting.clear()
        self._rows, self._admitting = [], []
        for seq in ended:
            if not seq.cancelled and seq.finish_reason is None:
                self._finish(seq, reason, error)

    # ------------------------------------------------------------------ per-sequence work

    def _start_masks(self, seqs: list[SequenceState]) -> concurrent.futures.Future | None:
        """Fill row i of the grammar bitmask for each seqs[i] that has a grammar, on the worker
        thread (llguidance lets go of the GIL); None when none has one."""
        rows = [(i, seq.grammar) for i, seq in enumerate(seqs) if seq.grammar is not None]
        if not rows:
            return None
        if self._bitmask is None:
            self._bitmask = new_bitmask(self.max_batch_size, self.tokenizer.vocab_size)
        if self._mask_worker is None:  # made at the first grammar (again after a stop)
            self._mask_worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gptforge-grammar")
        bitmask = self._bitmask

        def fill() -> torch.Tensor:
            for i, grammar in rows:
                grammar.fill(bitmask, i)
            return bitmask

        return self._mask_worker.submit(fill)

    def _pick(self, seq: SequenceState, logits: torch.Tensor, bitmask: torch.Tensor | None = None,
              row: int = 0) -> int:
        """The next token of one sequence from its (1, V) logits, with its own config and generator
        (and its bias, minimum length and grammar, whose mask is row `row` of `bitmask`)."""
        logits = logits[:, :self.tokenizer.vocab_size]  # a padded vocabulary's extra ids have no text
        if seq.adjusts_logits:
            logits = self._adjust(seq, logits, bitmask[row:row + 1] if seq.grammar is not None else None)
        context = None
        if seq.config.needs_context:
            context = torch.tensor([seq.prompt_ids + seq.generated], device=logits.device)
        token = int(next_tokens(logits, context, seq.config, seq.generator)[0])
        if seq.grammar is not None:
            seq.grammar.accept(token)
        return token

    def _adjust(self, seq: SequenceState, logits: torch.Tensor, bitmask: torch.Tensor | None) -> torch.Tensor:
        """(1, V) logits with the sequence's logit bias, minimum length and grammar mask applied."""
        logits = logits.float()
        if seq.logit_bias:
            ids = [i for i in seq.logit_bias if i < logits.shape[-1]]
            bias = torch.tensor([seq.logit_bias[i] for i in ids], dtype=logits.dtype, device=logits.device)
            logits = logits.index_add(1, torch.tensor(ids, device=logits.device), bias[None])
        if bitmask is not None:  # the grammar decides where the text may end
            logits = apply_bitmask(logits, bitmask)
        elif len(seq.generated) < seq.min_tokens:
            stops = [i for i in seq.config.stop_token_ids if i < logits.shape[-1]]
            logits = logits.index_fill(1, torch.tensor(stops, dtype=torch.long, device=logits.device), float("-inf"))
        return logits

    def _emit(self, seq: SequenceState, token: int | None, logits: torch.Tensor | None,
              prompt_lp: list[TokenLogprob] | None = None) -> bool:
        """Record a sequence's new token and report it; returns whether the sequence is finished."""
        text, logprobs, finish = "", [], None
        if token is None:  # max_tokens == 0
            finish = FINISH_LENGTH
        else:
            seq.generated.append(token)
            if token in seq.config.stop_token_ids or (seq.grammar is not None and token == self.tokenizer.eot_id):
                text, finish = seq.finish_text(), FINISH_STOP
            else:
                text, offset = seq.push_text(token, self.tokenizer)
                if seq.stopped_on_string:
                    finish = FINISH_STOP
                elif seq.grammar is not None and seq.grammar.finished:  # complete: nothing may follow
                    text, finish = text + seq.finish_text(), FINISH_STOP
                elif len(seq.generated) == seq.max_tokens:
                    text, finish = text + seq.finish_text(), FINISH_LENGTH
                if seq.logprobs is not None and (not seq.stopped_on_string or offset < seq.released_chars):
                    logprobs.append(self._token_logprob(token, logits, seq.logprobs, offset))
        self._deliver(seq, Output(text, logprobs, finish, len(seq.generated), prompt_lp))
        if finish is not None:
            seq.finish_reason = finish
            self.counters["finished"] += 1
        return finish is not None

    @staticmethod
    def _failure(err: Exception) -> str:
        """What a client is told of `err`; anything but a GptforgeError is a bug, whose traceback is logged."""
        if isinstance(err, GptforgeError):
            return str(err)
        log.error("generation failed", exc_info=err)
        return f"generation failed: {type(err).__name__}: {err}"

    def _fail(self, seq: SequenceState, message: str) -> None:
        """End one sequence with FINISH_ERROR (its own failure: nothing else ends)."""
        if seq.finish_reason is None:
            self.counters["failed"] += 1
            self._finish(seq, FINISH_ERROR, message)

    def _finish(self, seq: SequenceState, reason: str, error: str | None = None) -> None:
        text = seq.finish_text() if reason == FINISH_ABORT else ""
        seq.finish_reason = reason
        self._deliver(seq, Output(text, [], reason, len(seq.generated), error=error))

    def _deliver(self, seq: SequenceState, output: Output) -> None:
        try:
            seq.on_output(output)
        except Exception:  # a broken receiver cancels its own sequence, nothing else
            log.exception("on_output failed; cancelling the sequence")
            seq.cancelled = True

    def _token_logprob(self, token: int, logits: torch.Tensor, top: int, offset: int) -> TokenLogprob:
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # (V,)
        alternatives, top_ids, chosen = None, None, float(logprobs[token])
        if top > 0:
            values, ids = torch.topk(logprobs[:self.tokenizer.vocab_size], top)
            top_ids = list(zip(ids.tolist(), values.tolist()))
            # OpenAI's completions list the chosen token too when it is not among the top N
            shown = top_ids if token in ids.tolist() else [*top_ids, (token, chosen)]
            alternatives = {self.tokenizer.decode([i]): v for i, v in shown}
        return TokenLogprob(self.tokenizer.decode([token]), chosen, alternatives, offset, token, top_ids)

    def _prompt_logprobs(self, seq: SequenceState, logits: torch.Tensor) -> list[TokenLogprob]:
        """Logprobs of each prompt token given the ones before it; logits: (P, V) (the prompt ran alone)."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        out, offset = [], 0
        for i, token in enumerate(seq.prompt_ids):
            if i == 0:
                out.append(TokenLogprob(self.tokenizer.decode([token]), None, None, 0, token))
            else:
                out.append(self._token_logprob(token, logits[i - 1], seq.logprobs or 0, offset))
            offset += len(decoder.decode(self.tokenizer.decode_bytes([token])))
        return out
