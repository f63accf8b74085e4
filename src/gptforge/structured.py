"""Structured output: decoding constrained by a grammar, so that the text is always valid JSON (valid
against a JSON schema when one is given), matches a regular expression, or is one of a list of strings.

The grammars are compiled and followed by llguidance (the library vLLM, SGLang and llama.cpp use for
this), on GPT-2's tokenizer built offline from `tokenizer.gpt2_encoding`. A `Grammar` is compiled once
per request; each sequence gets its own `GrammarMatcher`, which says, before every token, which tokens
may come next (a bitmask over the vocabulary) and follows the token that was picked. JSON is held
compact (no whitespace between tokens, "," and ":" as separators, as vLLM's
`disable-any-whitespace`): a weak model then cannot spend its budget on spaces and newlines.

    grammar = json_schema_grammar({"type": "object", "properties": {"n": {"type": "integer"}}})
    matcher = grammar.matcher()
    masks = new_bitmask(1, vocab_size); matcher.fill(masks, 0)   # before the model's step
    logits = apply_bitmask(logits, masks)                        # (1, V): forbidden tokens -inf
    matcher.accept(token)                                        # after it
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .errors import GptforgeError
from .tokenizer import gpt2_encoding

# Compact JSON: no whitespace anywhere, the shortest separators.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
ANY_JSON_OBJECT = {"type": "object"}


class GrammarError(GptforgeError):
    """A schema, pattern or choice that cannot be compiled into a grammar."""


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:  # pragma: no cover - a runtime dependency, always there when installed properly
        raise GptforgeError("structured output needs the llguidance package: pip install llguidance") from None
    return llguidance


@functools.lru_cache(maxsize=1)
def ll_tokenizer() -> Any:
    """GPT-2's tokenizer in llguidance's form (built once, ~1 s; no network)."""
    from llguidance.tiktoken import lltokenizer_from_encoding

    _llguidance()
    return lltokenizer_from_encoding(gpt2_encoding())


@dataclasses.dataclass(frozen=True)
class Grammar:
    """A compiled grammar that any number of sequences can follow.

    kind: what it came from ("json_schema", "json_object", "regex", "choice"), for messages.
    text: llguidance's serialized grammar.
    """

    kind: str
    text: str

    def matcher(self) -> GrammarMatcher:
        """A fresh matcher at the grammar's start, for one sequence."""
        return GrammarMatcher(self)


def _compile(kind: str, make: Any, what: str) -> Grammar:
    """Build llguidance's grammar with `make()` and check it compiles against GPT-2's tokenizer."""
    llg = _llguidance()
    try:
        text = make(llg.LLMatcher)
    except (ValueError, TypeError) as err:
        raise GrammarError(f"{what}: {err}") from None
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(text, ll_tokenizer())
    if is_error:
        raise GrammarError(f"{what} cannot be compiled: {_first_line(messages[0])}")
    return Grammar(kind, text)


def _first_line(message: str) -> str:
    """llguidance's message on one line (a regex error spans several)."""
    return " ".join(line.strip() for line in message.strip().splitlines() if line.strip())[:500] or "unknown error"


def json_schema_grammar(schema: Any) -> Grammar:
    """JSON text valid against `schema` (a dict, or True/False as JSON Schema allows), held compact.
    An object schema that lists its properties and says nothing of others allows no others (see
    `closed_objects`). A schema llguidance cannot compile (an unknown type, an unsupported keyword, a
    bad $ref) is a GrammarError naming the problem."""
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise GrammarError(f"the JSON schema must be an object, got {type(schema).__name__}")
    text = json.dumps(closed_objects(schema))
    return _compile("json_schema", lambda m: m.grammar_from_json_schema(text, overrides=JSON_OPTIONS),
                    "the JSON schema")


_SUBSCHEMA = ("items", "additionalItems", "contains", "not", "if", "then", "else", "propertyNames",
              "additionalProperties", "unevaluatedProperties", "unevaluatedItems")
