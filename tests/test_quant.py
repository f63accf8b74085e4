"""Inference preparation: fp32 re-layout, bf16 packed linears, weight-only int8 and int4."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn as nn

from gptforge import GPTModel, generate
from gptforge.fast import kernels
from gptforge.model import KV_Q8_0
from gptforge.fast import prepare_for_inference
from gptforge.fast.linears import Bf16Linear, Int4Linear, Int8Linear, PackedLinear

from gen_helpers import generation_config, tiny_model


@pytest.fixture
def cfg(tiny_config):
    """The tiny model these tests share (see gen_helpers.generation_config)."""
    return generation_config(tiny_config)


def _prompt(cfg):
    return torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(11))


def test_float32_layout_keeps_state_dict_and_results(cfg):
    model = tiny_model(cfg)
    before = copy.deepcopy(model.state_dict())
    idx = _prompt(cfg)
    expected_logits = model(idx).detach()
    expected = generate(model, idx, 20, stop_token_ids=())
    prepare_for_inference(model, "float32")
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert model.trf_blocks[0].ff.layers[0].weight.is_contiguous()  # (out, in), as the kernel reads it
    att = model.trf_blocks[0].att  # query, key and value: the model's own three matrices, no fused copy
    assert att.fused_qkv is None and all(torch.equal(getattr(att, n).weight, before[f"trf_blocks.0.att.{n}.weight"])
                                         for n in ("W_query", "W_key", "W_value"))
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in tiny_model(cfg).parameters())
    torch.testing.assert_close(model(idx).detach(), expected_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(generate(model, idx, 20, stop_token_ids=()), expected)


def test_int8_linear_matches_its_dequantized_weight():
    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    q = Int8Linear(linear)
    # inputs padded to whole Q8_0 blocks where gptforge's kernels run, to 128 for PyTorch's int4 packing elsewhere
    assert q.rows().dtype == torch.int8 and q.rows().abs().max() == 127 and q.rows().shape == (96, 64 if q.panels else 128)
    # Quantization error of each weight is at most half a step.
    assert ((q.dequantized().float() - linear.weight).abs() <= q.scale.float()[:, None] * 0.51 + 1e-3).all()
    for rows in (1, 5, 40):  # the int8 kernel up to MAX_DECODE_ROWS, dequantize + bf16 matmul above
        x = torch.randn(rows, 64).bfloat16()
        ref = torch.nn.functional.linear(x.float(), q.dequantized().float(), linear.bias.bfloat16().float())
        torch.testing.assert_close(q(x).float(), ref, rtol=2e-2, atol=2e-2)


def test_int4_linear_is_llama_cpps_q4_0():
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    torch.manual_seed(0)
    linear = nn.Linear(128, 72)
    q = Int4Linear(linear)
    w = linear.weight.detach().numpy()
    q4_0 = torch.from_numpy(dequantize(quantize(w, GGMLQuantizationType.Q4_0), GGMLQuantizationType.Q4_0))
    step = linear.weight.detach().abs().reshape(72, 4, 32).amax(-1).repeat_interleave(32, 1) / 8
    # the same 4-bit values; the scales differ by float32 (ours) against fp16 (Q4_0) rounding
    assert ((q.dequantized() - q4_0).abs() <= 8 * 2**-11 * step).all()
    blocks = quantize(w, GGMLQuantizationType.Q4_0).reshape(72, 4, 18)  # per group: fp16 d, 16 bytes
    assert torch.equal(q.q4_0()[0], torch.from_numpy(blocks[..., 2:].reshape(72, 64).copy()))  # Q4_0's bytes
    for rows in (1, 5, 40):  # the int4 kernel up to MAX_DECODE_ROWS, dequantize + one matmul above
        x = torch.randn(3, rows, 128).bfloat16()
        ref = torch.nn.functional.linear(x.float(), q.dequantized(), linear.bias.bfloat16().float())
        torch.testing.assert_close(q(x).float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype, quantize, kind", [("bfloat16", "none", PackedLinear), ("float32", "int8", Int8Linear),
                                                   ("float32", "int4", Int4Linear)])
def test_low_precision_models_track_float32(cfg, dtype, quantize, kind):
    model = tiny_model(cfg)
    idx = _prompt(cfg)
    ref_logits = model(idx).detach()
    ref = generate(model, idx, 16, stop_token_ids=())
    fast = prepare_for_inference(copy.deepcopy(model), dtype, quantize)
    if kind is PackedLinear and kernels.available():
        kind = Bf16Linear  # bf16 weights on gptforge's kernels (their own test below)
    elif kind is PackedLinear and not any(isinstance(m, PackedLinear) for m in fast.modules()):
        pytest.skip("this CPU's oneDNN has no bf16 support and gptforge's kernels do not run here")
    assert isinstance(fast.out_head, kind) and isinstance(fast.trf_blocks[1].att.fused_qkv, kind)
    # CPU attention is fastest over a float32 cache (PyTorch's) or, on gptforge's kernels, Q8_0 rows
    # (heads of a multiple of 32 values) or fp16
    expected = torch.float32
    if quantize != "none" and kernels.available():
        expected = KV_Q8_0 if fast.cfg.head_dim % 32 == 0 else torch.float16
    assert fast.new_cache(1, 4).keys.dtype == expected
    logits = fast(idx).float()
    assert (logits - ref_logits).abs().max() < 0.1 * ref_logits.abs().max()
    assert (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean() > 0.9
    out = generate(fast, idx, 16, stop_token_ids=())
    assert (out[:, 7:] == ref[:, 7:]).float().mean() > 0.5  # random weights: greedy can drift after a flip


def test_bad_dtype_and_quantize_are_value_errors(cfg):
    with pytest.raises(ValueError, match="dtype"):
        prepare_for_inference(tiny_model(cfg), "float16")
    with pytest.raises(ValueError, match="quantize"):
        prepare_for_inference(tiny_model(cfg), "float32", "int3")


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_modes_cost_under_one_percent_perplexity_on_the_builtin_model(data_dir, quantize):
    """The issue's bar for a 4-bit mode: at most 1% perplexity against fp32 on the built-in model
    and tinyshakespeare's last 10% (llama.cpp's Q4_0 of the same model: +0.19%), measured both
    ways a quantized model runs: a prefill (PyTorch's attention; the products on the int8/4-bit
    kernels, activations quantized as Q8_0, or, where choose_mode says, dequantized weights and
    one matmul) and decode steps (the C model step, its cache as Q8_0 rows), here 8 sequences a
    token at a time."""
    import math

    from gptforge import load
    from gptforge.tokenizer import get_tokenizer

    text = (data_dir / "tinyshakespeare.txt").read_text()
    start = int(len(text) * 0.9)
    ids = torch.tensor(get_tokenizer().encode(text[start:start + 12_000]))  # ~3,000 tokens of it
    base = load("gptforge-shakespeare", dtype=torch.float32)
    T, n = base.cfg.context_length, 8
    x, y = ids[: n * T].reshape(n, T), ids[1: n * T + 1].reshape(n, T)
    results = {}
    for mode in ("none", quantize):
        model = prepare_for_inference(copy.deepcopy(base), "float32", mode)
        with torch.no_grad():
            results[mode] = model(x).float().log_softmax(-1)
            if mode != "none":
                cache = model.new_cache(n, T)
                steps = [model(x[:, t:t + 1], cache=cache, last_only=True)[:, 0] for t in range(T)]
                results["decode"] = torch.stack(steps, 1).float().log_softmax(-1)
    ref = results["none"]
    ppl = {k: math.exp(-v.gather(-1, y[..., None]).mean().item()) for k, v in results.items()}
    for way in (quantize, "decode"):
        kl = (ref.exp() * (ref - results[way])).sum(-1).mean().item()
        top1 = (ref.argmax(-1) == results[way].argmax(-1)).float().mean().item()
        print(f"{quantize} {way}: perplexity {ppl[way]:.3f} (fp32 {ppl['none']:.3f}), top-1 {top1:.3f}, KL {kl:.2e}")
        assert abs(ppl[way] / ppl["none"] - 1) < 0.01
        assert top1 > 0.85 and kl < 0.02


@pytest.mark.skipif(not kernels.available(), reason="gptforge's kernels do not run on this machine")
def test_bf16_on_the_kernels_is_float32_with_bf16_rounded_weights(tiny_config):
    """--dtype bfloat16 where gptforge's kernels run: the float32 model with every weight rounded
    to bf16 (as PyTorch's .to(bfloat16)), computed in float32: a short prefill and the decode steps
    in one C call each (FusedGPTModel), batch 2 with left padding, give its logits and greedy
    tokens; a prefill too long for the C call (dequantized to bf16 for one matmul) stays close."""
    from gptforge.fast.blocks import PREFILL_ROWS, FusedGPTModel
    from gptforge.fast import choose_mode

    cfg = generation_config(tiny_config, emb_dim=128)  # the C blocks need no padded inputs
    model = tiny_model(cfg)
    rounded = copy.deepcopy(model).to(torch.bfloat16).float().eval()
    fast = prepare_for_inference(copy.deepcopy(model), "bfloat16")
    assert type(fast) is FusedGPTModel and isinstance(fast.trf_blocks[0].ff.layers[0], Bf16Linear)
    assert fast.tok_emb.weight.dtype == torch.float32 and torch.equal(fast.tok_emb.weight, rounded.tok_emb.weight)
    idx = _prompt(cfg)
    mask = torch.ones_like(idx)
    mask[0, :2] = 0
    with torch.no_grad():
        for forward in (fast, rounded):
            cache = forward.new_cache(idx.shape[0], idx.shape[1] + 1)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = forward(idx, cache=cache, positions=positions, attention_mask=mask, last_only=True)
            if forward is fast:
                ours = logits
        torch.testing.assert_close(ours, logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(generate(fast, idx, 12, attention_mask=mask, stop_token_ids=()),
                       generate(rounded, idx, 12, attention_mask=mask, stop_token_ids=()))
    # 150 rows: past the C call and past kernel_rows (128 at most): the weights dequantized for one
    # matmul, in bf16 on a CPU with bf16 hardware (else float32)
    long = torch.randint(0, cfg.vocab_size, (5, 30), generator=torch.Generator().manual_seed(3))
    assert long.numel() > max(PREFILL_ROWS, choose_mode("bfloat16").kernel_rows)
    with torch.no_grad():
        expected = rounded(long, last_only=True)
        assert (fast(long, last_only=True) - expected).abs().max() < 0.05 * expected.abs().max()


def test_prepare_for_inference_names_what_is_not_a_model():
    from gptforge import GptforgeError

    for model in (None, "gpt2-124m", nn.Linear(2, 2)):  # AttributeErrors, or a Linear silently swapped
        with pytest.raises(GptforgeError, match="expects a gptforge GPTModel"):
            prepare_for_inference(model)


# Run in a fresh process (its heap holds nothing freed earlier that a load could reuse unseen):
# the anonymous memory a load adds, and what is left of it once the model is converted (then it
# decodes, to show the converted model works).
_MEMORY_PROBE = """
import gc, sys, torch, gptforge
def rss_anon():
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("RssAnon:"))
path, dtype, quantize = sys.argv[1:]
gc.collect()
start = rss_anon()
model = gptforge.load(path)
loaded = rss_anon() - start
gptforge.prepare_for_inference(model, dtype, quantize)
gc.collect()
kept = rss_anon() - start  # before decoding, whose working memory (PyTorch's int4 packing, a
gptforge.generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=2)  # prefill's weights) is not the point
print(sum(p.nbytes for p in gptforge.load(path).parameters()), loaded, kept)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc/self/status (Linux)")
@pytest.mark.parametrize("dtype, quantize", [("auto", "int8"), ("auto", "int4"), ("bfloat16", "none")])
def test_converted_models_let_the_checkpoints_float_weights_go(dtype, quantize, tmp_path, tiny_config):
    """A loaded checkpoint's tensors are views of the file's bytes, read as one block. Once int8,
    4-bit or bf16 layers replace the linear weights, nothing may keep that block alive (an embedding
    table or a bias viewing it would hold all of it, the float32 weights included): the process's
    memory grows by about the converted weights, not by the float32 ones too."""
    import subprocess
    import sys

    import gptforge

    cfg = tiny_config(vocab_size=256, context_length=32, emb_dim=512, n_heads=8, n_layers=6)
    gptforge.save(GPTModel(cfg), tmp_path / "m")
    # glibc's malloc then maps every block of 64 KiB or more apart and unmaps it when freed, so the
    # resident memory is what is alive (else freed heap memory may stay counted)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(tmp_path / "m"), dtype, quantize],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    float_bytes, loaded, after = (int(n) for n in result.stdout.split()[-3:])  # ~77 MB of weights
    assert loaded > 0.9 * float_bytes
    # int8 keeps a quarter of the float bytes, 4-bit about a sixth, bf16 half
    assert after < (0.75 if quantize == "none" else 0.5) * float_bytes
