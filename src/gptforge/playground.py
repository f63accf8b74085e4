"""The page `gptforge serve` shows at `/` and the endpoints only it needs.

    GET  /                 the page (static files from gptforge/web/, under /static/)
    GET  /v1/model_card    what the served model is and can do: kind, chat, labels, config,
                           parameter counts (tied and untied), tensor shapes of one forward pass
    POST /v1/inspect       one forward pass on a prompt, kept: tokens with ids, attention weights of
                           the layers asked, a logit lens, and the next token's distribution

The page makes no request to any other host; everything it loads comes from here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import torch.nn as nn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from .errors import GptforgeError
from .generation import GenerationConfig
from .inspection import MAX_LENS_TOP_K, inspect_prompt, model_card
from .model import GPTModel
from .openai_api import MAX_SEED, APIError, parse_request
from .tokenizer import Tokenizer

WEB_DIR = Path(__file__).resolve().parent / "web"
MAX_INSPECT_TOKENS = 256  # attention is T x T per head and layer: 256 tokens of GPT-2 124M is 9.4M weights


class NextTokenOptions(BaseModel):
    """The sampling options whose processed distribution `next_token` shows (as a completion's)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    temperature: float = Field(1.0, ge=0, le=2)
    top_k: int | None = Field(None, ge=1)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    top: int = Field(20, ge=1, le=100)


class InspectRequest(BaseModel):
    """The body of POST /v1/inspect."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    prompt: str | list[int]
    attention_layers: list[int] | None = None  # None: every layer
    logit_lens_top_k: int = Field(5, ge=0, le=MAX_LENS_TOP_K)
    next_token: NextTokenOptions | None = None


def inspect_limit(context_length: int) -> int:
    """The longest prompt POST /v1/inspect takes."""
    return min(MAX_INSPECT_TOKENS, context_length)


def _checked(req: InspectRequest, model: GPTModel, tokenizer: Tokenizer) -> tuple[list[int], tuple[int, ...]]:
    cfg = model.cfg
    ids = tokenizer.encode(req.prompt) if isinstance(req.prompt, str) else list(req.prompt)
    if not ids:
        raise APIError(400, "the prompt is empty: give some text (or token ids) to inspect", param="prompt")
    vocab = min(cfg.vocab_size, tokenizer.vocab_size)
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})", param="prompt")
    limit = inspect_limit(cfg.context_length)
    if len(ids) > limit:
        raise APIError(400, f"the prompt is {len(ids)} tokens; inspection takes at most {limit} (attention "
                            f"grows with its square): shorten the prompt", param="prompt",
                       code="context_length_exceeded")
    layers = tuple(range(cfg.n_layers)) if req.attention_layers is None else tuple(req.attention_layers)
    wrong = [i for i in layers if not 0 <= i < cfg.n_layers]
    if wrong:
        raise APIError(400, f"attention_layers {wrong} are not layers of this model (0 to {cfg.n_layers - 1})",
                       param="attention_layers")
    return ids, layers


def add_playground(app: FastAPI, model: nn.Module, tokenizer: Tokenizer, model_name: str,
                   read_json: Callable[[Request], Awaitable[Any]]) -> None:
    """Mount the page and add /v1/model_card and /v1/inspect to `app`. read_json: the server's body
    reader (its size limit and error shape)."""
    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    if not isinstance(model, GPTModel):
        return
    card = model_card(model, model_name, tokenizer)
    card["inspect_max_tokens"] = inspect_limit(model.cfg.context_length)

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")

    @app.get("/v1/model_card")
    async def get_model_card() -> dict[str, Any]:
        return card

    @app.post("/v1/inspect")
    async def inspect(request: Request) -> dict[str, Any]:
        req = parse_request(await read_json(request), InspectRequest)
        check_model(req.model)
        if model.cfg.classifier is not None:
            raise APIError(400, f"the model '{model_name}' is a classifier: inspection reads a language model's "
                                "next-token predictions", param="model")
        ids, layers = _checked(req, model, tokenizer)
        next_config = None
        if req.next_token is not None:
            o = req.next_token
            try:
                next_config = GenerationConfig(temperature=o.temperature, top_k=o.top_k, top_p=o.top_p, seed=o.seed)
            except GptforgeError as err:
                raise APIError(400, str(err), param="next_token") from None
        body = await asyncio.to_thread(
            inspect_prompt, model, tokenizer, ids, attention_layers=layers, lens_top_k=req.logit_lens_top_k,
            next_config=next_config, next_top=req.next_token.top if req.next_token else 20)
        return {"model": model_name, **body}
