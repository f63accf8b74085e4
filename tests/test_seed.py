"""The seed's figures, reproduced exactly (SEED.md)."""

import torch

from conftest import GPT_CONFIG_124M, SEED_IDS, SEED_TEXT
from gptforge import GPTModel, count_parameters, generate_text, generate_text_simple, get_tokenizer


def test_seed_figures_with_the_books_dict():
    torch.manual_seed(123)
    model = GPTModel(GPT_CONFIG_124M)
    model.eval()

    assert sum(p.numel() for p in model.parameters()) == 163_009_536
    assert model.num_parameters() == 163_009_536
    out_head = sum(p.numel() for p in model.out_head.parameters())
    assert tuple(model.out_head.weight.shape) == tuple(model.tok_emb.weight.shape) == (50257, 768)
    assert model.num_parameters() - out_head == 124_412_160 == model.num_parameters(exclude_head=True)
    counts = count_parameters(GPT_CONFIG_124M)
    assert (counts.total, counts.total_head_once) == (163_009_536, 124_412_160)

    tokenizer = get_tokenizer()
    encoded = tokenizer.encode("Hello, I am")
    assert encoded == SEED_IDS[:4]
    out = generate_text_simple(model, torch.tensor([encoded]), max_new_tokens=6,
                               context_size=GPT_CONFIG_124M["context_length"])
    assert out.tolist() == [SEED_IDS]
    assert tokenizer.decode(out[0].tolist()) == SEED_TEXT
    assert generate_text(model, "Hello, I am", max_new_tokens=6) == SEED_TEXT


def test_same_initial_weights_as_the_books_model(book):
    """Construction order and initialisers are the book's: the same seed gives the same tensors."""
    torch.manual_seed(123)
    ours = GPTModel(GPT_CONFIG_124M).state_dict()
    torch.manual_seed(123)
    theirs = book.GPTModel(GPT_CONFIG_124M).state_dict()
    theirs = {k: v for k, v in theirs.items() if not k.endswith(".att.mask")}
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
