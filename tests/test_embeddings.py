"""`gptforge.embed`: the mean of the final-norm states over each input's tokens, unit length,
checked against transformers' GPT2Model on the Hugging Face export of the same weights; batching
(right padding, mixed lengths) changes nothing; bad inputs are one clear GptforgeError."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gptforge
from gptforge import GPTModel, embed
from gptforge.classifier import to_classifier
from gptforge.errors import GptforgeError
from gptforge.tokenizer import get_tokenizer

TEXTS = ["Hello, I am a language model", "The quick brown fox jumps over the lazy dog.", "A",
         "Every effort moves you", "import torch\nprint(torch.__version__)"]


@pytest.fixture(scope="module")
def model(tiny_config) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(tiny_config(vocab_size=50257, context_length=64, emb_dim=64)).eval()


def hf_vectors(model: GPTModel, tmp_path, rows: list[list[int]], pooling: str = "mean") -> torch.Tensor:
    """The same vectors from transformers: GPT2Model's last_hidden_state (after ln_f) of each input
    alone, pooled, L2-normalised."""
    transformers = pytest.importorskip("transformers")
    out = gptforge.save(model, tmp_path / "hf", format="hf")
    hf = transformers.GPT2Model.from_pretrained(out, attn_implementation="eager").eval()
    vectors = []
    with torch.no_grad():
        for ids in rows:
            states = hf(torch.tensor([ids])).last_hidden_state[0]  # (T, d)
            vectors.append(states.mean(0) if pooling == "mean" else states[-1])
    return F.normalize(torch.stack(vectors), dim=-1)


def test_vectors_equal_transformers_on_the_hf_export(model, tmp_path):
    rows = get_tokenizer().encode_batch(TEXTS)
    ours = embed(model, TEXTS, batch_size=3)  # batches of mixed lengths, right-padded
    assert ours.shape == (len(TEXTS), 64) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, hf_vectors(model, tmp_path, rows), atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(len(TEXTS)))
    last = embed(model, TEXTS, pooling="last", batch_size=2)
    torch.testing.assert_close(last, hf_vectors(model, tmp_path, rows, "last"), atol=1e-4, rtol=0)


def test_token_ids_batches_and_raw_vectors(model):
    rows = get_tokenizer().encode_batch(TEXTS)
    alone = torch.cat([embed(model, text) for text in TEXTS])
    torch.testing.assert_close(embed(model, rows, batch_size=16), alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(embed(model, rows[1]), alone[1:2], atol=1e-5, rtol=0)  # one input as ids
    raw = embed(model, TEXTS[:2], normalize=False)
    with torch.no_grad():
        states = model.hidden_states(torch.tensor([rows[0]]))[0]
    torch.testing.assert_close(raw[0], states.mean(0), atol=1e-5, rtol=1e-5)
    # A classifier's trunk embeds as the language model it was made from.
    clf = to_classifier(GPTModel(model.cfg), ["a", "b"])
    clf.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("out_head")}, strict=False)
    torch.testing.assert_close(embed(clf.eval(), TEXTS[:2]), alone[:2], atol=1e-5, rtol=0)


@pytest.mark.parametrize("inputs, message", [
    ([], "must not be empty"),
    ("", "empty text"),
    (["fine", ""], "input 1 is an empty text"),
    ([[]], "input 0 is an empty list"),
    ([1, 2, 60000], "outside the vocabulary"),
    ([["a"]], "input 0 must be a string or a list of token ids"),
    (b"bytes", "input must be a string"),
    (" ".join(["word"] * 70), "input 0 has 70 tokens, more than the model's context of 64"),
])
def test_bad_inputs_are_clear_errors(model, inputs, message):
    with pytest.raises(GptforgeError, match=message):
        embed(model, inputs)


def test_bad_options_are_clear_errors(model):
    with pytest.raises(GptforgeError, match="pooling must be one of mean, last"):
        embed(model, "hi", pooling="max")
    with pytest.raises(GptforgeError, match="batch_size"):
        embed(model, "hi", batch_size=0)
    with pytest.raises(GptforgeError, match="expected a GPTModel"):
        embed(torch.nn.Linear(2, 2), "hi")
