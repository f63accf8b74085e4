"""gptforge's decode kernels (gptforge/fast/kernels/gemv.c) against references: float64 products, and
for int8 and 4-bit weights the activations quantized by llama.cpp's own Q8_0 quantizer (the
`gguf` package's bit-exact port of ggml-quants.c); the build cache and the fallbacks."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gptforge.fast import kernels
from gptforge.model import KV_Q8_0, q8_0_floats, q8_0_rows
from gptforge.fast.linears import Bf16Linear, Int4Linear, Int8Linear, quantize_int8, quantize_q4_0

needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"gptforge kernels: {kernels.describe()}")


def q8_0(x: torch.Tensor) -> torch.Tensor:
    """x (M, K) as the kernels see it: llama.cpp's Q8_0 integers (gguf's quantizer) times each block's
    float32 scale max|x| / 127 (Q8_0 itself stores the scale as fp16). Where x / scale lands exactly
    halfway between two integers, llama.cpp's x86 SIMD quantizer (_MM_ROUND_NEAREST), and the
    kernels, round to the even one; its reference code (and gguf's port) away from zero."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    blocks = quantize(x.numpy(), GGMLQuantizationType.Q8_0).reshape(-1, 34)
    integers = torch.from_numpy(blocks[:, 2:].copy().view(np.int8)).double()
    scale = x.reshape(-1, 32).abs().amax(-1, keepdim=True) / 127
    scaled = x.reshape(-1, 32) * torch.where(scale > 0, 1 / scale, 0)  # float32, as both compute it
    ties = (scaled - scaled.trunc()).abs() == 0.5
    integers = torch.where(ties, scaled.round().double(), integers)
    return (integers * scale.double()).reshape(x.shape)


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 16, 70])
@pytest.mark.parametrize("in_features, out_features", [(128, 37), (768, 2304), (3072, 66), (3072, 768)])
def test_float32_kernel_is_the_product(rows, in_features, out_features):
    torch.manual_seed(rows)
    x, w, b = torch.randn(rows, in_features), torch.randn(out_features, in_features), torch.randn(out_features)
    panels = kernels.pack("f32", w)[0]
    assert torch.equal(kernels.unpack("f32", panels, None, out_features)[0], w)
    # W^T as the middle third of a Hugging Face c_attn (in, 3 out), read in place where the kernels can
    fused = torch.randn(in_features, 3 * out_features)
    fused[:, out_features:2 * out_features] = w.t()
    in_place = fused[:, out_features:2 * out_features].t()
    assert kernels.reads_in_place(in_place) == (out_features % kernels.vector_floats() == 0)
    for bias in (b, None):
        expected = x.double() @ w.double().t() + (0 if bias is None else bias.double())
        specs = [kernels.layer("f32", out_features, in_features, w, None, bias),  # row-major
                 kernels.layer("f32", out_features, in_features, w, None, bias, panels)]  # and in panels
        if kernels.reads_in_place(in_place):
            specs.append(kernels.layer("f32", out_features, in_features, in_place, None, bias))
            assert specs[-1].ld == 3 * out_features and specs[-1].wp == in_place.data_ptr()
        for spec in specs:
            torch.testing.assert_close(kernels.linear(x, spec).double(), expected, rtol=1e-5, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 16, 131])  # 131: a prefill's product, 64 rows at a time
@pytest.mark.parametrize("in_features, out_features", [(128, 37), (768, 2304), (3072, 66)])
def test_bf16_kernel_is_float32_activations_times_bf16_weights(rows, in_features, out_features):
    """A Bf16Linear on the kernels: the product of float32 x with the weights rounded to bf16 as
    PyTorch rounds them, summed in float32; its panels unpack to those bf16 weights."""
    from gptforge.fast.linears import Bf16Linear

    torch.manual_seed(rows)
    x, linear = torch.randn(rows, in_features), nn.Linear(in_features, out_features)
    q = Bf16Linear(linear)
    rounded = linear.weight.detach().to(torch.bfloat16)
    assert q.panels and torch.equal(q.rows(), rounded) and torch.equal(q.dequantized(), rounded)
    assert torch.equal(q.dequantized(torch.float32), rounded.float())
    expected = x.double() @ rounded.double().t() + linear.bias.double()
    torch.testing.assert_close(kernels.linear(x, q.spec()).double(), expected, rtol=1e-5, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3, 4, 7, 16, 131])  # 131: a prefill's product, 64 rows at a time
