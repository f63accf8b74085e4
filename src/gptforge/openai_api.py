"""OpenAI's wire format as the server speaks it: the error shape and the request bodies
(completions, chat completions, embeddings, and vLLM's tokenizer and classify endpoints), checked
by pydantic; a bad body becomes a 400 naming the first bad parameter. Besides OpenAI's own fields,
the requests take the ones vLLM adds and clients send (top_k, min_p, repetition_penalty,
min_tokens, ignore_eos, guided_json, structured_outputs)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_SEED = 2**63 - 1
MAX_LOGPROBS = 20  # top alternatives per token: as vLLM (and OpenAI's chat API)
MAX_LOGIT_BIAS = 100  # |bias| at most, as OpenAI


class APIError(Exception):
    """An error answered in OpenAI's format."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    """response_format.json_schema: a named schema the output must follow."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """response_format: plain text, any JSON object, or JSON valid against a schema."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs on completions: exactly one of these constraints."""

    model_config = ConfigDict(extra="forbid", strict=True)
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str


class NamedToolChoice(BaseModel):
    """tool_choice naming one function: {"type": "function", "function": {"name": ...}}."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    function: FunctionName


class SamplingFields(BaseModel):
    """The fields completions and chat completions share: OpenAI's; null means the default."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None  # None: the one model served
    temperature: float | None = Field(1.0, ge=0, le=2)
    top_p: float | None = Field(1.0, gt=0, le=1)
    n: int | None = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(0.0, ge=-2, le=2)
    frequency_penalty: float | None = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    # vLLM's sampling extras (top_k -1 or 0: off)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool | None = None


class CompletionRequest(SamplingFields):
    """The body of POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None
    guided_json: dict[str, Any] | str | None = None  # vLLM's older name for structured_outputs.json
    structured_outputs: StructuredOutputs | None = None


class ChatCompletionRequest(SamplingFields):
    """The body of POST /v1/chat/completions (messages are checked by `instruct.chat_prompt`)."""

    messages: list[dict[str, Any]]
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None


class TokenizeRequest(BaseModel):
    """POST /tokenize, as vLLM takes it. GPT-2 adds no special tokens, so add_special_tokens changes nothing."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    """POST /detokenize, as vLLM takes it."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    tokens: list[int]


class EmbeddingRequest(BaseModel):
    """The body of POST /v1/embeddings. `dimensions` is checked by the server (only the model's own
    width is honoured: GPT-2's vectors cannot be shortened as OpenAI's text-embedding-3 ones)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = None
    user: str | None = None


class ClassifyRequest(BaseModel):
    """The body of POST /classify, as vLLM takes it: texts to label."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    input: str | list[str]
    user: str | None = None


INPUT_SHAPES = {  # what a bad `input` is told
    EmbeddingRequest: "input must be a string, a list of strings, a list of token ids or a list of token-id lists",
    ClassifyRequest: "input must be a string or a list of strings",
}


def parse_request(data: Any, kind: type[BaseModel] = CompletionRequest) -> Any:
    """A JSON body checked against a request model; the first problem becomes a 400 in OpenAI's shape."""
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return kind.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = str(first["loc"][0]) if first["loc"] else None
        where = ".".join(str(part) for part in first["loc"])  # e.g. response_format.json_schema.name
        if param == "prompt" and kind is CompletionRequest:
            message = "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists"
        elif param == "input" and kind in INPUT_SHAPES:
            message = INPUT_SHAPES[kind]
        elif first["type"] == "extra_forbidden":
            message = f"unrecognized request argument supplied: {where}"
        else:
            message = f"{where}: {first['msg']}"
        raise APIError(400, message, param=param) from None
