"""What a completion or chat request's decoding fields mean for the scheduler, and how their results
are shown: structured output (response_format, vLLM's guided_json / structured_outputs), forced tool
calls (tool_choice "required" or a named function, decoded under the tools' parameter schemas),
logit_bias, min_tokens, and the chat API's logprobs shape. The server (`serve.py`) calls these on the
request path; bad values are APIErrors (400) naming the parameter."""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any

from .openai_api import MAX_LOGIT_BIAS, APIError, ChatCompletionRequest, CompletionRequest
from .scheduler import TokenLogprob
from .structured import (
    Grammar, GrammarError, choice_grammar, json_object_grammar, json_schema_grammar, regex_grammar,
)
from .tokenizer import Tokenizer

AUTO_TOOLS_REFUSED = (
    "tool_choice 'auto' is not supported: a GPT-2 model cannot decide by itself whether to call a tool "
    "(free tool calling is not supported for GPT-2). Set tool_choice to 'required' or name a function "
    "({\"type\": \"function\", \"function\": {\"name\": ...}}) and the call is decoded under the tool's "
    "parameter schema; or 'none' to answer in text")


@dataclasses.dataclass(frozen=True)
class GrammarSpec:
    """A constraint as the request gave it, compiled later (`compile_grammar`) off the event loop."""

    kind: str  # "json_schema", "json_object", "regex", "choice"
    value: Any
    param: str  # the request field it came from, for errors


@dataclasses.dataclass(frozen=True)
class ToolMode:
    """A forced tool call: `name` for a named function, None for "required" (any of `tools`, as a list)."""

    name: str | None
    parallel: bool


def compile_grammar(spec: GrammarSpec | None) -> Grammar | None:
    """The compiled grammar of a spec; a schema that cannot compile is a 400 naming the problem."""
    if spec is None:
        return None
    try:
        if spec.kind == "json_schema":
            value = json.loads(spec.value) if isinstance(spec.value, str) else spec.value
            return json_schema_grammar(value)
        if spec.kind == "json_object":
            return json_object_grammar()
        if spec.kind == "regex":
            return regex_grammar(spec.value)
        return choice_grammar(spec.value)
    except (GrammarError, json.JSONDecodeError) as err:
        raise APIError(400, f"{spec.param}: {err}", param=spec.param.split(".")[0],
                       code="invalid_grammar") from None


def response_format_spec(req: CompletionRequest | ChatCompletionRequest) -> GrammarSpec | None:
    """OpenAI's response_format: text (no constraint), json_object, or json_schema (with a schema)."""
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        if fmt is not None and fmt.json_schema is not None:
            raise APIError(400, "response_format.json_schema is only allowed with type 'json_schema'",
                           param="response_format")
        return None
    if fmt.type == "json_object":
        return GrammarSpec("json_object", None, "response_format")
    if fmt.json_schema is None:
        raise APIError(400, "response_format of type 'json_schema' needs a json_schema object "
                            "({\"name\": ..., \"schema\": {...}})", param="response_format")
    schema = {} if fmt.json_schema.schema_ is None else fmt.json_schema.schema_  # none: any JSON, as OpenAI
    return GrammarSpec("json_schema", schema, "response_format.json_schema.schema")


def completion_spec(req: CompletionRequest) -> GrammarSpec | None:
    """The one constraint of a completion request: response_format, guided_json or structured_outputs."""
    specs = []
    if (spec := response_format_spec(req)) is not None:
        specs.append(spec)
    if req.guided_json is not None:
        specs.append(GrammarSpec("json_schema", req.guided_json, "guided_json"))
    so = req.structured_outputs
    if so is not None:
        given = [(kind, value) for kind, value in (("json_schema", so.json_), ("regex", so.regex),
                                                   ("choice", so.choice)) if value is not None]
        if so.json_object:
            given.append(("json_object", None))
        if len(given) != 1:
            raise APIError(400, "structured_outputs takes exactly one of json, json_object, regex, choice",
                           param="structured_outputs")
        kind, value = given[0]
        specs.append(GrammarSpec(kind, value, f"structured_outputs.{'json' if kind == 'json_schema' else kind}"))
    if len(specs) > 1:
        raise APIError(400, f"give one constraint, not several ({', '.join(s.param for s in specs)})",
                       param=specs[1].param.split(".")[0])
    return specs[0] if specs else None