@pytest.mark.parametrize("in_features, out_features", [(128, 37), (768, 130), (3072, 9)])
def test_int8_kernel_is_q8_0_activations_times_int8_weights(rows, in_features, out_features):
    torch.manual_seed(rows)
    x, linear = torch.randn(rows, in_features) * 3, nn.Linear(in_features, out_features)
    q = Int8Linear(linear)
    assert q.panels and q.rows().shape == (out_features, in_features)
    weight = q.rows().double() * q.scale.double()[:, None]
    expected = q8_0(x) @ weight.t() + linear.bias.double()
    got = kernels.linear(x, q.spec())
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    # what activation quantization costs, against the unquantized product
    assert (got.double() - (x.double() @ weight.t() + linear.bias.double())).abs().max() < 0.05 * expected.abs().max()


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 16, 131])  # 131: a prefill's product, 64 rows at a time
@pytest.mark.parametrize("in_features, out_features", [(128, 37), (768, 130), (3072, 9)])
def test_4bit_kernel_is_q8_0_activations_times_q4_0_weights(rows, in_features, out_features):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    torch.manual_seed(rows)
    x, linear = torch.randn(rows, in_features), nn.Linear(in_features, out_features, bias=False)
    q = Int4Linear(linear)
    assert q.panels
    # the weights as llama.cpp's Q4_0 holds them, with our float32 scales in place of its fp16 ones
    blocks = quantize(linear.weight.detach().numpy(), GGMLQuantizationType.Q4_0).reshape(-1, 18)
    ones = blocks.copy()
    ones[:, :2] = np.frombuffer(np.float16(1).tobytes(), np.uint8)
    codes = torch.from_numpy(dequantize(ones, GGMLQuantizationType.Q4_0)).double().reshape(out_features, -1)
    weight = codes * q.q4_0()[1].double().repeat_interleave(32, dim=1)
    expected = q8_0(x) @ weight.t()
    got = kernels.linear(x, q.spec())
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_4bit_kernel_sums_the_largest_codes_exactly():
    """The largest sums a 4-bit product's integer steps meet: codes of 15 (each block's first weight
    +1, the rest -1) against x at +-127 after quantization, where 16-bit partial sums would overflow
    if more of them were added before widening. The kernel equals the product of its own
    dequantized weights with Q8_0's x."""
    out_features, in_features = 16, 256
    weight = -torch.ones(out_features, in_features)
    weight[:, ::32] = 1.0
    linear = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    q = Int4Linear(linear)
    assert (q.codes()[:, 1:32] == 15).all()
    for x in (torch.full((8, in_features), 3.0), torch.full((8, in_features), -3.0)):
        expected = q8_0(x) @ q.dequantized(torch.float64).t()
        torch.testing.assert_close(kernels.linear(x, q.spec()).double(), expected, rtol=1e-6, atol=1e-4)


