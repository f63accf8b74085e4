"""The model's parts against the book's (llms-from-scratch) and counting against transformers."""

import math

import pytest
import torch

from gptforge import GPTConfig, GPTModel, count_parameters
from gptforge.model import GELU, KVCache, LayerNorm, MultiHeadAttention


def _book_model_with_our_weights(book, cfg, ours):
    theirs = book.GPTModel(cfg)
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all(k.endswith(".att.mask") for k in missing)
    return theirs.eval()


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_same_weights_same_logits_as_the_books_model(tiny_config, book, qkv_bias):
    cfg = tiny_config(qkv_bias=qkv_bias, vocab_size=50257, context_length=32)
    torch.manual_seed(0)
    ours = GPTModel(cfg).eval()
    theirs = _book_model_with_our_weights(book, cfg, ours)
    idx = torch.randint(0, cfg["vocab_size"], (3, 32))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), theirs(idx), rtol=1e-5, atol=1e-5)


def test_sdpa_attention_equals_the_books_masked_softmax():
    ch03 = pytest.importorskip("llms_from_scratch.ch03")
    torch.manual_seed(1)
    ours = MultiHeadAttention(d_in=48, d_out=48, context_length=20, dropout=0.0, num_heads=6, qkv_bias=True)
    theirs = ch03.MultiHeadAttention(d_in=48, d_out=48, context_length=20, dropout=0.0, num_heads=6, qkv_bias=True)
    theirs.load_state_dict(ours.state_dict(), strict=False)
    x = torch.randn(2, 20, 48)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


def test_gelu_and_layernorm_are_the_books(book):
    x = torch.randn(4, 10, 32) * 3
    torch.testing.assert_close(GELU()(x), book.GELU()(x), rtol=1e-5, atol=1e-6)
    ours, theirs = LayerNorm(32), book.LayerNorm(32)
    with torch.no_grad():
        ours.scale.normal_(), ours.shift.normal_()
    theirs.load_state_dict(ours.state_dict())
    assert ours.eps == theirs.eps == 1e-5
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_dropout_only_in_training_mode(tiny_config):
    torch.manual_seed(0)
    model = GPTModel(tiny_config(drop_rate=0.5))
    idx = torch.randint(0, 97, (2, 16))
    model.train()
    assert not torch.equal(model(idx), model(idx))
    model.eval()
    assert torch.equal(model(idx), model(idx))


def test_weight_tying_shares_one_tensor_and_one_gradient(tiny_config):
    model = GPTModel(tiny_config(tie_weights=True))
    assert model.out_head.weight is model.tok_emb.weight
    assert model.out_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    untied = GPTModel(tiny_config(tie_weights=False))
    assert model.num_parameters() == untied.num_parameters() - 97 * 32
    model(torch.randint(0, 97, (2, 16))).sum().backward()
    grads = [p for p in model.parameters() if p.shape == (97, 32)]
    assert len(grads) == 1 and grads[0].grad is not None
    # The one gradient includes the head's contribution: rows of unseen tokens still get gradient.
    assert model.tok_emb.weight.grad.abs().sum(dim=1).gt(0).all()


def test_gpt2_initialisation_is_a_separate_option(tiny_config):
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=5000, emb_dim=128, n_heads=4, n_layers=8, init="gpt2")
    model = GPTModel(cfg)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.trf_blocks[0].att.W_query.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual = 0.02 / math.sqrt(2 * 8)
    assert model.trf_blocks[0].att.out_proj.weight.std().item() == pytest.approx(residual, rel=0.1)
    assert model.trf_blocks[0].ff.layers[2].weight.std().item() == pytest.approx(residual, rel=0.1)
    assert model.trf_blocks[0].ff.layers[0].bias.abs().max().item() == 0.0
    # The default is PyTorch's initialisers: the embedding is N(0, 1).
    torch.manual_seed(0)
    assert GPTModel({**cfg, "init": "torch"}).tok_emb.weight.std().item() == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("changes", [
    {}, {"qkv_bias": False}, {"tie_weights": True}, {"n_layers": 3, "emb_dim": 48, "n_heads": 3},
])
def test_counting_without_building_equals_the_built_model(tiny_config, changes):
    cfg = GPTConfig.from_dict(tiny_config(**changes))
    counts = count_parameters(cfg)
    model = GPTModel(cfg)
    assert counts.total == model.num_parameters()
    assert counts.total_head_once == model.num_parameters(exclude_head=True)
    by_part = {
        "embeddings": [model.tok_emb, model.pos_emb],
        "attention": [b.att for b in model.trf_blocks],
        "feed_forward": [b.ff for b in model.trf_blocks],
        "norms": [m for b in model.trf_blocks for m in (b.norm1, b.norm2)] + [model.final_norm],
    }
    for part, modules in by_part.items():
        assert getattr(counts, part) == sum(p.numel() for m in modules for p in m.parameters()), part
    assert counts.weight_bytes(torch.bfloat16) * 2 == counts.weight_bytes(torch.float32) == 4 * counts.total


