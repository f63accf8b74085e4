"""An OpenAI-compatible completions server (FastAPI + uvicorn) over the batching scheduler.

    POST /v1/completions   prompt(s) -> completions, plain JSON or server-sent events (`stream`)
    POST /v1/chat/completions   messages -> chat completions, for a model saved with a prompt
                           template (`gptforge finetune instruct`); the same path underneath
    POST /v1/embeddings    texts or token ids -> one unit vector each (`embeddings.embed`)
    POST /classify         texts -> label and probabilities, in vLLM's shape, for a classifier
                           (`gptforge finetune classify`; also at /v1/classify)
    GET  /v1/models        the one model served; GET /v1/models/{id} for it alone
    GET  /metrics          Prometheus metrics (`serve_metrics`)
    GET  /health           liveness and load: active and waiting sequences, counters
    GET  /tokenizer_info, POST /tokenize, POST /detokenize
                           the tokenizer, in vLLM's shapes, which lm-evaluation-harness's
                           `local-completions` probes so it needs no tokenizer files
    GET  /                 the playground page; POST /v1/inspect and GET /v1/model_card feed it
                           (gptforge.playground)

A base GPT-2 answers the completions API only; chat needs the model's prompt template, which
renders the messages into one prompt (`instruct.chat_prompt`) that then runs exactly as a
completion, stopping also at the template's next section. A classifier is served without a
scheduler: it labels texts (/classify) and embeds them, and generating with it is a 400. A request
without `model` is answered by the model served. Every choice of every request
becomes a `scheduler.SequenceState`; the `BatchScheduler` decodes all active ones together. Errors use
OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with 400 for bad parameters,
404 for an unknown model or route, 413 for an oversized body, 503 while shutting down or full,
401 without the API key where one is set (`--api-key`: every route but /health, / and the page's files under /static/).
On SIGTERM the server stops accepting connections, lets in-flight requests run for
`shutdown_grace_s`, then ends the rest with `finish_reason: "abort"` and a proper end of stream.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import errno
import functools
import gc
import hmac
import ipaddress
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch.nn as nn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from .classifier import classify
from .embeddings import embed, input_ids
from .errors import GptforgeError
from .generation import GenerationConfig, prompt_ids
from .instruct import chat_prompt
from .openai_decoding import (
    GrammarSpec, ToolMode, chat_logprobs, chat_spec, compile_grammar, completion_spec, logit_bias, tool_calls,
)
from .playground import add_playground
from .openai_api import (
    MAX_SEED, APIError, ChatCompletionRequest, ClassifyRequest, CompletionRequest, DetokenizeRequest,
    EmbeddingRequest, TokenizeRequest, SamplingFields, parse_request,
)
from .scheduler import (
    FINISH_ERROR, BatchScheduler, Output, SchedulerClosed, SchedulerFull, SequenceState, TokenLogprob,
)
from .serve_metrics import CONTENT_TYPE, ServerMetrics
from .structured import Grammar
from .tokenizer import ENDOFTEXT, ENDOFTEXT_ID, Tokenizer, as_tokenizer, get_tokenizer

log = logging.getLogger(__name__)

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_CHARS = 256  # per stop string: each generated token is checked against every one
MAX_INPUTS = 2048  # texts per embeddings or classify request, as OpenAI's embeddings
OPEN_PATHS = ("/", "/health", "/favicon.ico")  # answered without the API key, as are paths under OPEN_PREFIX
OPEN_PREFIX = "/static/"  # the page's files (playground.py): the page itself asks for the key


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """What the server accepts and how it batches.

    model_name: the id clients put in `model` (and that /v1/models lists).
    max_tokens_cap: the largest `max_tokens` a request may ask for (None: the context length).
    max_body_bytes: larger request bodies get 413.
    max_choices: prompts x n per request.
    max_batch_size: sequences decoded together; max_waiting: sequences queued behind them.
    shutdown_grace_s: on SIGTERM, how long in-flight requests may still run before being ended.
    api_key: when set, every route but OPEN_PATHS needs `Authorization: Bearer <api_key>` (else 401).
    cors_origins: origins whose pages may call the server (CORS); "*" for any; none by default.
    """

    model_name: str
    max_tokens_cap: int | None = None
    max_body_bytes: int = 1 << 20
    max_choices: int = 64
    max_batch_size: int = 16
    max_waiting: int = 1024
    shutdown_grace_s: float = 10.0
    api_key: str | None = dataclasses.field(default=None, repr=False)
    cors_origins: tuple[str, ...] = ()


# --------------------------------------------------------------------------- the request

@dataclasses.dataclass
class _Prompt:
    text: str | None  # what `echo` repeats (decoded from the ids for a token-id prompt)
    ids: list[int]


def _prompts(req: CompletionRequest, tokenizer: Tokenizer, vocab_size: int) -> list[_Prompt]:
    raw = req.prompt
    if isinstance(raw, str):
        raw = [raw]
    elif raw and isinstance(raw[0], int):
        raw = [raw]  # one prompt given as token ids
    if not raw:
        raise APIError(400, "prompt must not be an empty list", param="prompt")
    prompts = []
    for item in raw:
        if isinstance(item, str):
            prompt = _Prompt(item, prompt_ids(item, tokenizer))
        elif not item:
            raise APIError(400, "a token-id prompt must hold at least one id", param="prompt")
        else:
            prompt = _Prompt(None, list(item))
        # Ids must be readable by the model and writable by the tokenizer (a model's vocabulary may
        # be smaller, e.g. a toy model, or larger, e.g. padded to 50304).
        bad = [i for i in prompt.ids if not 0 <= i < min(vocab_size, tokenizer.vocab_size)]
        if bad:
            raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary "
                                f"[0, {min(vocab_size, tokenizer.vocab_size)})",
                           param="prompt")
        if prompt.text is None:
            prompt.text = tokenizer.decode(prompt.ids)
        prompts.append(prompt)
    return prompts


def _stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", param="stop")
    if not all(stops):
        raise APIError(400, "stop strings must not be empty", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"stop strings may be at most {MAX_STOP_CHARS} characters long", param="stop")
    return tuple(stops)


def _check_unsupported(req: CompletionRequest) -> None:
    n = req.n or 1
    if req.best_of is not None and req.best_of != n:
        raise APIError(400, "best_of is not supported (leave it out or set it equal to n)", param="best_of")
    if req.suffix:
        raise APIError(400, "suffix is not supported: GPT-2 only continues text", param="suffix")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")


def _chat_as_completion(req: ChatCompletionRequest, model_cfg: Any, settings: ServeSettings,
                        tokenizer: Tokenizer) -> CompletionRequest:
    """A chat request as the completion request of its rendered prompt (checked by `_plan` next)."""
    template = model_cfg.prompt_template
    if template is None:
        raise APIError(400, f"the model '{settings.model_name}' has no prompt template (it is a base model), so "
                            f"it cannot chat; use /v1/completions, or serve a model trained with "
                            f"`gptforge finetune instruct`", param="messages", code="no_chat_template")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    try:
        text = chat_prompt(req.messages, template)
    except GptforgeError as err:
        raise APIError(400, str(err), param="messages") from None
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is None:  # OpenAI's chat default: as much as the context leaves
        context = model_cfg.context_length
        max_tokens = max(1, min(settings.max_tokens_cap or context, context - len(prompt_ids(text, tokenizer))))
    shared = {name: getattr(req, name) for name in SamplingFields.model_fields}
    return CompletionRequest.model_construct(**shared, prompt=text, max_tokens=max_tokens,
                                             logprobs=(req.top_logprobs or 0) if req.logprobs else None)


# --------------------------------------------------------------------------- the response

def _logprobs_json(entries: list[TokenLogprob], shift: int = 0) -> dict[str, list[Any]]:
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [e.top for e in entries],
        "text_offset": [e.offset + shift for e in entries],
    }


def _merge_logprobs(a: dict[str, list[Any]] | None, b: dict[str, list[Any]]) -> dict[str, list[Any]]:
    return b if a is None else {k: a[k] + b[k] for k in a}


@dataclasses.dataclass
class _Choice:
    """One choice's progress: its prompt, the text so far and, with logprobs, the entries so far."""

    prompt: _Prompt
    echo: bool
    want_logprobs: bool
    text: str = ""
    logprobs: dict[str, list[Any]] | None = None
    finish_reason: str | None = None
    tokens: int = 0
    started: bool = False
    entries: list[TokenLogprob] = dataclasses.field(default_factory=list)  # the generated tokens' logprobs

    def add(self, out: Output) -> tuple[str, dict[str, list[Any]] | None]:
        """Fold in one output; returns its text and logprobs as a stream chunk shows them."""
        text, lp = out.text, None
        if not self.started:
            self.started = True
            if self.echo:
                text = self.prompt.text + text
                if self.want_logprobs and out.prompt_logprobs is not None:
                    lp = _logprobs_json(out.prompt_logprobs)
        if self.want_logprobs:
            self.entries += out.logprobs
            shift = len(self.prompt.text) if self.echo else 0  # offsets count from the choice's text start
            lp = _merge_logprobs(lp, _logprobs_json(out.logprobs, shift))
            self.logprobs = _merge_logprobs(self.logprobs, lp)
        self.text += text
        self.tokens = out.num_tokens
        self.finish_reason = out.finish_reason
        return text, lp


