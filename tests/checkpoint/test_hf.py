"""Hugging Face GPT-2 directories (checkpoint/hf.py): configs and weights that cannot be loaded,
the export (a plain GPT-2 directory with GPT-2's tokenizer, loaded by transformers offline), and
the loader's peak memory. Parity of every route: test_parity.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gptforge
from gptforge.checkpoint import read_safetensors
from hf_reference import edit_json, save_reference_hf

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-4


@pytest.fixture
def hf_dir(tmp_path):
    return save_reference_hf(tmp_path / "hf")


@pytest.mark.parametrize("changes, message", [
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon 1e-06 is not supported"),
    ({"activation_function": "relu"}, "activation_function 'relu' is not supported"),
    ({"n_inner": 100}, "n_inner=100 is not supported"),
    ({"vocab_size": 50000}, r"tok_emb.weight has shape \(50257, 32\).*vocab_size 50257, the config 50000"),
    ({"n_layer": 3}, "missing tensors trf_blocks.2"),
    ({"n_embd": 64}, "has shape"),
    ({"n_head": 5}, "must be divisible by n_heads"),
])
def test_bad_hf_configs_are_named(hf_dir, changes, message):
    edit_json(hf_dir / "config.json", **changes)
    with pytest.raises(ValueError, match=message):
        gptforge.load(hf_dir)


def test_bad_hf_weights_are_named(hf_dir):
    from safetensors.torch import save_file

    weights = hf_dir / "model.safetensors"
    tensors = read_safetensors(weights)
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) - 1000])
    with pytest.raises(ValueError, match="truncated"):
        gptforge.load(hf_dir)
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match="header is not valid JSON"):
        gptforge.load(hf_dir)
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors trf_blocks.1.ff.layers.0.bias"):
        gptforge.load(hf_dir)
    tensors["transformer.h.1.mlp.c_fc.bias"] = torch.zeros(128)
    tensors["transformer.h.0.mlp.c_gate.weight"] = torch.zeros(3)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="unexpected tensor 'transformer.h.0.mlp.c_gate.weight'"):
        gptforge.load(hf_dir)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors or pytorch_model.bin"):
        gptforge.load(hf_dir)


def test_untied_config_without_head_is_an_error(hf_dir):
    edit_json(hf_dir / "config.json", tie_word_embeddings=False)
    with pytest.raises(ValueError, match="no lm_head.weight"):
        gptforge.load(hf_dir)


PEAK_RSS = r"""
import sys, gptforge
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
gptforge.load(sys.argv[2])  # warm up: lazy imports and one-off allocations
open("/proc/self/clear_refs", "w").write("5")  # reset the RSS high-water mark
before, anon = status("VmRSS"), status("RssAnon")
model = gptforge.load(sys.argv[1])
# memory-mapped: the load reads every weight once (it refuses NaN or inf), so the file's pages are
# resident, but as the file's (RssFile, given back under pressure), not copied into the process's own
lazy = status("RssAnon") - anon
for p in model.parameters():  # touch every weight: the mapped pages become resident
    float(p.sum())
print(lazy, status("VmHWM") - before)
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to measure RSS")
def test_loading_peak_memory_stays_within_1_5x_the_weights(tmp_path):
    """Hugging Face safetensors, the route with transposes and splits (ours only reads), memory-mapped."""
    cfg = gptforge.GPTConfig(vocab_size=50257, context_length=256, emb_dim=256, n_heads=4, n_layers=6,
                             qkv_bias=True, tie_weights=True)
    torch.manual_seed(0)
    model = gptforge.GPTModel(cfg)
    weights = model.num_parameters() * 4  # ~68 MiB
    gptforge.save(model, tmp_path / "big", format="hf")
    gptforge.save(gptforge.GPTModel(cfg.replace(n_layers=1, vocab_size=64)), tmp_path / "small", format="hf")
    del model
    src = ROOT / "src"
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(tmp_path / "big"), str(tmp_path / "small")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(src)})
    assert out.returncode == 0, out.stderr
    lazy, peak = (int(v) for v in out.stdout.split()[-2:])
    assert lazy < weights * 0.5, (lazy, weights)  # the file is mapped, not copied into memory
    assert weights * 0.9 < peak < weights * 1.5, (peak, weights)


# ---------------------------------------------------------------------------------------------
# The export: a plain GPT-2 directory with GPT-2's tokenizer


