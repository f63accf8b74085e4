"""The seed's greedy loop against the book's own generate_text_simple."""

import pytest
import torch

from gptforge import GPTModel, generate_text, generate_text_simple, get_tokenizer


@pytest.fixture
def model(tiny_config):
    torch.manual_seed(0)
    return GPTModel(tiny_config(context_length=8)).eval()


def test_equals_the_books_loop_including_past_the_context(book, model):
    idx = torch.randint(0, 97, (3, 5))  # a batch of equal-length prompts
    ours = generate_text_simple(model, idx, max_new_tokens=20, context_size=8)  # runs 17 past context
    theirs = book.generate_text_simple(model, idx, max_new_tokens=20, context_size=8)
    assert ours.shape == (3, 25)
    assert torch.equal(ours, theirs)
    for row in range(3):  # batching does not change any row
        alone = generate_text_simple(model, idx[row:row + 1], max_new_tokens=20, context_size=8)
        assert torch.equal(alone[0], ours[row])


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"max_new_tokens": 1.5}, "max_new_tokens"),
    ({"context_size": 0}, "context_size"),
    ({"idx": torch.zeros(0, 3, dtype=torch.long)}, "shape"),
    ({"idx": torch.zeros(2, 3)}, "dtype"),
    ({"idx": torch.zeros(3, dtype=torch.long)}, "shape"),
    ({"idx": [[1, 2]]}, "torch.Tensor"),
    ({"idx": torch.tensor([[1, 97]])}, r"token ids must lie in \[0, 97\)"),  # was an IndexError from the embedding
    ({"idx": torch.tensor([[-1, 2]])}, r"token ids must lie in \[0, 97\)"),
])
def test_invalid_arguments_raise_value_error(model, kwargs, message):
    args = {"idx": torch.zeros(1, 3, dtype=torch.long), "max_new_tokens": 2, "context_size": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate_text_simple(model, **args)


def test_text_helper_and_empty_prompt(tiny_config):
    torch.manual_seed(0)
    model = GPTModel(tiny_config(vocab_size=50257, context_length=8))
    model.train()
    text = generate_text(model, "", max_new_tokens=3, stop_token_ids=[])
    model.eval()
    from_eot = generate_text_simple(model, torch.tensor([[50256]]), max_new_tokens=3, context_size=8)
    model.train()
    # An empty prompt starts from <|endoftext|>; the text is the continuation of it.
    assert text == get_tokenizer().decode(from_eot[0, 1:].tolist())
    assert model.training  # the helper restores the mode it found