@dataclasses.dataclass(frozen=True)
class _Extras:
    """What a request adds to its GenerationConfig, per sequence (see `scheduler.SequenceState`)."""

    grammar: Grammar | None = None
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0


def _plan(req: CompletionRequest, settings: ServeSettings, tokenizer: Tokenizer, vocab_size: int,
          context_length: int) -> tuple[list[_Prompt], int, GenerationConfig]:
    """Check a request against the server's limits: its prompts, max_tokens and decoding config."""
    _check_unsupported(req)
    n = req.n or 1
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    cap = settings.max_tokens_cap or context_length
    if max_tokens > cap:
        raise APIError(400, f"max_tokens is {max_tokens}, above this server's cap of {cap}", param="max_tokens")
    prompts = _prompts(req, tokenizer, vocab_size)
    if len(prompts) * n > settings.max_choices:
        raise APIError(400, f"{len(prompts)} prompts x n={n} = {len(prompts) * n} choices; this server "
                            f"allows {settings.max_choices} per request", param="n")
    for p in prompts:
        if len(p.ids) + max_tokens > context_length:
            raise APIError(
                400, f"This model's maximum context length is {context_length} tokens, however you requested "
                     f"{len(p.ids) + max_tokens} tokens ({len(p.ids)} in your prompt; {max_tokens} for the "
                     f"completion). Please reduce your prompt or completion length.",
                param="prompt", code="context_length_exceeded")
    if req.seed is not None and req.seed + len(prompts) * n - 1 > MAX_SEED:
        raise APIError(400, f"seed must be at most {MAX_SEED - len(prompts) * n + 1}", param="seed")
    if req.min_tokens is not None and req.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens ({req.min_tokens}) must not exceed max_tokens ({max_tokens})",
                       param="min_tokens")
    try:
        config = GenerationConfig(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k if req.top_k is not None and req.top_k > 0 else None,  # vLLM: -1 or 0 is off
            min_p=req.min_p or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
            stop_strings=_stop_strings(req.stop), stop_token_ids=() if req.ignore_eos else (ENDOFTEXT_ID,),
        )
    except ValueError as err:
        raise APIError(400, str(err)) from None
    return prompts, max_tokens, config