def test_preset_counts_match_transformers():
    transformers = pytest.importorskip("transformers")
    shapes = {"gpt2-124m": (768, 12, 12), "gpt2-355m": (1024, 24, 16),
              "gpt2-774m": (1280, 36, 20), "gpt2-1558m": (1600, 48, 25)}
    for name, (d, layers, heads) in shapes.items():
        with torch.device("meta"):
            hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=d, n_layer=layers, n_head=heads))
        assert count_parameters(name).total == hf.num_parameters(), name
    assert count_parameters("gpt2-124m").total == 124_439_808  # the published "124M"


def test_kv_cache_and_left_padding_give_the_full_forward_logits(tiny_config):
    torch.manual_seed(0)
    model = GPTModel(tiny_config()).eval()
    idx = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(batch_size=2)
        steps = [model(idx[:, :5], cache=cache)] + [model(idx[:, t:t + 1], cache=cache) for t in range(5, 12)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
        # Row 0 left-padded by 3: positions from the mask, padding masked out.
        padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), idx[:1, :9]], dim=1)
        mask = torch.tensor([[0, 0, 0] + [1] * 9])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(padded, positions=positions, attention_mask=mask)
        torch.testing.assert_close(out[:, 3:], full[:1, :9], rtol=1e-5, atol=1e-5)


def test_q8_0_cache_rows_are_llama_cpps_q8_0_blocks():
    """q8_0_rows (a KV_Q8_0 cache's rows) against the `gguf` package's Q8_0 quantizer (a bit-exact
    port of llama.cpp's): the same int8 values and fp16 scales, laid out as the hs values then the
    hs / 32 scales; exact halves round to even (as llama.cpp's x86 SIMD quantizer and the kernels),
    where gguf's port rounds away from zero. q8_0_floats reads back q * d."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    from gptforge.model import q8_0_floats, q8_0_rows

    torch.manual_seed(0)
    x = torch.randn(3, 5, 64) * torch.rand(3, 5, 1) * 10
    x[0, 0, :32] = 0.0  # a zero block: d = 0
    x[0, 1, :32] = torch.arange(32) - 15.5  # halves: max 16.5 -> x / d with many ties
    x[0, 1, 0] = 127.0
    rows = q8_0_rows(x)
    assert rows.shape == (3, 5, 68) and rows.dtype == torch.uint8
    blocks = quantize(x.reshape(-1, 64).numpy(), GGMLQuantizationType.Q8_0).reshape(-1, 2, 34)  # (rows, 2 blocks, d + 32 q)
    d = torch.from_numpy(blocks[..., :2].copy().view(np.float16)).reshape(3, 5, 2)
    q = torch.from_numpy(blocks[..., 2:].copy().view(np.int8)).reshape(3, 5, 64)
    scaled = x.unflatten(-1, (2, 32)) * torch.where(d.float() > 0, 1 / (x.unflatten(-1, (2, 32)).abs().amax(-1) / 127), 0)[..., None]
    ties = ((scaled - scaled.trunc()).abs() == 0.5).flatten(-2)
    assert ties.any()
    q = torch.where(ties, scaled.flatten(-2).round().to(torch.int8), q)
    assert torch.equal(rows[..., :64].view(torch.int8), q)
    assert torch.equal(rows[..., 64:].view(torch.float16), d)
    expected = (q.float().unflatten(-1, (2, 32)) * d.float()[..., None]).flatten(-2)
    assert torch.equal(q8_0_floats(rows), expected)
    assert torch.equal(q8_0_floats(q8_0_rows(torch.zeros(2, 32))), torch.zeros(2, 32))


def test_q8_0_cache_decodes_like_the_full_forward(tiny_config):
    """A KV_Q8_0 cache through PyTorch's path (a prefill, then steps; no kernels involved): the
    logits of the full forward up to the cache's rounding, and the same greedy choices."""
    from gptforge.model import KV_Q8_0, KVCache

    torch.manual_seed(0)
    model = GPTModel(tiny_config(emb_dim=64, n_heads=2)).eval()  # heads of 32 values
    idx = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(batch_size=2)
        model.kv_dtype = KV_Q8_0
        q8 = model.new_cache(batch_size=2)
        assert q8.keys.dtype == KV_Q8_0 and q8.keys.shape[-1] == 34 and cache.keys.dtype == torch.float32
        steps = [model(idx[:, :5], cache=q8)] + [model(idx[:, t:t + 1], cache=q8) for t in range(5, 12)]
    steps = torch.cat(steps, dim=1)
    assert (steps - full).abs().max() < 0.02 * full.abs().max()
    assert torch.equal(steps.argmax(-1), full.argmax(-1))
    with pytest.raises(ValueError, match="divisible by 32"):  # heads of 24 values
        KVCache(GPTConfig(**tiny_config(emb_dim=48, n_heads=2)), 1, dtype=KV_Q8_0)