def test_hf_export_is_a_plain_gpt2_directory(tmp_path, tiny_config):
    torch.manual_seed(0)
    fields = tiny_config(vocab_size=50257, context_length=64, n_heads=2, qkv_bias=False)
    model = gptforge.GPTModel(gptforge.GPTConfig(**fields, tie_weights=False))
    gptforge.save(model, tmp_path / "hf", format="hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]
    assert cfg["activation_function"] == "gelu_new" and cfg["layer_norm_epsilon"] == 1e-5
    assert cfg["tie_word_embeddings"] is False and cfg["eos_token_id"] == 50256
    keys = read_safetensors(tmp_path / "hf" / "model.safetensors")
    assert "lm_head.weight" in keys and keys["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)
    assert torch.count_nonzero(keys["transformer.h.0.attn.c_attn.bias"]) == 0  # no qkv bias: zeros
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([[15496, 11, 314, 716]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model.eval()(ids), rtol=0, atol=ATOL)


TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "generation_config.json"}


@pytest.fixture
def offline(monkeypatch):
    """No network for transformers / huggingface_hub, as on a cluster node."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def _gpt2_vocab_model(tiny_config, seed: int = 0, **changes) -> gptforge.GPTModel:
    torch.manual_seed(seed)
    return gptforge.GPTModel(tiny_config(**{"vocab_size": 50257, "context_length": 64, **changes})).eval()


def test_hf_export_tokenizer_gives_our_ids_on_the_verdict(tmp_path, tiny_config, data_dir, offline):
    tokenizers = pytest.importorskip("tokenizers")
    gptforge.save(_gpt2_vocab_model(tiny_config), tmp_path / "hf", format="hf")
    assert TOKENIZER_FILES <= {p.name for p in (tmp_path / "hf").iterdir()}
    text = (data_dir / "the-verdict.txt").read_text(encoding="utf-8") + "<|endoftext|>Hello"
    ours = gptforge.get_tokenizer().encode(text)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok(text)["input_ids"] == ours
    assert tok.decode(ours) == text
    assert (tok.bos_token_id, tok.eos_token_id) == (50256, 50256)
    # tokenizer.json on its own (what vLLM and the `tokenizers` library read), not vocab.json + merges.txt
    fast = tokenizers.Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    assert fast.encode(text).ids == ours and fast.decode(ours, skip_special_tokens=False) == text
    # vocab.json + merges.txt on their own (what readers without `tokenizers` use)
    (tmp_path / "hf" / "tokenizer.json").unlink()
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")(text)["input_ids"] == ours
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 50256, "eos_token_id": 50256, "pad_token_id": 50256}
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "hf").eos_token_id == 50256


def test_hf_export_pipeline_generates_our_greedy_text(tmp_path, tiny_config, offline):
    model = _gpt2_vocab_model(tiny_config)
    gptforge.save(model, tmp_path / "hf", format="hf")
    prompt = "Every effort moves you"
    pipe = transformers.pipeline("text-generation", model=str(tmp_path / "hf"), device="cpu")
    theirs = pipe(prompt, max_new_tokens=24, do_sample=False)[0]["generated_text"]
    ours = gptforge.generate_text(model, prompt, max_new_tokens=24)
    assert theirs == ours and len(ours) > len(prompt)


def test_only_gpt2_vocabularies_get_tokenizer_files(tmp_path, tiny_config):
    torch.manual_seed(0)
    gptforge.save(gptforge.GPTModel(tiny_config()), tmp_path / "small", format="hf")  # 97 tokens: not GPT-2's
    assert {p.name for p in (tmp_path / "small").iterdir()} == {"config.json", "model.safetensors"}
    padded = _gpt2_vocab_model(tiny_config, vocab_size=50304)  # nanoGPT's padding: GPT-2's ids and more
    gptforge.save(padded, tmp_path / "padded", format="hf")
    assert TOKENIZER_FILES <= {p.name for p in (tmp_path / "padded").iterdir()}
    assert transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "padded").config.vocab_size == 50304


def test_an_export_can_be_replaced_by_another_save(tmp_path, tiny_config):
    gptforge.save(_gpt2_vocab_model(tiny_config), tmp_path / "out", format="hf")
    gptforge.save(_gpt2_vocab_model(tiny_config, seed=1), tmp_path / "out", format="hf")
    gptforge.save(_gpt2_vocab_model(tiny_config, seed=2), tmp_path / "out")  # ours replaces it whole
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"config.json", "model.safetensors"}
