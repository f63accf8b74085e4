"""Instruction data, the book's way (llms-from-scratch, chapter 7): Alpaca-style records, the
prompt template, batching with the book's collate semantics, and responses to a test split.

A record is `{"instruction": str, "input": str (optional), "output": str}`; a file holds a JSON
list of them or one per line (JSONL). Each record becomes one training text,

    Below is an instruction that describes a task. Write a response that appropriately completes the request.

    ### Instruction:
    {instruction}

    ### Input:            <- only when input is not empty
    {input}

    ### Response:
    {output}

and a batch is padded with <|endoftext|> (50256) exactly as the book's `custom_collate_fn` does:
the first end token of each row stays a target (the model learns to stop), the rest of the padding
is ignored (-100). `mask_prompt` also ignores the prompt's tokens, as the book's exercise 7.2 does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .config import PromptTemplate
from .errors import GptforgeError
from .generation import generate_text
from .tables import read_table
from .tokenizer import ENDOFTEXT, ENDOFTEXT_ID, Tokenizer, as_tokenizer

IGNORE_INDEX = -100  # torch's cross_entropy default ignore_index, as the book uses it
RESPONSE_KEY = "model_response"  # the field the book writes generated responses to


ALPACA = PromptTemplate()


def format_input(entry: Mapping[str, str], template: PromptTemplate = ALPACA) -> str:
    """The book's `format_input(entry)`: preamble, instruction and (when not empty) input."""
    return template.format_input(entry["instruction"], entry.get("input") or "")


def training_text(entry: Mapping[str, str], template: PromptTemplate = ALPACA) -> str:
    """Prompt + output: the text the book's `InstructionDataset` tokenizes for one record."""
    return format_input(entry, template) + template.response + entry["output"]


# --------------------------------------------------------------------------- reading records

def check_records(records: Sequence[Any], source: str = "data") -> list[dict[str, str]]:
    """Records with string `instruction` and `output` (and optional string `input`, default "");
    extra keys are kept. Raises GptforgeError naming the first bad record (1-based)."""
    if not records:
        raise GptforgeError(f"{source} holds no records")
    out = []
    for n, rec in enumerate(records, 1):
        if not isinstance(rec, Mapping):
            raise GptforgeError(f"{source} record {n} is a {type(rec).__name__}, expected an object with named fields")
        for key in ("instruction", "output"):
            if not isinstance(rec.get(key), str):
                raise GptforgeError(f"{source} record {n} has no {key!r} string; every record needs "
                                    f"'instruction' and 'output' ('input' is optional)")
        if not isinstance(rec.get("input", ""), (str, type(None))):
            raise GptforgeError(f"{source} record {n}: 'input' must be a string")
        out.append({**rec, "input": rec.get("input") or ""})
    return out


def read_records(path: str | Path) -> list[dict[str, str]]:
    """Alpaca-style records (see `check_records`) from a file `tables.read_table` reads: a JSON list
    or JSONL whatever the suffix (the content tells which), or a .csv/.tsv with those columns."""
    return check_records(read_table(path, other_suffixes_as_json=True), str(path))


# --------------------------------------------------------------------------- batching

def collate(items: Sequence[Sequence[int]], prompt_lengths: Sequence[int] | None = None, *,
            pad_token_id: int = ENDOFTEXT_ID, ignore_index: int = IGNORE_INDEX,
            allowed_max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The book's `custom_collate_fn`: token lists -> (inputs, targets), each (B, T) int64 with
    T = min(longest item, allowed_max_length). Every item gets an end token and is right-padded
    with `pad_token_id`; in the targets (inputs shifted by one) the first pad of a row is kept and
    the later ones become `ignore_index`. With `prompt_lengths`, row r's targets before position
    prompt_lengths[r] - 1 are ignored too (the prompt is left out of the loss)."""
    if not items:
        raise GptforgeError("collate needs at least one item")
    width = max(len(item) for item in items) + 1
    padded = torch.full((len(items), width), pad_token_id, dtype=torch.int64)
    for row, item in enumerate(items):
        padded[row, :len(item)] = torch.as_tensor(list(item), dtype=torch.int64)
    inputs, targets = padded[:, :-1], padded[:, 1:].clone()
    is_pad = targets == pad_token_id
    targets[is_pad & (is_pad.cumsum(dim=1) > 1)] = ignore_index  # all but each row's first pad
    for row, length in enumerate(prompt_lengths or ()):
        targets[row, :max(length - 1, 0)] = ignore_index
    if allowed_max_length is not None:
        inputs, targets = inputs[:, :allowed_max_length], targets[:, :allowed_max_length]
    return inputs.contiguous(), targets.contiguous()


class InstructionData:
    """Tokenized records ready for batching: `batch(indices)` -> (inputs, targets) as `collate`.

    records: checked records (`read_records` / `check_records`).
    context_length: the model's; a text longer than it is an error unless `max_length` truncates.
    max_length: the book's `allowed_max_length` (at most context_length).
    mask_prompt: ignore the prompt's tokens in the loss (the book's exercise 7.2: the targets of
        the instruction and input are ignored, the `### Response:` header stays).
    """

    def __init__(self, records: Sequence[Mapping[str, str]], context_length: int, *,
                 max_length: int | None = None, mask_prompt: bool = False,
                 template: PromptTemplate = ALPACA, tokenizer: Tokenizer | None = None, source: str = "data"):
        tokenizer = as_tokenizer(tokenizer)
        if max_length is not None and not 1 <= max_length <= context_length:
            raise GptforgeError(f"--max-length {max_length} must be between 1 and the model's context length "
                                f"{context_length}")
        self.records = list(records)
        self.ids = [tokenizer.encode(training_text(r, template)) for r in self.records]
        self.prompt_lengths = ([len(tokenizer.encode(format_input(r, template))) for r in self.records]
                               if mask_prompt else None)
        self.max_length = max_length
        if max_length is None:
            longest = max(range(len(self.ids)), key=lambda i: len(self.ids[i]))
            if len(self.ids[longest]) > context_length:
                raise GptforgeError(
                    f"{source} record {longest + 1} is {len(self.ids[longest])} tokens, longer than the "
                    f"model's context of {context_length}; pass --max-length N (<= {context_length}) to "
                    f"truncate, or shorten the record")

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of the given records, each (len(indices), T) int64."""
        lengths = None if self.prompt_lengths is None else [self.prompt_lengths[i] for i in indices]
        return collate([self.ids[i] for i in indices], lengths, allowed_max_length=self.max_length)

    def num_tokens(self, indices: Iterable[int]) -> int:
        """Target tokens that count in the loss for these records (for tokens/s)."""
        return int((self.batch(list(indices))[1] != IGNORE_INDEX).sum())