def test_kv_cache_sizes_and_dtype_are_checked_when_it_is_made(tiny_config):
    from gptforge import GptforgeError

    cfg = GPTConfig(**tiny_config())
    for batch in (0, -1, 1.5):  # 0 made an empty cache; -1, 1.5 were errors from torch.zeros
        with pytest.raises(GptforgeError, match="batch_size must be an integer >= 1"):
            KVCache(cfg, batch)
    with pytest.raises(GptforgeError, match="max_len must be an integer >= 1 and <= 16"):
        KVCache(cfg, 1, 2.5)
    with pytest.raises(GptforgeError, match="holds floats"):  # float keys would be truncated into it
        KVCache(cfg, 1, dtype=torch.int64)
    assert KVCache(tiny_config(), 2, 4).keys.shape == (2, 2, 4, 4, 8)  # the book's dict, as GPTModel takes


def test_too_long_input_is_a_clear_error(tiny_config):
    model = GPTModel(tiny_config())
    with pytest.raises(ValueError, match="exceeds the model's 16 positions"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("ignored", [False, True], ids=["all-targets", "some-ignored"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_fused_loss_equals_cross_entropy_of_the_logits(tiny_config, tie, autocast, ignored):
    """model(x, targets=y) (LinearCrossEntropy, chunked, logits never kept) gives the loss and the
    gradients of the book's F.cross_entropy(logits.flatten(0, 1), y.flatten())."""
    import torch.nn.functional as F

    from gptforge.model import LinearCrossEntropy

    torch.manual_seed(0)
    model = GPTModel(tiny_config(vocab_size=300, context_length=16, tie_weights=tie, drop_rate=0.0))
    x, y = torch.randint(0, 300, (3, 16)), torch.randint(0, 300, (3, 16))
    if ignored:  # instruction batches: padding (and masked prompts) are -100, left out of the mean
        y[0, 9:], y[2, :4] = -100, -100
    tol = {"rtol": 1e-2, "atol": 1e-3} if autocast else {"rtol": 1e-5, "atol": 1e-6}

    def loss_and_grads(loss_fn):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    def reference():
        return F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())

    def fused_in_chunks_of_7():  # 48 rows: 6 full chunks and a partial one
        hidden = model.final_norm(_hidden_states(model, x))
        return LinearCrossEntropy.apply(hidden.flatten(0, 1), model.out_head.weight, y.flatten(), 7)

    ref_loss, ref_grads = loss_and_grads(reference)
    for fused in (lambda: model(x, targets=y), fused_in_chunks_of_7):
        loss, grads = loss_and_grads(fused)
        torch.testing.assert_close(loss, ref_loss, **tol)
        flat, ref_flat = (torch.cat([g.flatten() for g in gs.values()]) for gs in (grads, ref_grads))
        assert ((flat - ref_flat).norm() / ref_flat.norm()).item() < tol["rtol"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        torch.testing.assert_close(model(x, targets=y), ref_loss, **tol)  # evaluation: the loss alone


def _hidden_states(model, x):
    h = model.tok_emb(x) + model.pos_emb(torch.arange(x.shape[1]))
    for block in model.trf_blocks:
        h = block(h)
    return h