def chat_spec(chat: ChatCompletionRequest) -> tuple[GrammarSpec | None, ToolMode | None]:
    """A chat request's constraint: its forced tool call, else its response_format."""
    choice, tools = chat.tool_choice, chat.tools or []
    if choice is None and tools:
        choice = "auto"  # OpenAI's default when tools are given
    if choice is None or choice == "none":
        return response_format_spec(chat), None
    if choice == "auto":
        raise APIError(400, AUTO_TOOLS_REFUSED, param="tool_choice")
    if not tools:
        raise APIError(400, "tool_choice needs tools: list the functions in tools", param="tools")
    if chat.response_format is not None and chat.response_format.type != "text":
        raise APIError(400, "response_format cannot be combined with a forced tool call", param="response_format")
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise APIError(400, "tools must have distinct function names", param="tools")
    if choice == "required":
        parallel = chat.parallel_tool_calls is not False
        calls: dict[str, Any] = {"type": "array", "minItems": 1,
                                 "items": {"anyOf": [_call_schema(t.function.name, t.function.parameters)
                                                     for t in tools]}}
        if not parallel:
            calls["maxItems"] = 1
        return GrammarSpec("json_schema", calls, "tools"), ToolMode(None, parallel)
    name = choice.function.name
    if name not in names:
        raise APIError(400, f"tool_choice names the function '{name}', which is not among the tools "
                            f"({', '.join(names)})", param="tool_choice")
    parameters = tools[names.index(name)].function.parameters
    return GrammarSpec("json_schema", _parameters(parameters), "tools"), ToolMode(name, False)


def _parameters(schema: dict[str, Any] | None) -> dict[str, Any]:
    return {"type": "object", "properties": {}} if schema is None else schema  # none: no arguments, as OpenAI


def _call_schema(name: str, parameters: dict[str, Any] | None) -> dict[str, Any]:
    """One call as vLLM decodes "required": {"name": <the function>, "parameters": {...}}."""
    return {"type": "object", "properties": {"name": {"const": name}, "parameters": _parameters(parameters)},
            "required": ["name", "parameters"], "additionalProperties": False}


def tool_calls(mode: ToolMode, text: str) -> list[dict[str, Any]] | None:
    """The `tool_calls` of a message decoded in `mode` (None when the text is cut short, e.g. by max_tokens)."""
    def call(name: str, arguments: str) -> dict[str, Any]:
        return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": name, "arguments": arguments}}

    if mode.name is not None:
        return [call(mode.name, text)]
    try:
        calls = json.loads(text)
        return [call(c["name"], json.dumps(c["parameters"], separators=(",", ":"))) for c in calls]
    except (ValueError, KeyError, TypeError):
        return None


def logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's logit_bias ({"token id": -100..100}) as {id: bias}."""
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()) or not 0 <= int(key) < vocab_size:
            raise APIError(400, f"logit_bias keys must be token ids in [0, {vocab_size}), got {key!r}",
                           param="logit_bias")
        if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise APIError(400, f"logit_bias values must lie in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}], "
                                f"got {value} for token {key}", param="logit_bias")
        out[int(key)] = float(value)
    return out


def chat_logprobs(entries: list[TokenLogprob], tokenizer: Tokenizer) -> list[dict[str, Any]]:
    """Tokens with their logprobs in the chat API's shape: {token, logprob, bytes, top_logprobs}."""
    def one(token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": tokenizer.decode([token_id]), "logprob": logprob,
                "bytes": list(tokenizer.decode_bytes([token_id]))}

    return [{**one(e.token_id, e.logprob), "top_logprobs": [one(i, v) for i, v in e.top_ids or []]}
            for e in entries]