# --------------------------------------------------------------------------- responses

def respond(model: nn.Module, records: Sequence[Mapping[str, str]], *, template: PromptTemplate = ALPACA,
            max_new_tokens: int = 256, batch_size: int = 8, tokenizer: Tokenizer | None = None) -> list[str]:
    """Greedy responses to the records' instructions (their `output` is not used): each stops at the
    end token or the template's next section (`###`) and is stripped of surrounding whitespace, as
    the book's `response_text` is. Prompts longer than the context see its last tokens."""
    tokenizer = as_tokenizer(tokenizer)
    prompts = [template.prompt(r["instruction"], r.get("input") or "") for r in records]
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        texts = generate_text(model, chunk, max_new_tokens, tokenizer=tokenizer, stop_strings=template.stop,
                              stop_token_ids=(ENDOFTEXT_ID,))
        texts = [texts] if isinstance(texts, str) else texts
        out += [t[len(p):].replace(ENDOFTEXT, "").strip() for p, t in zip(chunk, texts)]
    return out


def with_responses(records: Sequence[Mapping[str, str]], responses: Sequence[str],
                   key: str = RESPONSE_KEY) -> list[dict[str, str]]:
    """The records, each with its response under `key` (the book's `model_response`)."""
    return [{**r, key: text} for r, text in zip(records, responses, strict=True)]


# --------------------------------------------------------------------------- chat

def _content(message: Mapping[str, Any], n: int) -> str:
    content = message.get("content")
    if isinstance(content, list):  # OpenAI's content parts: only text ones here
        if not all(isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise GptforgeError(f"messages[{n}]: only text content parts are supported")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise GptforgeError(f"messages[{n}].content must be a string")
    return content


def chat_prompt(messages: Sequence[Mapping[str, Any]], template: PromptTemplate = ALPACA) -> str:
    """OpenAI chat messages -> one prompt in `template`'s format, ending where the response starts.

    Each user message is an instruction; an assistant message is the response to the user message
    before it, and a finished exchange ends with <|endoftext|>, as every training text did. A first
    system (or developer) message replaces the template's preamble. The last message must be the
    user's; roles must alternate user/assistant."""
    if not isinstance(messages, Sequence) or not messages:
        raise GptforgeError("messages must be a non-empty list")
    if not all(isinstance(m, Mapping) for m in messages):
        raise GptforgeError("each message must be an object with 'role' and 'content'")
    preamble, turns = template.preamble, list(enumerate(messages))
    if turns[0][1].get("role") in ("system", "developer"):
        preamble, turns = _content(turns[0][1], 0), turns[1:]
    template = dataclasses.replace(template, preamble=preamble)
    text, expect = "", "user"
    for n, message in turns:
        role = message.get("role")
        if role != expect:
            raise GptforgeError(f"messages[{n}] has role {role!r}; after an optional first system message, "
                                f"roles alternate user, assistant, ... and end with user")
        if role == "user":
            text += template.prompt(_content(message, n))
        else:
            text += _content(message, n) + ENDOFTEXT
        expect = "assistant" if role == "user" else "user"
    if expect != "assistant":
        raise GptforgeError("the last message must be the user's (the model answers it)")
    return text