async def _extras(req: CompletionRequest, spec: GrammarSpec | None, vocab_size: int) -> _Extras:
    """A request's logit bias, min_tokens and grammar (compiled on a worker thread: the first one
    builds llguidance's view of the tokenizer, ~1 s)."""
    bias = logit_bias(req.logit_bias, vocab_size)
    gpt2 = get_tokenizer().vocab_size  # the grammars' tokenizer; a toy vocabulary lacks the tokens they force
    if spec is not None and vocab_size < gpt2:
        raise APIError(400, f"{spec.param}: structured output needs a model whose vocabulary holds GPT-2's "
                            f"{gpt2} tokens; this one has {vocab_size}", param=spec.param.split(".")[0])
    grammar = await asyncio.to_thread(compile_grammar, spec) if spec is not None else None
    return _Extras(grammar, bias, req.min_tokens or 0)


class _Completion:
    """One request in flight: a SequenceState per choice, whose outputs arrive on `queue` (the scheduler
    thread hands them to the event loop), folded into choices for the JSON body or SSE chunks. A
    request that is not streamed gets only each choice's last output on `queue`: the others are
    folded in on the scheduler's thread, so that the event loop is not woken for every token (with
    8 such requests at once on 2 cores, ~10% more tokens/s)."""

    def __init__(self, req: CompletionRequest, prompts: list[_Prompt], max_tokens: int,
                 config: GenerationConfig, model_name: str, loop: asyncio.AbstractEventLoop, chat: bool = False,
                 extras: _Extras = _Extras(), tokenizer: Tokenizer | None = None, tools: ToolMode | None = None):
        self.queue: asyncio.Queue[tuple[int, Output]] = asyncio.Queue()
        self.tokenizer, self.tools = tokenizer, tools
        self.loop, self.stream = loop, bool(req.stream)
        self.prompts = prompts
        self.include_usage = req.stream_options is not None and req.stream_options.include_usage
        self.chat = chat
        self.roles_sent: set[int] = set()  # chat streams name the role in each choice's first chunk
        self.head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                     "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                     "model": model_name}
        self.choices: list[_Choice] = []
        self.seqs: list[SequenceState] = []
        for p in prompts:
            for _ in range(req.n or 1):
                index = len(self.choices)
                # Choice i of a request with seed s samples as a lone request with seed s + i would.
                seed = None if req.seed is None else req.seed + index
                self.choices.append(_Choice(p, bool(req.echo), req.logprobs is not None))
                self.seqs.append(SequenceState(
                    p.ids, max_tokens, config.replace(seed=seed),
                    on_output=functools.partial(self._receive, index),
                    logprobs=req.logprobs, prompt_logprobs=bool(req.echo) and req.logprobs is not None,
                    grammar=extras.grammar.matcher() if extras.grammar is not None else None,
                    logit_bias=extras.logit_bias, min_tokens=extras.min_tokens,
                ))

    def _receive(self, index: int, out: Output) -> None:
        """A choice's output, on the scheduler's thread: onto `queue`, or folded in at once."""
        if self.stream or out.finish_reason is not None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, out))
        else:
            self.choices[index].add(out)

    def cancel(self, scheduler: BatchScheduler) -> None:
        """Free every sequence still running (a no-op for finished ones)."""
        for seq in self.seqs:
            scheduler.cancel(seq)

    def _chat_logprobs(self, entries: list[TokenLogprob], want: bool) -> dict[str, Any] | None:
        return {"content": chat_logprobs(entries, self.tokenizer)} if want else None

    def _tool_message(self, choice: _Choice) -> tuple[dict[str, Any], str | None]:
        """A forced tool call's message (the decoded arguments as `tool_calls`) and finish reason."""
        calls = tool_calls(self.tools, choice.text) if choice.finish_reason == "stop" else None
        if calls is None:  # cut short (max_tokens): the partial text, as it is
            return {"role": "assistant", "content": choice.text}, choice.finish_reason
        # OpenAI: "stop" after a named function, "tool_calls" when the model chose (required)
        return ({"role": "assistant", "content": None, "tool_calls": calls},
                "stop" if self.tools.name is not None else "tool_calls")

    def choice_body(self, index: int, choice: _Choice) -> dict[str, Any]:
        """One finished choice as the JSON body shows it."""
        if self.chat:
            message, finish = {"role": "assistant", "content": choice.text}, choice.finish_reason
            if self.tools is not None:
                message, finish = self._tool_message(choice)
            return {"index": index, "message": message,
                    "logprobs": self._chat_logprobs(choice.entries, choice.want_logprobs), "finish_reason": finish}
        return {"index": index, "text": choice.text, "logprobs": choice.logprobs,
                "finish_reason": choice.finish_reason}

    def chunk(self, index: int, text: str, lp: dict[str, list[Any]] | None, finish: str | None,
              out: Output | None = None) -> dict[str, Any]:
        """One streamed piece of one choice."""
        if not self.chat:
            return {**self.head, "choices": [{"index": index, "text": text, "logprobs": lp, "finish_reason": finish}]}
        choice = self.choices[index]
        delta: dict[str, Any] = {} if index in self.roles_sent else {"role": "assistant"}
        self.roles_sent.add(index)
        if self.tools is not None:  # a tool call goes out whole, in the last chunk
            if finish:
                message, finish = self._tool_message(choice)
                delta.update({k: v for k, v in message.items() if k != "role"})
        elif text or not finish:
            delta["content"] = text
        entries = out.logprobs if out is not None else []
        return {**self.head, "object": "chat.completion.chunk",
                "choices": [{"index": index, "delta": delta, "logprobs": self._chat_logprobs(entries, choice.want_logprobs),
                             "finish_reason": finish}]}

    def usage(self) -> dict[str, int]:
        prompt_tokens = sum(len(p.ids) for p in self.prompts)
        completion_tokens = sum(c.tokens for c in self.choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def collect(self, outputs: AsyncIterator[tuple[int, Output]]) -> dict[str, Any]:
        """The whole completion, as one JSON body."""
        async for index, out in outputs:
            if out.finish_reason == FINISH_ERROR:
                raise APIError(500, out.error or "generation failed")
            self.choices[index].add(out)
        return {**self.head, "choices": [self.choice_body(i, c) for i, c in enumerate(self.choices)],
                "usage": self.usage()}

    async def events(self, outputs: AsyncIterator[tuple[int, Output]],
                     scheduler: BatchScheduler) -> AsyncIterator[str]:
        """The completion as server-sent events: a chunk per step and choice, then [DONE]."""
        try:
            async for index, out in outputs:
                if out.finish_reason == FINISH_ERROR:
                    yield _sse(APIError(500, out.error or "generation failed").body())
                    return
                text, lp = self.choices[index].add(out)
                if out.finish_reason is None and (self.tools is not None or (not text and lp is None)):
                    continue  # text held back (a partial character, a possible stop string, a tool call)
                yield _sse(self.chunk(index, text, lp, out.finish_reason, out))
            if self.include_usage:
                kind = {"object": "chat.completion.chunk"} if self.chat else {}
                yield _sse({**self.head, **kind, "choices": [], "usage": self.usage()})
            yield _sse("[DONE]")
        finally:
            self.cancel(scheduler)


# --------------------------------------------------------------------------- the app

class _ClientGone(Exception):
    pass


class _EventStream(StreamingResponse):
    """Server-sent events whose generator is always closed, also when the client goes away
    mid-stream (Starlette only stops iterating), so its `finally` frees the sequences at once."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def _add_error_handlers(app: FastAPI) -> None:
    """Every error answered in OpenAI's shape: ours, Starlette's (404, 405...) and unexpected ones (500)."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if err.status_code == 404 else None
        return APIError(err.status_code, str(err.detail), code=code).response()

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return APIError(500, "internal server error").response()


def create_app(scheduler: BatchScheduler | nn.Module, settings: ServeSettings) -> FastAPI:
    """The FastAPI app: starts the scheduler's thread on startup and stops it on shutdown.

    scheduler: a language model's BatchScheduler, or a classifier (a GPTModel from `gptforge
    finetune classify`) served without one: it labels (/classify) and embeds, and cannot generate."""
    if isinstance(scheduler, BatchScheduler):
        served, tokenizer = scheduler.model, scheduler.tokenizer
    else:
        served, tokenizer, scheduler = scheduler.eval(), as_tokenizer(None), None
    context_length = served.cfg.context_length
    vocab_size = served.cfg.vocab_size
    created = int(time.time())
    metrics = ServerMetrics(scheduler)
    # embeddings and classification: a forward pass each, off the event loop, one at a time
    pool = ThreadPoolExecutor(1, thread_name_prefix="gptforge-pool")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if scheduler is not None:
            scheduler.start()
        yield
        if scheduler is not None:
            scheduler.stop()
        pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="gptforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.metrics = metrics
    _add_error_handlers(app)
    _add_middleware(app, settings, metrics)

    def model_card() -> dict[str, Any]:
        return {"id": settings.model_name, "object": "model", "created": created, "owned_by": "gptforge"}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": settings.model_name, **(scheduler.stats() if scheduler is not None else {})}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != settings.model_name:
            raise _unknown_model(model_id)
        return model_card()

    def _unknown_model(name: str) -> APIError:
        return APIError(404, f"The model '{name}' does not exist; this server serves '{settings.model_name}'",
                        param="model", code="model_not_found")

    def check_model(name: str | None, task: str | None = None) -> None:
        """`name` must be the served model's (None: it is); `task` ("generate" or "classify"), when
        given, must be one the model does."""
        if name is not None and name != settings.model_name:
            raise _unknown_model(name)
        spec = served.cfg.classifier
        if task == "generate" and spec is not None:
            raise APIError(400, f"the model '{settings.model_name}' is a classifier (labels "
                                f"{', '.join(map(str, spec.labels))}): it labels texts and cannot generate; use "
                                f"POST /classify", param="model", code="model_is_classifier")
        if task == "classify" and spec is None:
            raise APIError(400, f"the model '{settings.model_name}' is a language model, not a classifier; serve one "
                                f"made by `gptforge finetune classify` to use /classify", param="model",
                           code="model_not_classifier")

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        return {"tokenizer_class": "GPT2Tokenizer", "eos_token": ENDOFTEXT, "bos_token": ENDOFTEXT,
                "unk_token": ENDOFTEXT, "pad_token": None, "chat_template": None,
                "model_max_length": context_length, "vocab_size": tokenizer.vocab_size}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        req = parse_request(await _read_json(request, settings.max_body_bytes), TokenizeRequest)
        if req.model is not None and req.model != settings.model_name:
            raise _unknown_model(req.model)
        ids = tokenizer.encode(req.prompt)
        strs = [tokenizer.decode_bytes([i]).decode("utf-8", "replace") for i in ids] if req.return_token_strs else None
        return {"count": len(ids), "max_model_len": context_length, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        req = parse_request(await _read_json(request, settings.max_body_bytes), DetokenizeRequest)
        if req.model is not None and req.model != settings.model_name:
            raise _unknown_model(req.model)
        bad = [i for i in req.tokens if not 0 <= i < tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary [0, {tokenizer.vocab_size})",
                           param="tokens")
        return {"prompt": tokenizer.decode(req.tokens)}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = parse_request(await _read_json(request, settings.max_body_bytes))
        check_model(req.model, "generate")
        prompts, max_tokens, config = _plan(req, settings, tokenizer, vocab_size, context_length)
        extras = await _extras(req, completion_spec(req), min(vocab_size, tokenizer.vocab_size))
        job = _Completion(req, prompts, max_tokens, config, settings.model_name, asyncio.get_running_loop(),
                          extras=extras)
        return await _answer(scheduler, job, request, bool(req.stream))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        chat = parse_request(await _read_json(request, settings.max_body_bytes), ChatCompletionRequest)
        check_model(chat.model, "generate")
        req = _chat_as_completion(chat, scheduler.model.cfg, settings, tokenizer)
        prompts, max_tokens, config = _plan(req, settings, tokenizer, vocab_size, context_length)
        spec, tools = chat_spec(chat)
        extras = await _extras(req, spec, min(vocab_size, tokenizer.vocab_size))
        if extras.grammar is None:  # a grammar decides where its text ends; the template's sections would cut it
            config = config.replace(stop_strings=config.stop_strings + scheduler.model.cfg.prompt_template.stop)
        job = _Completion(req, prompts, max_tokens, config, settings.model_name, asyncio.get_running_loop(),
                          chat=True, extras=extras, tokenizer=tokenizer, tools=tools)
        return await _answer(scheduler, job, request, bool(req.stream))

    add_playground(app, served, tokenizer, settings.model_name,
                   functools.partial(_read_json, limit=settings.max_body_bytes))

    async def in_pool(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """fn(*args, **kwargs) on the pool's thread; a GptforgeError (bad input) is a 400 on `input`."""
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args, **kwargs))
        except GptforgeError as err:
            raise APIError(400, str(err), param="input") from None

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> dict[str, Any]:
        req = parse_request(await _read_json(request, settings.max_body_bytes), EmbeddingRequest)
        check_model(req.model)
        width = served.cfg.emb_dim
        if req.dimensions is not None and req.dimensions != width:
            raise APIError(400, f"dimensions must be {width} (this model's width) or left out: GPT-2's vectors "
                                f"cannot be shortened", param="dimensions")
        try:
            rows = input_ids(req.input, tokenizer, vocab_size)
        except GptforgeError as err:
            raise APIError(400, str(err), param="input") from None
        _check_inputs(rows, context_length)
        vectors = await in_pool(embed, served, rows, tokenizer=tokenizer)  # (N, width)
        used = sum(len(ids) for ids in rows)
        metrics.prompt_tokens.inc(used)
        as_base64 = req.encoding_format == "base64"
        data = [{"object": "embedding", "index": i,
                 "embedding": _base64_floats(v.numpy()) if as_base64 else v.tolist()} for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": settings.model_name,
                "usage": {"prompt_tokens": used, "total_tokens": used}}

    @app.post("/classify")
    @app.post("/v1/classify")
    async def classify_texts(request: Request) -> dict[str, Any]:
        req = parse_request(await _read_json(request, settings.max_body_bytes), ClassifyRequest)
        check_model(req.model, "classify")
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not texts:
            raise APIError(400, "input must not be empty: give at least one text", param="input")
        if len(texts) > MAX_INPUTS:
            raise APIError(400, f"input holds {len(texts)} texts; at most {MAX_INPUTS} per request", param="input")
        predictions = await in_pool(classify, served, texts)
        spec = served.cfg.classifier
        limit = min(spec.max_length or context_length, context_length)  # what classify() reads of each text
        used = sum(min(len(ids), limit) for ids in tokenizer.encode_batch(texts))
        metrics.prompt_tokens.inc(used)
        data = [{"index": i, "label": p.label, "probs": [p.probabilities[name] for name in spec.labels],
                 "num_classes": len(spec.labels)} for i, p in enumerate(predictions)]
        return {"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                "model": settings.model_name, "data": data,
                "usage": {"prompt_tokens": used, "total_tokens": used, "completion_tokens": 0,
                          "prompt_tokens_details": None}}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app


def _check_inputs(rows: list[list[int]], context_length: int) -> None:
    """An embeddings request's inputs (token ids) against the server's limits: how many, how long."""
    if len(rows) > MAX_INPUTS:
        raise APIError(400, f"input holds {len(rows)} inputs; at most {MAX_INPUTS} per request", param="input")
    for n, ids in enumerate(rows):
        if len(ids) > context_length:
            raise APIError(400, f"This model's maximum context length is {context_length} tokens, however input {n} "
                                f"has {len(ids)} tokens. Please reduce the input's length.",
                           param="input", code="context_length_exceeded")


def _base64_floats(vector: np.ndarray) -> str:
    """A vector as OpenAI's `encoding_format: "base64"`: its little-endian float32 bytes in base64."""
    return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")


class _BearerAuth:
    """ASGI middleware: a request for anything but OPEN_PATHS / OPEN_PREFIX (and CORS preflights)
    needs `Authorization: Bearer <key>`, else a 401 in OpenAI's shape."""

    def __init__(self, app: Any, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if (scope["type"] != "http" or scope["method"] == "OPTIONS" or path in OPEN_PATHS
                or path.startswith(OPEN_PREFIX)):
            return await self.app(scope, receive, send)
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key):
            return await self.app(scope, receive, send)
        if not token.strip():
            err = APIError(401, "You didn't provide an API key. You need to provide your API key in an Authorization "
                                "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
        else:
            err = APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        response = err.response()
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)


def _add_middleware(app: FastAPI, settings: ServeSettings, metrics: ServerMetrics) -> None:
    """Around the routes, inside out: the API key, the request metrics (a 401 is counted), CORS
    (outermost: a preflight is answered, and a 401 carries its headers so that a page can read it)."""
    if settings.api_key:
        app.add_middleware(_BearerAuth, key=settings.api_key)
    app.add_middleware(metrics.middleware)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
                           allow_headers=["*"])


