"""The book's state dicts (checkpoint/book.py), checked against the book's own GPTModel, and pickles
read weights-only."""

from __future__ import annotations

import os

import pytest
import torch

import gptforge

ATOL = 1e-5


def _book_model(book, cfg, seed=123):
    torch.manual_seed(seed)
    return book.GPTModel(cfg).eval()


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_book_state_dict_gives_the_books_logits(book, tmp_path, qkv_bias, tiny_config):
    cfg = tiny_config(qkv_bias=qkv_bias)
    ref = _book_model(book, cfg)
    assert any(k.endswith("att.mask") for k in ref.state_dict())  # the book saves its mask buffers
    torch.save(ref.state_dict(), tmp_path / "model.pth")
    model = gptforge.load(tmp_path / "model.pth", config=cfg)
    assert model.cfg.qkv_bias == qkv_bias and not model.cfg.tie_weights
    ids = torch.randint(0, cfg["vocab_size"], (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids), rtol=0, atol=ATOL)


def test_book_chapter5_checkpoint_and_inferred_heads(book, tmp_path, tiny_config):
    # GPT-2 small's width: n_heads (12) is inferred; the book's ch05 saves model + optimizer.
    cfg = tiny_config(emb_dim=768, n_heads=12, n_layers=1, context_length=8, qkv_bias=False)
    ref = _book_model(book, cfg)
    opt = torch.optim.AdamW(ref.parameters())
    torch.save({"model_state_dict": ref.state_dict(), "optimizer_state_dict": opt.state_dict()},
               tmp_path / "model_and_optimizer.pth")
    model = gptforge.load(tmp_path / "model_and_optimizer.pth")
    assert model.cfg.n_heads == 12 and model.cfg.context_length == 8
    ids = torch.randint(0, cfg["vocab_size"], (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids), rtol=0, atol=ATOL)


def test_book_state_dict_errors(book, tmp_path, tiny_config):
    cfg = tiny_config()
    torch.save(_book_model(book, cfg).state_dict(), tmp_path / "model.pth")
    with pytest.raises(ValueError, match="width 32 does not say its number of heads; pass config="):
        gptforge.load(tmp_path / "model.pth")
    with pytest.raises(ValueError, match="n_layers is 2 in the file, 3 in the config"):
        gptforge.load(tmp_path / "model.pth", config=tiny_config(n_layers=3))
    with pytest.raises(ValueError, match="vocab_size is 97 in the file, 100 in the config"):
        gptforge.load(tmp_path / "model.pth", config=tiny_config(vocab_size=100))
    (tmp_path / "cut.pth").write_bytes((tmp_path / "model.pth").read_bytes()[:2000])
    with pytest.raises(ValueError, match="cannot be read as a PyTorch state dict"):
        gptforge.load(tmp_path / "cut.pth", config=cfg)


class Payload:  # a pickled object that full unpickling would construct: refused
    def __reduce__(self):
        return (os.system, ("echo unpickled > /dev/null",))


def test_pickles_are_read_weights_only(tmp_path):
    torch.save({"tok_emb.weight": torch.zeros(2, 2), "evil": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="weights-only"):
        gptforge.load(tmp_path / "evil.pth")


def test_own_state_dict_with_tied_head_stays_tied(tmp_path, tiny_config):
    torch.manual_seed(0)
    model = gptforge.GPTModel(gptforge.GPTConfig(**tiny_config(emb_dim=768, n_heads=12, n_layers=1),
                                                 tie_weights=True)).eval()
    torch.save(model.state_dict(), tmp_path / "m.pth")  # torch.save keeps the shared storage
    back = gptforge.load(tmp_path / "m.pth")
    assert back.cfg.tie_weights and back.out_head.weight is back.tok_emb.weight