_SUBSCHEMA_LISTS = ("anyOf", "allOf", "oneOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def closed_objects(schema: Any) -> Any:
    """A copy of `schema` where each object schema with `properties` and neither
    `additionalProperties` nor `unevaluatedProperties` gets `additionalProperties: false`: as vLLM
    does (xgrammar's strict mode), and as OpenAI's strict schemas require. Otherwise a model may add
    keys of its own, and a weak one never stops writing a key."""
    if isinstance(schema, list):  # an old-style tuple `items`
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA:
        if key in out:
            out[key] = closed_objects(out[key])
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_objects(s) for s in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed_objects(s) for name, s in out[key].items()}
    if (isinstance(out.get("properties"), dict) and "additionalProperties" not in out
            and "unevaluatedProperties" not in out):
        out["additionalProperties"] = False
    return out


def json_object_grammar() -> Grammar:
    """Any JSON object (OpenAI's `response_format: {"type": "json_object"}`), held compact."""
    return _json_object()


@functools.lru_cache(maxsize=1)
def _json_object() -> Grammar:
    return json_schema_grammar(ANY_JSON_OBJECT)


def regex_grammar(pattern: str) -> Grammar:
    """Text matching the regular expression `pattern` in full (Rust regex syntax)."""
    if not isinstance(pattern, str) or not pattern:
        raise GrammarError("the regular expression must be a non-empty string")
    return _compile("regex", lambda m: m.grammar_from_regex(pattern), "the regular expression")


def choice_grammar(choices: Sequence[str]) -> Grammar:
    """Exactly one of `choices` (non-empty strings)."""
    if (isinstance(choices, str) or not isinstance(choices, Sequence) or not choices
            or not all(isinstance(c, str) and c for c in choices)):
        raise GrammarError("choice must be a non-empty list of non-empty strings")
    lark = "start: " + " | ".join(json.dumps(c) for c in choices)
    return _compile("choice", lambda m: m.grammar_from_lark(lark), "the choice")


class GrammarMatcher:
    """One sequence's place in a grammar. Not thread-safe: one thread at a time (the scheduler fills
    masks on its worker thread while its own thread runs the model, never both on one matcher)."""

    def __init__(self, grammar: Grammar):
        self.grammar = grammar
        self._matcher = _llguidance().LLMatcher(ll_tokenizer(), grammar.text, log_level=0)
        self._check()

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into row `row` of `bitmask` ((B, W) int32, see `new_bitmask`)."""
        # as llguidance.torch.fill_next_token_bitmask, whose module imports torch.compile (~10 s)
        words = bitmask[row]
        if bitmask.dtype != torch.int32 or not words.is_contiguous() or words.device.type != "cpu":
            raise GptforgeError("the grammar bitmask must be a contiguous int32 CPU tensor (see new_bitmask)")
        self._matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)

    def accept(self, token: int) -> None:
        """Follow the picked token (one the mask allowed); a GptforgeError if the grammar refuses it."""
        self._matcher.consume_token(token)
        self._check()

    @property
    def finished(self) -> bool:
        """Whether the grammar is complete and allows nothing more (only the end of text)."""
        return self._matcher.is_stopped()

    def _check(self) -> None:
        if self._matcher.is_error():
            raise GptforgeError(f"the {self.grammar.kind} grammar failed: {_first_line(self._matcher.get_error())}")


def new_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """A (rows, ceil(vocab_size / 32)) int32 bitmask: bit j of word w allows token 32 w + j."""
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, W) int32 bitmask -> (B, vocab_size) bool, True where a token is allowed."""
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=-1, bitorder="little")  # (B, 32 W), little-endian words
    return torch.from_numpy(bits[:, :vocab_size].view(np.bool_))


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits (B, V) with every token the bitmask forbids set to -inf (a new tensor); a vocabulary
    wider than the mask (a padded one) has its extra ids forbidden too."""
    allowed = allowed_tokens(bitmask, logits.shape[-1])
    if allowed.shape[-1] < logits.shape[-1]:
        allowed = torch.nn.functional.pad(allowed, (0, logits.shape[-1] - allowed.shape[-1]), value=False)
    if logits.device.type == "cpu" and logits.dtype == torch.float32:  # numpy: ~5x less overhead per call here
        return torch.from_numpy(np.where(allowed.numpy(), logits.numpy(), np.float32(-np.inf)))
    return logits.masked_fill(~allowed.to(logits.device), float("-inf"))
