"""LoRA against the book's appendix E (llms_from_scratch.appendix_e): same outputs on the same
weights and A/B matrices, same trainable parameter counts, merging that keeps the outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from gptforge.errors import GptforgeError
from gptforge.lora import LinearWithLoRA, apply_lora, count_trainable, lora_layers, merge_lora
from gptforge.model import GPTModel

appendix_e = pytest.importorskip("llms_from_scratch.appendix_e")
ch04 = pytest.importorskip("llms_from_scratch.ch04")


def _book_and_ours(cfg: dict, num_classes: int | None = None) -> tuple[nn.Module, GPTModel]:
    """The book's GPTModel and ours with the same weights (ours gets the book's state dict)."""
    torch.manual_seed(0)
    book = ch04.GPTModel(cfg)
    ours = GPTModel(cfg)
    if num_classes is not None:  # the book's chapter-6 head, before LoRA as in appendix E
        torch.manual_seed(1)
        book.out_head = nn.Linear(cfg["emb_dim"], num_classes)
        ours.out_head = nn.Linear(cfg["emb_dim"], num_classes)
    state = {k: v for k, v in book.state_dict().items() if not k.endswith(".att.mask")}
    ours.load_state_dict(state)
    return book.eval(), ours.eval()


def _randomise_b(book: nn.Module, ours: nn.Module) -> None:
    """Give both models the same non-zero B matrices (fresh ones are zeros: outputs would not move)."""
    g = torch.Generator().manual_seed(5)
    ours_layers = lora_layers(ours)
    for name, module in book.named_modules():
        if isinstance(module, appendix_e.LinearWithLoRA):
            b = torch.randn(module.lora.B.shape, generator=g) * 0.05
            with torch.no_grad():
                module.lora.B.copy_(b)
                ours_layers[name].lora.B.copy_(b)


@pytest.mark.parametrize("num_classes", [None, 2])
def test_outputs_equal_the_books_replace_linear_with_lora(tiny_config, num_classes):
    cfg = tiny_config(qkv_bias=False)
    book, ours = _book_and_ours(cfg, num_classes)
    for p in book.parameters():
        p.requires_grad = False
    torch.manual_seed(123)
    appendix_e.replace_linear_with_lora(book, rank=4, alpha=8)
    torch.manual_seed(123)
    wrapped = apply_lora(ours, rank=4, alpha=8)
    assert len(wrapped) == 6 * cfg["n_layers"] + 1  # every Linear, the output head too
    for name, module in book.named_modules():  # same seed, same order: the same A matrices
        if isinstance(module, appendix_e.LinearWithLoRA):
            assert torch.equal(module.lora.A, lora_layers(ours)[name].lora.A)
    _randomise_b(book, ours)
    x = torch.randint(0, cfg["vocab_size"], (3, cfg["context_length"]))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), book(x), atol=1e-5, rtol=0)
    assert count_trainable(ours)[0] == sum(p.numel() for p in book.parameters() if p.requires_grad)


def test_trainable_count_equals_the_books_for_124m_rank_16():
    """Appendix E: GPT_CONFIG_124M with a 2-class head, all frozen, LoRA rank 16 everywhere."""
    cfg = {"vocab_size": 50257, "context_length": 1024, "emb_dim": 768, "n_heads": 12,
           "n_layers": 12, "drop_rate": 0.0, "qkv_bias": True}
    with torch.device("meta"):  # shapes only: two 124M models cost nothing
        book = ch04.GPTModel(cfg)
        book.out_head = nn.Linear(768, 2)
        for p in book.parameters():
            p.requires_grad = False
        appendix_e.replace_linear_with_lora(book, rank=16, alpha=16)
        ours = GPTModel(cfg)
        ours.out_head = nn.Linear(768, 2)
        apply_lora(ours, rank=16, alpha=16)
    book_trainable = sum(p.numel() for p in book.parameters() if p.requires_grad)
    assert book_trainable == 2_666_528  # the figure printed in appendix E
    assert count_trainable(ours)[0] == book_trainable


def test_merge_keeps_outputs_and_removes_adapters(tiny_config):
    cfg = tiny_config()
    torch.manual_seed(0)
    model = GPTModel(cfg).eval()
    apply_lora(model, rank=2, alpha=3, scaling="peft")
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora.B, std=0.1)
    x = torch.randint(0, cfg["vocab_size"], (2, 9))
    with torch.no_grad():
        before = model(x)
        merge_lora(model)
        after = model(x)
    assert not lora_layers(model)
    assert all(type(m) is not LinearWithLoRA for m in model.modules())
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


def test_peft_scaling_is_alpha_over_rank(tiny_config):
    torch.manual_seed(0)
    lin = nn.Linear(8, 5)
    book_style, peft_style = LinearWithLoRA(lin, 4, 2.0, "book"), LinearWithLoRA(lin, 4, 8.0, "peft")
    with torch.no_grad():
        peft_style.lora.A.copy_(book_style.lora.A)
        nn.init.normal_(book_style.lora.B)
        peft_style.lora.B.copy_(book_style.lora.B)
    x = torch.randn(3, 8)
    manual = lin(x) + 2.0 * (x @ book_style.lora.A @ book_style.lora.B)  # 8 / 4 = 2
    torch.testing.assert_close(peft_style(x), manual)
    torch.testing.assert_close(book_style(x), manual)


def test_targets_choose_layers_and_training_loss_sees_the_adapter(tiny_config):
    cfg = tiny_config()
    model = GPTModel(cfg)
    wrapped = apply_lora(model, rank=2, alpha=1, targets="W_query,W_value")
    assert wrapped == [f"trf_blocks.{i}.att.{n}" for i in range(cfg["n_layers"]) for n in ("W_query", "W_value")]
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".lora." not in n)
    model = GPTModel(cfg)
    apply_lora(model, rank=2, alpha=1, targets="out_head")
    nn.init.normal_(model.out_head.lora.B)
    x = torch.randint(0, cfg["vocab_size"], (2, 6))
    y = torch.randint(0, cfg["vocab_size"], (2, 6))
    expected = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
    torch.testing.assert_close(model(x, targets=y), expected)  # the fused loss must not skip LoRA
    with pytest.raises(GptforgeError, match="names no Linear"):
        apply_lora(GPTModel(cfg), rank=2, alpha=1, targets="W_q")
    with pytest.raises(GptforgeError, match="lora-rank"):
        apply_lora(GPTModel(cfg), rank=0, alpha=1)


def test_generation_fast_paths_see_the_adapters(tiny_config):
    """generate_text decodes through the fast inference layout (fused qkv): it must include LoRA."""
    import copy

    from gptforge.generation import generate_text, generate_text_simple
    from gptforge.fast import prepare_for_inference
    from gptforge.tokenizer import get_tokenizer

    cfg = tiny_config(vocab_size=50257, context_length=32)
    torch.manual_seed(0)
    model = GPTModel(cfg).eval()
    apply_lora(model, rank=2, alpha=8)
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora.B, std=0.5)
    tok = get_tokenizer()
    ids = torch.tensor([tok.encode("Hello, I am")])
    expected = tok.decode(generate_text_simple(model, ids, max_new_tokens=12, context_size=32)[0].tolist())
    base_only = copy.deepcopy(model)
    for layer in lora_layers(base_only).values():
        nn.init.zeros_(layer.lora.B)
    assert tok.decode(generate_text_simple(base_only, ids, 12, 32)[0].tolist()) != expected  # adapters matter
    assert generate_text(model, "Hello, I am", 12, stop_token_ids=()) == expected
    prepare_for_inference(model)
    assert not lora_layers(model)
    assert tok.decode(generate_text_simple(model, ids, 12, 32)[0].tolist()) == expected


def test_merging_draws_nothing_from_the_global_rng(tiny_config):
    """generate() merges adapters into its fast view; a training run's batch order and dropout
    depend on the global RNG, so merging must not draw from it."""
    from gptforge import GPTModel
    from gptforge.lora import apply_lora, merge_lora

    torch.manual_seed(0)
    model = GPTModel(tiny_config())
    apply_lora(model, 2, 16.0)
    state = torch.get_rng_state()
    merge_lora(model)
    assert torch.equal(torch.get_rng_state(), state)
