"""The per-CPU choice table (`choose_mode`) for CPUs other than this one, `dtype="auto"` end to
end, the quantized prefill's dequantization dtype, and serve decoding through the chosen kernels."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from gptforge import generate
from gptforge.fast import InferenceMode, choose_mode, inference_view, prepare_for_inference
from gptforge.fast.linears import Float32Linear, Int8Linear
from gptforge.cpu import cpu_flags

from gen_helpers import generation_config, tiny_model

AVX2_EPYC = frozenset({"avx", "avx2", "fma", "f16c"})  # issue 14's AVX2-only EPYC
AVX512_BF16_EPYC = AVX2_EPYC | {"avx512f", "avx512_vnni", "avx512_bf16"}
AMX_XEON = AVX2_EPYC | {"avx512f", "amx_tile", "amx_bf16", "amx_int8"}
GRAVITON3 = frozenset({"asimd", "sve", "bf16", "i8mm"})


@pytest.mark.parametrize("flags, native, dtype, quantize, expected", [
    # float32 products on gptforge's kernels: up to 128 rows with AVX-512, 64 with AVX2
    (AVX2_EPYC, True, "auto", "none", InferenceMode("float32", "none", torch.float32, 64)),
    (AMX_XEON, True, "auto", "none", InferenceMode("float32", "none", torch.bfloat16, 128)),  # auto stays exact
    # quantized on gptforge's kernels: a prefill's products on them too (kernel_rows None: any number)
    (AVX2_EPYC, True, "auto", "int8", InferenceMode("float32", "int8", torch.float32, None)),  # no bf16 here
    (AVX2_EPYC, False, "auto", "int8", InferenceMode("bfloat16", "int8", torch.float32)),  # torch's int8 kernel
    (AVX512_BF16_EPYC, True, "auto", "int8", InferenceMode("float32", "int8", torch.bfloat16, None)),
    (AVX2_EPYC, True, "auto", "int4", InferenceMode("float32", "int4", torch.float32, None)),
    # with AMX, products of more than 64 rows dequantize for oneDNN's AMX matmul
    (AMX_XEON, True, "bfloat16", "int8", InferenceMode("float32", "int8", torch.bfloat16, 64)),
    (GRAVITON3, False, "auto", "int8", InferenceMode("bfloat16", "int8", torch.bfloat16)),
    (frozenset(), False, "bfloat16", "none", InferenceMode("bfloat16", "none", torch.float32)),
    (AVX2_EPYC, True, torch.float32, "none", InferenceMode("float32", "none", torch.float32, 64)),
    # bf16 weights on gptforge's kernels: read as float32's panels are, the same rows
    (AVX2_EPYC, True, "bfloat16", "none", InferenceMode("bfloat16", "none", torch.float32, 64)),
    (AVX512_BF16_EPYC, True, "bfloat16", "none", InferenceMode("bfloat16", "none", torch.bfloat16, 128)),
    (AVX2_EPYC, False, "auto", "none", InferenceMode("float32", "none", torch.float32)),  # no kernels: 16 (unused)
])
def test_choice_table(flags, native, dtype, quantize, expected):
    assert choose_mode(dtype, quantize, flags, native=native) == expected


def test_choice_table_off_cpu_and_bad_values():
    assert choose_mode("auto", "none", AVX2_EPYC, device_type="cuda").dtype == "float32"
    assert choose_mode("bfloat16", "none", frozenset(), device_type="cuda").dtype == "bfloat16"
    with pytest.raises(ValueError, match="dtype"):
        choose_mode("float16", "none", AVX2_EPYC)
    with pytest.raises(ValueError, match="quantize"):
        choose_mode("auto", "int3", AVX2_EPYC)


def test_cpu_flags_are_read():
    if not open("/proc/cpuinfo").read().strip():
        pytest.skip("no /proc/cpuinfo")
    assert cpu_flags() and all(isinstance(flag, str) for flag in cpu_flags())


@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])
def test_auto_generates_what_its_chosen_mode_does(tiny_config, quantize):
    cfg = generation_config(tiny_config)
    model = tiny_model(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    mode = choose_mode("auto", quantize)
    auto = prepare_for_inference(copy.deepcopy(model), "auto", quantize)
    chosen = prepare_for_inference(copy.deepcopy(model), mode.dtype, mode.quantize)
    assert auto.tok_emb.weight.dtype == chosen.tok_emb.weight.dtype
    torch.testing.assert_close(auto(idx), chosen(idx), rtol=0, atol=0)
    assert torch.equal(generate(auto, idx, 12, stop_token_ids=()), generate(chosen, idx, 12, stop_token_ids=()))
    if quantize == "none":  # exact: the plain float32 model's greedy tokens
        assert torch.equal(generate(auto, idx, 12, stop_token_ids=()), generate(model, idx, 12, stop_token_ids=()))


@pytest.mark.parametrize("prefill_dtype", [torch.float32, torch.bfloat16])
def test_int8_prefill_dequantizes_to_the_chosen_dtype(prefill_dtype):
    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    q = Int8Linear(linear, prefill_dtype=prefill_dtype)
    x = torch.randn(40, 64).bfloat16()  # above MAX_DECODE_ROWS: the dequantized path
    weight = (q.rows()[:, :64].float() * q.scale[:, None]).to(prefill_dtype)  # each weight rounded once
    ref = torch.nn.functional.linear(x.to(prefill_dtype), weight, linear.bias.detach().to(prefill_dtype)).bfloat16()
    assert torch.equal(q(x), ref)


@pytest.mark.parametrize("kernel_rows, through_kernels", [(None, True), (64, True), (16, False)])
def test_a_quantized_prefill_runs_where_kernel_rows_says(kernel_rows, through_kernels, monkeypatch):
    """A product of 40 rows (a prefill) goes through gptforge's kernels up to `kernel_rows` rows
    (None: any number; choose_mode's choice where they run), else through the dequantized weights."""
    from gptforge.fast import kernels

    if not kernels.available():
        pytest.skip(f"gptforge kernels: {kernels.describe()}")
    torch.manual_seed(0)
    q = Int8Linear(nn.Linear(128, 96), prefill_dtype=torch.float32, kernel_rows=kernel_rows)
    x = torch.randn(40, 128)
    calls = []
    original = kernels.linear
    monkeypatch.setattr(kernels, "linear", lambda x, *a: calls.append(x.shape[0]) or original(x, *a))
    out = q(x)
    assert calls == ([40] if through_kernels else [])
    # either way the product of the same int8 weights: the kernels' also quantize x per block of 32
    weight = q.rows().float() * q.scale[:, None]
    torch.testing.assert_close(out, x @ weight.t() + q.bias, rtol=0.02, atol=0.05)


def test_scheduler_decodes_through_the_fast_view(tiny_config):
    from gptforge.scheduler import BatchScheduler

    model = tiny_model(generation_config(tiny_config))
    state = copy.deepcopy(model.state_dict())
    scheduler = BatchScheduler(model, max_batch_size=2)
    assert scheduler.model is inference_view(model) and scheduler.model is not model
    assert model.trf_blocks[0].att.fused_qkv is None and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_batching_scheduler_makes_the_float32_panels_when_it_starts(tiny_config):
    """The panel copy a float32 model's batch steps read is made at start, not in the first step
    that happens to have two sequences; a scheduler that never batches does not make it. (A plain
    model's inference view has none: it reads the model's own weights.)"""
    from gptforge.fast import kernels
    from gptforge.scheduler import BatchScheduler

    if not kernels.available():
        pytest.skip(f"gptforge kernels: {kernels.describe()}")
    for size, made in ((1, False), (2, True)):
        model = prepare_for_inference(tiny_model(generation_config(tiny_config)), "float32")  # as `serve` does
        scheduler = BatchScheduler(model, max_batch_size=size)
        scheduler.start()
        try:
            heads = [scheduler.model.out_head, scheduler.model.trf_blocks[0].ff.layers[0]]
            assert all((m.panel_copy is not None) == made for m in heads)
        finally:
            scheduler.stop()


def test_serve_cli_prepares_the_chosen_mode(monkeypatch, tmp_path, tiny_config):
    import gptforge
    import gptforge.serve
    from gptforge.cli import main

    gptforge.save(tiny_model(generation_config(tiny_config)), tmp_path / "ckpt")
    served = {}
    monkeypatch.setattr(gptforge.serve, "run_server", lambda model, settings, **kw: served.update(model=model))
    assert main(["serve", "--model", str(tmp_path / "ckpt"), "--quantize", "int8"]) == 0
    assert isinstance(served["model"].out_head, Int8Linear)
    assert main(["serve", "--model", str(tmp_path / "ckpt")]) == 0  # auto: float32 on the fast path's layers
    assert served["model"].tok_emb.weight.dtype == torch.float32
    assert isinstance(served["model"].out_head, Float32Linear)


@pytest.mark.parametrize("batch, prompt", [(4, 6), (8, 17)])
def test_float32_decode_steps_run_on_the_kernel_with_the_books_tokens(batch, prompt, tiny_config, monkeypatch):
    """Decode steps of 1..16 rows go through gptforge's kernels (where they run here: the whole
    step as one C call), and so does a prefill: a short one (4 x 6 tokens, under PREFILL_ROWS) as
    one C call too; a longer one (8 x 17) through PyTorch's attention with its products on the
    kernel (kernels.linear) where choose_mode's kernel_rows allow 136 rows on this CPU (else on
    MKL), then the head at the prompt's last position. Greedy tokens equal the book's
    generate_text_simple."""
    from gptforge import generate_text_simple
    from gptforge.fast import kernels
    from gptforge.fast import blocks as block
    from gptforge.fast.linears import Float32Linear

    cfg = generation_config(tiny_config)
    model = tiny_model(cfg)
    keys = list(model.state_dict())
    view = inference_view(model)
    assert isinstance(view.out_head, Float32Linear) and list(view.state_dict()) == keys
    calls, steps = [], []
    original, original_call = kernels.linear, block.call
    monkeypatch.setattr(kernels, "linear", lambda x, *a, **k: calls.append(tuple(x.shape)) or original(x, *a, **k))
    monkeypatch.setattr(block, "call", lambda name, *a: steps.append(name) or original_call(name, *a))
    idx = torch.randint(0, cfg.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(5))
    out = generate(model, idx, 10, stop_token_ids=())  # a prefill, then steps of `batch` rows
    assert torch.equal(out, generate_text_simple(copy.deepcopy(model).eval(), idx, 10, cfg.context_length))
    if not kernels.available():
        assert calls == [] and steps == []
        return
    assert type(view) is block.FusedGPTModel
    assert all(type(b) is block.FusedTransformerBlock for b in view.trf_blocks)
    rows, d = batch * prompt, cfg.emb_dim
    if rows <= block.PREFILL_ROWS:
        assert calls == [] and steps == ["gf_model_decode"] * 10
        return
    assert steps == ["gf_model_decode"] * 9
    att = view.trf_blocks[0].att
    assert att.fused_qkv is None  # an inference view multiplies the model's own q, k, v matrices
    on_kernel = rows <= (att.W_query.kernel_rows or rows)
    # per layer: query, key, value, out_proj, fc1 (d inputs each), fc2 (4 d inputs)
    assert calls == ([(rows, d)] * 5 + [(rows, 4 * d)]) * cfg.n_layers + [(batch, d)] if on_kernel \
        else calls == [(batch, d)]  # the head's rows, on the kernel whatever the prompt


def test_bf16_asked_for_on_a_cpu_without_bf16_hardware_warns(tiny_config, monkeypatch):
    """--dtype bfloat16 by name on a CPU without bf16 hardware (an AVX2-only EPYC's flags), where
    gptforge's kernels do not run, says that PyTorch emulates its products there; with bf16
    hardware, for 'auto', and where the kernels run (bf16 weights, float32 activations), nothing
    is said."""
    import warnings

    from gptforge import GPTModel
    from gptforge.fast import kernels, policy, prepare

    avx2_only = frozenset({"avx2", "fma", "f16c"})
    monkeypatch.setattr(policy, "cpu_flags", lambda: avx2_only)
    monkeypatch.setattr(prepare, "cpu_flags", lambda: avx2_only)
    if kernels.available():  # bf16 weights on the kernels: nothing emulated, nothing to say
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            prepare_for_inference(GPTModel(tiny_config()), "bfloat16")
    monkeypatch.setattr(kernels, "available", lambda: False)
    with pytest.warns(UserWarning, match="no bf16 hardware"):
        prepare_for_inference(GPTModel(tiny_config()), "bfloat16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_for_inference(GPTModel(tiny_config()), "auto")
        monkeypatch.setattr(policy, "cpu_flags", lambda: avx2_only | {"avx512_bf16"})
        monkeypatch.setattr(prepare, "cpu_flags", lambda: avx2_only | {"avx512_bf16"})
        prepare_for_inference(GPTModel(tiny_config()), "bfloat16")
