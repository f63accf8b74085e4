"""Inference preparation: fp32 re-layout, bf16 packed linears, weight-only int8."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from gptforge import generate
from gptforge.quant import Int8Linear, PackedLinear, prepare_for_inference

from gen_helpers import generation_config, tiny_model


@pytest.fixture
def cfg(tiny_config):
    """The tiny model these tests share (see gen_helpers.generation_config)."""
    return generation_config(tiny_config)


def _prompt(cfg):
    return torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(11))


def test_float32_relayout_keeps_state_dict_and_results(cfg):
    model = tiny_model(cfg)
    before = copy.deepcopy(model.state_dict())
    idx = _prompt(cfg)
    expected_logits = model(idx).detach()
    expected = generate(model, idx, 20, stop_token_ids=())
    prepare_for_inference(model, "float32")
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not model.trf_blocks[0].ff.layers[0].weight.is_contiguous()  # stored as (in, out)
    att = model.trf_blocks[0].att
    assert att.fused_qkv is not None and att.W_key.weight.data_ptr() == att.W_query.weight.data_ptr() + 64 * 4
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in tiny_model(cfg).parameters())
    torch.testing.assert_close(model(idx).detach(), expected_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(generate(model, idx, 20, stop_token_ids=()), expected)


def test_int8_linear_matches_its_dequantized_weight():
    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    q = Int8Linear(linear)
    assert q.weight_int8.dtype == torch.int8 and q.weight_int8.abs().max() == 127
    # Quantization error of each weight is at most half a step.
    assert ((q.dequantized().float() - linear.weight).abs() <= q.scale.float()[:, None] * 0.51 + 1e-3).all()
    for rows in (1, 5, 40):  # the int8 kernel below INT8_MAX_ROWS, dequantize + bf16 matmul above
        x = torch.randn(rows, 64).bfloat16()
        ref = torch.nn.functional.linear(x.float(), q.dequantized().float(), linear.bias.bfloat16().float())
        torch.testing.assert_close(q(x).float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype, quantize, kind", [("bfloat16", "none", PackedLinear), ("float32", "int8", Int8Linear)])
def test_low_precision_models_track_float32(cfg, dtype, quantize, kind):
    model = tiny_model(cfg)
    idx = _prompt(cfg)
    ref_logits = model(idx).detach()
    ref = generate(model, idx, 16, stop_token_ids=())
    fast = prepare_for_inference(copy.deepcopy(model), dtype, quantize)
    if kind is PackedLinear and not any(isinstance(m, PackedLinear) for m in fast.modules()):
        pytest.skip("this CPU's oneDNN has no bf16 support")
    assert isinstance(fast.out_head, kind) and isinstance(fast.trf_blocks[1].att.fused_qkv, kind)
    assert fast.new_cache(1, 4).keys.dtype == torch.float32  # CPU attention is fastest in fp32
    logits = fast(idx).float()
    assert (logits - ref_logits).abs().max() < 0.1 * ref_logits.abs().max()
    assert (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean() > 0.9
    out = generate(fast, idx, 16, stop_token_ids=())
    assert (out[:, 7:] == ref[:, 7:]).float().mean() > 0.5  # random weights: greedy can drift after a flip


def test_bad_dtype_and_quantize_are_value_errors(cfg):
    with pytest.raises(ValueError, match="dtype"):
        prepare_for_inference(tiny_model(cfg), "float16")
    with pytest.raises(ValueError, match="quantize"):
        prepare_for_inference(tiny_model(cfg), "float32", "int4")