async def _answer(scheduler: BatchScheduler, job: _Completion, request: Request, stream: bool) -> Response:
    """Submit a request's sequences; answer with their events or, when done, one JSON body."""
    request.app.state.metrics.track(job.seqs)
    try:
        for seq in job.seqs:
            scheduler.submit(seq)
    except (SchedulerClosed, SchedulerFull) as err:
        job.cancel(scheduler)
        raise APIError(503, str(err)) from None
    outputs = _outputs(job.queue, request, len(job.seqs))
    if stream:
        return _EventStream(job.events(outputs, scheduler), media_type="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        return JSONResponse(await job.collect(outputs))
    except _ClientGone:
        return Response(status_code=499)
    finally:
        job.cancel(scheduler)


async def _read_json(request: Request, limit: int) -> Any:
    """The request body as JSON, refusing more than `limit` bytes (413) before reading them all."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes",
                       code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise APIError(400, "the request body is not valid JSON") from None


async def _outputs(queue: asyncio.Queue, request: Request, count: int) -> AsyncIterator[tuple[int, Output]]:
    """The outputs of `count` sequences as they arrive, until each has finished; raises _ClientGone
    when the client disconnects while waiting."""
    remaining = count
    while remaining:
        try:
            index, out = await asyncio.wait_for(queue.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise _ClientGone from None
            continue
        if out.finish_reason is not None:
            remaining -= 1
        yield index, out


# --------------------------------------------------------------------------- running it

def is_loopback(host: str) -> bool:
    """Whether `host` names only this machine (127.0.0.0/8, ::1 or localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) for the server; an address it cannot have (in use, not
    this machine's, an unknown host name) is a GptforgeError, not uvicorn's log lines and exit 3."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as err:
        raise GptforgeError(f"cannot listen on {host}:{port} ({err.strerror or err}); check --host") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart past TIME_WAIT
        sock.bind(address)
    except OSError as err:
        sock.close()
        hint = "choose another --port" if err.errno == errno.EADDRINUSE else "check --host"
        raise GptforgeError(f"cannot listen on {host}:{port} ({err.strerror or err}); {hint}") from None
    sock.set_inheritable(True)
    return sock


def run_server(model: nn.Module, settings: ServeSettings, *, host: str = "127.0.0.1", port: int = 8000,
               tokenizer: Tokenizer | None = None, log_level: str = "info") -> None:
    """Serve `model` until SIGINT/SIGTERM. Binds loopback unless `host` says otherwise."""
    import uvicorn

    if not is_loopback(host):
        log.warning("binding %s: the server is reachable from other machines%s", host,
                    "" if settings.api_key else " without an API key (see --api-key)")
    if model.cfg.classifier is not None:  # it labels texts: no sequences to decode
        app = create_app(model, settings)
        scheduler = None
    else:
        scheduler = BatchScheduler(model, as_tokenizer(tokenizer), max_batch_size=settings.max_batch_size,
                                   max_waiting=settings.max_waiting)
        app = create_app(scheduler, settings)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=settings.shutdown_grace_s + 5)

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # Before uvicorn waits for open connections: bound how long in-flight streams may run.
            if scheduler is not None:
                scheduler.drain(settings.shutdown_grace_s)
            super().handle_exit(sig, frame)

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started and sockets:  # uvicorn names its address only for sockets it bound itself
                self._log_started_message(sockets)
                address = sockets[0].getsockname()
                logging.getLogger("uvicorn.error").info("The playground page is at http://%s:%d/",
                            f"[{address[0]}]" if ":" in address[0] else address[0], address[1])

    sock = listen_socket(host, port)  # before uvicorn starts: a port in use is one line and exit 2
    settle_heap()
    with sock:
        DrainingServer(config).run(sockets=[sock])


def settle_heap() -> None:
    """Keep what lives as long as the server (the model, the tokenizer, the imported modules) out of
    the garbage collector's full passes (`gc.freeze`). Such a pass walked ~250,000 objects in 115 ms
    in a server on GPT-2 124M, and ran whenever the requests' own garbage piled up: a stall of every
    stream, on the scheduler's thread or with the GIL held against it."""
    gc.collect()
    gc.freeze()