@needs_kernels
def test_quantized_linears_pad_odd_widths_and_match_the_kernel_reference():
    """An in_features the kernels cannot read whole (40) is zero-padded: same product."""
    torch.manual_seed(0)
    linear = nn.Linear(40, 24)
    x = torch.randn(3, 40)
    for q in (Int8Linear(linear), Int4Linear(linear)):
        padded = torch.nn.functional.pad(x, (0, q.in_padded - 40))
        expected = q8_0(padded)[:, :40] @ q.dequantized(torch.float64).t() + linear.bias.double()
        torch.testing.assert_close(q(x).double(), expected, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("rows, n", [(1, 50257), (8, 50257), (3, 7), (2, 33)])
def test_argmax_is_torchs(rows, n):
    """gf_argmax against torch.argmax: ties go to the first maximum, a NaN wins (the first one),
    -inf rows give 0, and a row view with a stride (a sliced vocabulary) reads right."""
    torch.manual_seed(n)
    x = torch.randn(rows, n + 5)
    x[0, n // 2] = x[0, n // 3] = 10.0  # a tie: the first wins
    if rows > 1:
        x[1, :] = -float("inf")
    if rows > 2:
        x[2, n - 1] = float("nan")
        x[2, n // 2] = float("nan")
    view = x[:, :n]
    assert torch.equal(kernels.argmax(view), view.argmax(-1))
    other = torch.randn(4, 9, dtype=torch.float64)  # not float32: PyTorch's argmax
    assert torch.equal(kernels.argmax(other), other.argmax(-1))


@needs_kernels
@pytest.mark.parametrize("rows, n", [(1, 50257), (5, 100), (3, 64)])
def test_masked_argmax_is_torchs_over_the_allowed_tokens(rows, n):
    """gf_argmax_masked against torch.argmax of the logits with forbidden tokens at -inf (the
    grammar's mask, llguidance's bit layout): masks sparse and dense (whole words read as vectors),
    a NaN allowed wins and one forbidden does not count, an allowed -inf is still chosen over
    nothing, a row allowing nothing gives 0, rows of a strided view read right."""
    from gptforge.structured import allowed_tokens, new_bitmask

    torch.manual_seed(n)
    x = torch.randn(rows, n + 7)
    words = (n + 31) // 32
    bitmask = torch.randint(-2**31, 2**31 - 1, (rows, words), dtype=torch.int32)  # about half allowed
    bitmask[0, : words // 2] = -1  # whole words allowed
    x[0, 0] = float("nan")
    bitmask[0, 0] = -2  # ...but token 0, a NaN, is forbidden
    if rows > 1:
        x[1, n - 1] = float("nan")
        bitmask[1, -1] = -1  # the last word: only its bits below n count
    if rows > 2:
        x[2] = float("-inf")
        bitmask[2] = 0
        bitmask[2, 1] = 1 << 3  # one token allowed, at -inf
    view = x[:, :n]
    masked = view.masked_fill(~allowed_tokens(bitmask, n), float("-inf"))
    expected = masked.argmax(-1)
    if rows > 2:
        expected[2] = 35  # torch's argmax of an all -inf row is 0, a forbidden token; the allowed one is
    assert torch.equal(kernels.argmax(view, bitmask), expected)
    nothing = new_bitmask(rows, n).zero_()
    assert kernels.argmax(view, nothing).tolist() == [0] * rows
    other = view[:2].double()  # not float32: PyTorch's argmax of the masked logits
    assert torch.equal(kernels.argmax(other, bitmask[:2]), masked[:2].double().argmax(-1))


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


@needs_kernels
def test_build_is_cached_per_cpu_and_falls_back_without_a_compiler(tmp_path):
    probe = "from gptforge.fast import kernels; print(kernels.describe())"
    first = _python(probe, GPTFORGE_CACHE=str(tmp_path))
    assert first.returncode == 0 and first.stdout.strip() == kernels.describe(), first.stderr
    assert "compiling the decode kernels" in first.stderr  # the one-off wait is announced
    built = list((tmp_path / "kernels").glob("gemv-*.so"))
    assert len(built) == 1 and not list((tmp_path / "kernels").glob("*.tmp"))
    stamp = built[0].stat().st_mtime_ns
    again = _python(probe, GPTFORGE_CACHE=str(tmp_path), CC="/nonexistent/cc")  # cached: no compiler needed
    assert again.stdout.strip() == kernels.describe() and built[0].stat().st_mtime_ns == stamp
    assert "compiling" not in again.stderr
    none = _python(probe, GPTFORGE_CACHE=str(tmp_path / "empty"), CC="/nonexistent/cc")
    assert none.returncode == 0 and none.stdout.strip() == "unavailable (no C compiler)"
    # one line of gptforge's (not a Python warning with its source line), and no "compiling" before it
    assert none.stderr.splitlines() == ["gptforge: warning: could not build the fast decode kernels (no C compiler "
                                        "at /nonexistent/cc ($CC)); using PyTorch's, about half as fast at decoding"]
    broken = _python(probe, GPTFORGE_CACHE=str(tmp_path / "broken"), CC="false")
    assert broken.stdout.strip() == "unavailable (build failed)" and "using PyTorch's" in broken.stderr
    off = _python(probe, GPTFORGE_KERNELS="torch")
    assert off.stdout.strip() == "off (GPTFORGE_KERNELS=torch)"


def test_without_the_kernels_the_models_decode_through_pytorch(tiny_config):
    """GPTFORGE_KERNELS=torch (or no compiler): every mode still generates, through PyTorch's kernels."""
    code = f"""
import copy, torch
from gptforge import GPTModel, generate, prepare_for_inference
from gptforge.fast import kernels
from gptforge.model import GPTModel
torch.manual_seed(0)
model = GPTModel({tiny_config(vocab_size=256, emb_dim=64, context_length=32)!r}).eval()
idx = torch.randint(0, 256, (2, 5))
ref = generate(model, idx, 8, stop_token_ids=())
assert kernels.library() is None
for quantize in ("none", "int8", "int4"):
    fast = prepare_for_inference(copy.deepcopy(model), "auto", quantize)
    out = generate(fast, idx, 8, stop_token_ids=())
    assert out.shape == ref.shape
    if quantize == "none":
        assert torch.equal(out, ref)
print("ok", next(fast.parameters()).dtype)
"""
    result = _python(code, GPTFORGE_KERNELS="torch")
    assert result.returncode == 0 and result.stdout.startswith("ok torch.bfloat16"), result.stderr


def _fill_at_random(cache) -> None:
    """Random keys and values in a KV cache, stored as its format stores them."""
    for buffer in (cache.keys, cache.values):
        if buffer.dtype == KV_Q8_0:
            buffer.copy_(q8_0_rows(torch.randn(*buffer.shape[:-1], buffer.shape[-1] * 16 // 17)))
        else:
            buffer.normal_()


def _assert_caches_close(ours: torch.Tensor, expected: torch.Tensor) -> None:
    """Caches written from float32 keys and values that differ in their last bits: fp16 the same
    up to one rounding step, Q8_0 up to one quantization step of each block of 32."""
    if ours.dtype == KV_Q8_0:
        a, b = q8_0_floats(ours).unflatten(-1, (-1, 32)), q8_0_floats(expected).unflatten(-1, (-1, 32))
        assert ((a - b).abs() <= b.abs().amax(-1, keepdim=True) / 127 * 1.01 + 1e-6).all()
        assert (ours == expected).float().mean() > 0.98
        return
    step = 1e-6 if ours.dtype == torch.float32 else 2**-10
    torch.testing.assert_close(ours, expected, rtol=step, atol=step)


@needs_kernels
@pytest.mark.parametrize("quantize", ["none", "int8", "int4", "int4, fp16 cache"])
@pytest.mark.parametrize("rows, padded", [(1, False), (3, False), (4, True)])
@pytest.mark.parametrize("n_heads, start", [(4, 9), (2, 37)])
def test_fused_block_decode_step_is_pytorchs_block(quantize, rows, padded, n_heads, start, tiny_config):
    """One decode step through block.c equals TransformerBlock.forward (PyTorch's layer norms,
    attention and GELU around the same prepared linears): output and the cache it writes, in each
    of the cache's formats (float32; int8/int4 models Q8_0 rows, or fp16). Heads of 32 and of
    GPT-2's 64 values (compiled apart), and 10 cached positions or 38 (scores taken 16 at a time,
    and a remainder)."""
    import copy

    from gptforge import GPTModel, prepare_for_inference
    from gptforge.fast.blocks import FusedTransformerBlock
    from gptforge.model import TransformerBlock, _attention_mask

    torch.manual_seed(rows)
    cfg = tiny_config(vocab_size=256, context_length=64, emb_dim=128, n_heads=n_heads)
    model = prepare_for_inference(GPTModel(cfg), "auto", quantize.split(",")[0])
    if quantize.endswith("fp16 cache"):
        model.kv_dtype = torch.float16
    block = model.trf_blocks[1]
    assert type(block) is FusedTransformerBlock
    reference = copy.copy(block)
    reference.__class__ = TransformerBlock
    x = torch.randn(rows, 1, 128)
    cache = model.new_cache(rows, 48)
    _fill_at_random(cache)
    key_mask = torch.ones(rows, start + 1, dtype=torch.long)
    if padded:
        key_mask[1, :4] = 0  # row 1 is left-padded by 4
    mask = _attention_mask(1, start, key_mask, x.device) if padded else None
    ours_cache, ref_cache = copy.deepcopy(cache), copy.deepcopy(cache)
    with torch.no_grad():
        ours = block(x, ours_cache.layer(1), start, mask)
        expected = reference(x, ref_cache.layer(1), start, mask)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert cache.keys.dtype == {"none": torch.float32, "int4, fp16 cache": torch.float16}.get(quantize, KV_Q8_0)
    _assert_caches_close(ours_cache.keys, ref_cache.keys)
    _assert_caches_close(ours_cache.values, ref_cache.values)


def _fused_tiny_batch(quantize: str, rows: int, padded: bool, length: int, tiny_config, width: int = 128):
    """A prepared tiny FusedGPTModel (`width` its emb_dim, heads of 32 or 64) and a batch for it: ids,
    a 0/1 mask (row 1 left-padded by 4 where `padded`) and the positions counted from it."""
    from gptforge import GPTModel, prepare_for_inference
    from gptforge.fast.blocks import FusedGPTModel

    torch.manual_seed(rows)
    model = prepare_for_inference(GPTModel(tiny_config(vocab_size=256, context_length=64, emb_dim=width,
                                                       n_heads=width // (64 if width % 128 == 0 else 32))),
                                  "auto", quantize)
    assert type(model) is FusedGPTModel
    ids = torch.randint(0, 256, (rows, length))
    mask = torch.ones(rows, length, dtype=torch.long)
    if padded:
        mask[1, :4] = 0
    return model, ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@needs_kernels
@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])
@pytest.mark.parametrize("rows, padded", [(1, False), (3, True)])
@pytest.mark.parametrize("width", [128, 160])
def test_fused_model_step_is_the_block_by_block_step(quantize, rows, padded, width, tiny_config):
    """A FusedGPTModel's decode step (embeddings, every block, final norm and head in one C call)
    equals GPTModel.forward over the same prepared blocks and head (each block in C, the rest in
    PyTorch): logits and the cache written; with left padding and per-row positions, and without.
    Width 160, no multiple of 128 (as GPT-2 1558M's 1600): int8/4-bit layers are padded to whole
    Q8_0 blocks only, so they too run in C, whole model at once."""
    from gptforge import GPTModel
    from gptforge.fast.blocks import FusedGPTModel

    model, ids, mask, positions = _fused_tiny_batch(quantize, rows, padded, 10, tiny_config, width)
    assert all(m.in_padded == m.in_features for m in model.modules() if hasattr(m, "in_padded"))
    prompt = {"positions": positions[:, :9], "attention_mask": mask[:, :9]} if padded else {}
    step = {"positions": positions[:, 9:], "attention_mask": mask} if padded else {}
    caches, logits = [], []
    with torch.no_grad():
        for forward in (FusedGPTModel.forward, GPTModel.forward):
            cache = model.new_cache(rows, 16)
            model(ids[:, :9], cache=cache, **prompt)  # the prefill: PyTorch's, both times
            logits.append(forward(model, ids[:, 9:], cache=cache, last_only=True, **step))
            caches.append(cache)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)
    assert logits[0].shape == (rows, 1, 256) and caches[0].length == caches[1].length == 10
    assert torch.equal(caches[0].keys, caches[1].keys) and torch.equal(caches[0].values, caches[1].values)


@needs_kernels
@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])
@pytest.mark.parametrize("rows, padded", [(1, False), (3, True)])
def test_short_prefill_in_c_is_pytorchs_prefill(quantize, rows, padded, tiny_config, monkeypatch):
    """A short prefill into a cache (T tokens per row, last position's logits) runs as one C call
    and equals GPTModel.forward's PyTorch prefill over the same prepared blocks and head: the
    logits and the cache written; a first chunk from position 0, then a second chunk after it
    (causal within the chunk, every cached position before it), with left padding and per-row
    positions, and without."""
    from gptforge import GPTModel
    from gptforge.fast import blocks as block
    from gptforge.fast.blocks import FusedGPTModel

    model, ids, mask, positions = _fused_tiny_batch(quantize, rows, padded, 12, tiny_config)
    calls, original = [], block.call
    monkeypatch.setattr(block, "call", lambda name, *a: calls.append(name) or original(name, *a))
    results = []
    with torch.no_grad():
        for forward in (FusedGPTModel.forward, GPTModel.forward):
            cache, logits = model.new_cache(rows, 16), []
            for begin, end in [(0, 7), (7, 12)]:
                extra = {"positions": positions[:, begin:end], "attention_mask": mask[:, :end]} if padded else {}
                logits.append(forward(model, ids[:, begin:end], cache=cache, last_only=True, **extra))
            results.append((logits, cache))
    assert calls == ["gf_model_decode"] * 2  # the fused model's two chunks, each one C call
    (ours, ours_cache), (theirs, their_cache) = results
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape == (rows, 1, 256)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert ours_cache.length == their_cache.length == 12
    _assert_caches_close(ours_cache.keys, their_cache.keys)
    _assert_caches_close(ours_cache.values, their_cache.values)


@needs_kernels
def test_a_hook_on_a_module_the_c_step_stands_in_for_takes_pytorchs_path(tiny_config, monkeypatch):
    """While a forward hook (or pre-hook) sits on a block or the head of a FusedGPTModel, its
    prefill and decode steps go through PyTorch's modules, so the hook sees every one; once removed,
    each is one C call again, with the same tokens."""
    from gptforge import GPTModel, generate, prepare_for_inference
    from gptforge.fast import blocks as block

    torch.manual_seed(0)
    model = prepare_for_inference(GPTModel(tiny_config(vocab_size=256, context_length=64, emb_dim=128, n_heads=2)),
                                  "auto", "int8")
    calls, original = [], block.call
    monkeypatch.setattr(block, "call", lambda name, *a: calls.append(name) or original(name, *a))
    ids = torch.randint(0, 256, (2, 5))
    plain = generate(model, ids, 4, stop_token_ids=())
    assert calls.count("gf_model_decode") == 4  # the prefill and three steps
    for register in (model.trf_blocks[1].register_forward_hook, model.out_head.register_forward_pre_hook):
        seen, calls[:] = [], []
        handle = register(lambda *args: seen.append(1) and None)
        try:
            assert torch.equal(generate(model, ids, 4, stop_token_ids=()), plain)
        finally:
            handle.remove()
        assert len(seen) == 4 and "gf_model_decode" not in calls
    calls[:] = []
    assert torch.equal(generate(model, ids, 4, stop_token_ids=()), plain)
    assert calls.count("gf_model_decode") == 4


@needs_kernels
def test_fused_model_step_leaves_what_c_cannot_take_to_pytorch(tiny_config):
    """What the C step does not take goes through GPTModel.forward, with its errors and results: a
    token outside the vocabulary (IndexError, the cache untouched), a full cache, autograd on."""
    from gptforge import GPTModel, prepare_for_inference
    from gptforge.errors import GptforgeError
    from gptforge.fast.blocks import FusedGPTModel

    torch.manual_seed(0)
    model = prepare_for_inference(GPTModel(tiny_config(vocab_size=256, context_length=64, emb_dim=128, n_heads=2)),
                                  "auto", "int8")
    assert type(model) is FusedGPTModel
    ids = torch.randint(0, 256, (2, 4))
    cache = model.new_cache(2, 5)
    with torch.no_grad():
        model(ids, cache=cache)
        snapshot = cache.keys.clone()
        with pytest.raises(IndexError):
            model(torch.tensor([[1], [256]]), cache=cache)
        assert cache.length == 4 and torch.equal(cache.keys, snapshot)
        in_c = model(ids[:, :1], cache=cache)
        with pytest.raises(GptforgeError, match="exceeds"):
            model(ids[:, :1], cache=cache)  # the cache is full
    cache.length = 4
    with torch.enable_grad():
        through_pytorch = model(ids[:, :1], cache=cache)
    torch.testing.assert_close(through_pytorch, in_c, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_profile_times_the_kernels_parts_only_while_on(tiny_config):
    """kernels.profile: seconds in the C blocks' products (and the head's, through `linear`),
    attention and the rest, summed while timing is on (what profile_decode reports), nothing while
    it is off."""
    from gptforge import GPTModel, prepare_for_inference
    from gptforge.fast.blocks import FusedTransformerBlock

    model = prepare_for_inference(GPTModel(tiny_config(vocab_size=256, context_length=32, emb_dim=128, n_heads=2)),
                                  "auto", "int8")
    assert type(model.trf_blocks[0]) is FusedTransformerBlock
    ids = torch.randint(0, 256, (2, 5))

    def decode_steps(n: int) -> None:
        cache = model.new_cache(2, 16)
        with torch.no_grad():
            model(ids, cache=cache)
            for _ in range(n):
                model(ids[:, :1], cache=cache, last_only=True)

    kernels.profile(False)
    decode_steps(2)
    assert set(kernels.profile(True).values()) == {0.0}  # off: nothing timed
    decode_steps(3)
    parts = kernels.profile(False)
    assert set(parts) == {"products", "attention", "block rest"} and all(t > 0 for t in parts.values()), parts
    kernels.profile(True)
    kernels.linear(torch.randn(3, 128), model.out_head.spec())  # the head's product alone
    assert kernels.profile(False)["products"] > 0
    decode_steps(1)
    assert set(kernels.profile(False).values()) == {0.0}


@needs_kernels
def test_release_threads_lets_the_callers_openmp_workers_go():
    """kernels.release_threads (what BatchScheduler.start calls): the OpenMP worker threads this
    thread's parallel work started end, and come back with its next parallel work."""
    import ctypes

    weight = torch.randn(64, 64)
    spec = kernels.layer("f32", 64, 64, weight)
    x, y = torch.randn(1, 64), torch.empty(1, 64)

    def product_on_two_threads() -> None:
        kernels.call("gf_linear", ctypes.byref(spec), x.data_ptr(), 1, y.data_ptr(), 2)

    def threads() -> int:
        return len(os.listdir("/proc/self/task"))

    def fewer_than(n: int) -> int:  # a released worker ends on its own time: wait for it (30 s at most)
        for _ in range(3000):
            if threads() < n:
                break
            time.sleep(0.01)
        return threads()

    product_on_two_threads()
    working = threads()
    assert kernels.release_threads()
    released = fewer_than(working)
    assert released < working
    product_on_two_threads()
    assert threads() > released  # a worker again
    torch.testing.assert_close(y, x @ weight.T)


@needs_kernels
def test_float32_panels_follow_the_weights(tiny_config):
    """Products of several float32 rows read a second copy of the weights in panels, made on the
    first such step: loading other weights into a prepared model remakes it (no stale copy)."""
    import copy

    from gptforge import GPTModel, generate, prepare_for_inference

    cfg = tiny_config(vocab_size=256, context_length=32, emb_dim=64, n_heads=4)
    torch.manual_seed(0)
    first, second = GPTModel(cfg).eval(), GPTModel(cfg).eval()
    idx = torch.randint(0, 256, (3, 5))
    fast = prepare_for_inference(copy.deepcopy(first), "float32")
    assert torch.equal(generate(fast, idx, 6, stop_token_ids=()), generate(first, idx, 6, stop_token_ids=()))
    assert fast.out_head.panel_copy is not None  # batch 3 went through the panels
    fast.load_state_dict(second.state_dict())
    assert torch.equal(generate(fast, idx, 6, stop_token_ids=()), generate(second, idx, 6, stop_token_ids=()))


@needs_kernels
def test_only_a_batchs_decode_steps_make_the_float32_panels(tiny_config):
    """The panels are a second copy of a float32 model's weights: a batch of one, its prompt's
    products included (several rows, on the row-major weights), never makes them; a batch does."""
    from gptforge import GPTModel, generate, prepare_for_inference

    torch.manual_seed(0)
    fast = prepare_for_inference(GPTModel(tiny_config(vocab_size=256, context_length=32, emb_dim=64)).eval(),
                                 "float32")
    generate(fast, torch.randint(0, 256, (1, 12)), 4, stop_token_ids=())
    assert all(getattr(module, "panel_copy", None) is None for module in fast.modules())
    generate(fast, torch.randint(0, 256, (2, 12)), 2, stop_token_ids=())
    assert fast.out_head.panel_copy is not None


@needs_kernels
def test_fused_model_decodes_like_transformers(tmp_path):
    """A prepared float32 model's greedy decoding (steps through block.c) equals Hugging Face's
    GPT2LMHeadModel on the same weights, batch 2 with left padding."""
    transformers = pytest.importorskip("transformers")
    from gptforge import GPTModel, generate, prepare_for_inference, save

    torch.manual_seed(0)
    model = GPTModel({"vocab_size": 50257, "context_length": 48, "emb_dim": 128, "n_heads": 4, "n_layers": 2,
                      "drop_rate": 0.0, "qkv_bias": True, "init": "gpt2"}).eval()
    save(model, tmp_path / "hf", format="hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    fast = prepare_for_inference(model, "float32")
    ours = generate(fast, prompts, 12, stop_token_ids=())
    for prompt, row in zip(prompts, ours):
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=50256)
        assert row[-12:].tolist() == expected[0, len(prompt):].tolist()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_in_c_equals_pytorchs(dtype, monkeypatch):
    """What a prefill multiplies with: the C conversion against the same in PyTorch operators."""
    torch.manual_seed(0)
    linear = nn.Linear(200, 70)  # 200 inputs: padded to 256 inside, cut off again
    for q in (Int8Linear(linear), Int4Linear(linear), Bf16Linear(linear)):
        ours = q.dequantized(dtype)
        monkeypatch.setattr(kernels, "available", lambda: False)
        reference = q.dequantized(dtype)
        monkeypatch.undo()
        assert ours.shape == (70, 200) and ours.dtype == dtype and torch.equal(ours, reference)


@needs_kernels
@pytest.mark.parametrize("march, built", [("haswell", "AVX2"), ("skylake-avx512", "AVX-512")])
def test_the_other_builds_pass_the_same_tests(tmp_path, march, built):
    """The builds other CPUs compile, run here where this one is a superset: AVX2 (an AVX2-only
    EPYC) and AVX-512 without VNNI (vpmaddubsw in place of vpdpbusd): these tests again under each."""
    if kernels.describe() != "AVX-512 VNNI":
        pytest.skip(f"this CPU's kernels are {kernels.describe()}, not a superset of {march}'s")
    env = {**os.environ, "GPTFORGE_MARCH": march, "GPTFORGE_CACHE": str(tmp_path)}
    probe = subprocess.run([sys.executable, "-c", "from gptforge.fast import kernels; print(kernels.describe())"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert probe.stdout.strip() == built, probe.stderr
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                             "-k", "not other_builds and not build_is_cached"], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0 and " passed" in result.stdout, result.stdout[-3000:]


@pytest.mark.parametrize("use_kernels", [True, False])
def test_row_major_is_torch_cat_of_transposed_weights(use_kernels, monkeypatch):
    """kernels.row_major lays Hugging Face's (in, out) weights, read as (out, in) transposed views,
    out as rows: torch.cat's result exactly, for sizes off the 8 x 8 tiles, column slices of a
    wider matrix (c_attn's query, key and value), a contiguous part among them, and other dtypes;
    also with the kernels off (PyTorch's copy)."""
    if use_kernels and not kernels.available():
        pytest.skip(f"gptforge kernels: {kernels.describe()}")
    if not use_kernels:
        monkeypatch.setattr(kernels, "library", lambda: None)
    torch.manual_seed(0)
    c_attn = torch.randn(77, 3 * 69)  # (in, 3 out), as in a GPT-2 file
    parts = [c_attn[:, i * 69:(i + 1) * 69].t() for i in range(3)]  # (out, in) views, strides (1, 207)
    for group in (parts, [parts[0], torch.randn(5, 77), parts[2]], [torch.randn(130, 64).t()],
                  [torch.randn(8, 8).t()], [torch.randn(3, 2).t()], [torch.randn(40, 24).t().to(torch.bfloat16)]):
        got = kernels.row_major(group)
        assert got.is_contiguous() and got.dtype == group[0].dtype and torch.equal(got, torch.cat(group))


@needs_kernels
@pytest.mark.parametrize("fmt", ["i8", "q4", "bf16"])
def test_quantizing_in_c_gives_pytorchs_bytes(fmt):
    """kernels.quantize (what makes an int8, 4-bit or bf16 model where the kernels run) against
    fast/linears.py's PyTorch quantizers (bf16: `.to(torch.bfloat16)`) then `pack`, byte for byte: rows not a whole panel, inputs padded, a
    transposed view (Hugging Face's layout) as well as rows, int8 values exactly halfway (to even),
    a 4-bit group whose largest magnitudes tie with opposite signs (the first wins), a zero group,
    and two values whose codes a fused multiply-add in floor(w * (1 / d) + 8.5) would move."""
    torch.manual_seed(0)
    n, k, k_padded = 37, 200, 256
    weight = torch.randn(n, k) * torch.rand(n, 1) * 3
    weight[0, :8] = torch.tensor([127.0, 2.5, -2.5, 3.5, 0.5, -0.5, 1.5, 126.5])  # scale 1: exact halves
    weight[1, 32:64] = 0.25
    weight[1, 40], weight[1, 50] = -4.0, 4.0  # a tie of magnitudes: -4 comes first
    weight[2, 64:96] = 0.0
    weight[3, 96:128] = 0.01  # d = 0.1 / -8: w / d + 8.5 rounded twice floors one higher than fused
    weight[3, 96:99] = torch.tensor([0.1, 0.056250002, 0.031250004])
    big = torch.randn(2000, 512)
    reference = {"i8": quantize_int8, "q4": quantize_q4_0, "bf16": lambda w: (w.to(torch.bfloat16), None)}[fmt]
    if fmt == "bf16":  # halfway between two bf16 values both ways (to even), infinities, a NaN
        weight[4, :6] = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), float("inf"), float("-inf"), float("nan")])
    for w, padded_to in ((weight, k_padded), (weight.t().contiguous().t(), k_padded), (big, 512)):
        expected = kernels.pack(fmt, *reference(F.pad(w, (0, padded_to - w.shape[1]))))
        got = kernels.quantize(fmt, w, padded_to)
        assert got[0].dtype == expected[0].dtype
        nan = expected[0].isnan() if fmt == "bf16" else torch.zeros_like(expected[0], dtype=torch.bool)
        if fmt == "bf16":  # a NaN stays NaN (its bits may differ); every other value, bit for bit
            assert torch.equal(got[0].isnan(), nan)
        bits = {torch.bfloat16: torch.int16}.get(got[0].dtype, got[0].dtype)
        assert torch.equal(got[0].view(bits)[~nan], expected[0].view(bits)[~nan])
        assert got[1] is expected[1] is None or torch.equal(got[1], expected[1])
