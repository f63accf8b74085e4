"""LoRA adapter checkpoints: only the adapters (and a classifier's head) are stored, the base is named
by path and checksum and comes back on load; a missing or changed base is a clear error; merging
writes a plain checkpoint (gptforge or Hugging Face) with the adapter model's outputs."""

from __future__ import annotations

import json

import pytest
import torch

import gptforge
from gptforge.checkpoint import detect_format, load, save
from gptforge.classifier import to_classifier
from gptforge.errors import GptforgeError
from gptforge.lora import apply_lora, has_lora, lora_layers, merge_lora
from gptforge.model import GPTModel


def _adapted(tiny_config, tmp_path, classifier: bool):
    """A saved base, and a LoRA model on it with non-zero B matrices (a fresh adapter is a no-op)."""
    torch.manual_seed(0)
    base = GPTModel(tiny_config(vocab_size=50257, tie_weights=not classifier))
    save(base, tmp_path / "base")
    model = load(tmp_path / "base")
    if classifier:
        to_classifier(model, ["no", "yes"], max_length=8)
    apply_lora(model, rank=2, alpha=4, targets="W_query,W_value,ff,out_head")
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora.B, std=0.02)
    model.lora_base = str(tmp_path / "base")
    return model


@pytest.mark.parametrize("classifier", [False, True], ids=["lm", "classifier"])
def test_adapter_holds_only_adapters_and_loads_back_through_its_base(tiny_config, tmp_path, classifier):
    model = _adapted(tiny_config, tmp_path, classifier)
    save(model, tmp_path / "adapter")
    assert detect_format(tmp_path / "adapter") == "lora"
    meta = json.loads((tmp_path / "adapter" / "config.json").read_text())
    base_meta = json.loads((tmp_path / "base" / "config.json").read_text())
    assert meta["lora"]["base_sha256"] == base_meta["sha256"]["model.safetensors"]
    assert meta["lora"]["rank"] == 2 and meta["lora"]["alpha"] == 4
    stored = gptforge.checkpoint.read_safetensors(tmp_path / "adapter" / "model.safetensors")
    lora_tensors = {k for k in stored if ".lora." in k}
    assert len(lora_tensors) == 2 * len(lora_layers(model))
    assert set(stored) - lora_tensors == ({"out_head.linear.weight", "out_head.linear.bias"} if classifier else set())
    loaded = load(tmp_path / "adapter")
    assert has_lora(loaded) and loaded.cfg == model.cfg
    x = torch.randint(0, 50257, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), atol=1e-6, rtol=0)
    assert gptforge.checkpoint.load_config(tmp_path / "adapter") == model.cfg


def test_merge_lora_convert_writes_plain_checkpoints_with_the_same_outputs(tiny_config, tmp_path):
    from gptforge.cli import main

    model = _adapted(tiny_config, tmp_path, classifier=False)
    save(model, tmp_path / "adapter")
    x = torch.randint(0, 50257, (2, 8))
    with torch.no_grad():
        expected = model.eval()(x)
    for to in ("gptforge", "hf"):
        assert main(["convert", str(tmp_path / "adapter"), "--merge-lora", "--to", to, "--out", str(tmp_path / to)]) == 0
        merged = load(tmp_path / to)
        assert not has_lora(merged) and detect_format(tmp_path / to) == to
        with torch.no_grad():
            torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)  # logits ~20: float32 ulps
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, expected, atol=1e-4, rtol=0)
    with pytest.raises(GptforgeError, match="merge it first"):
        save(model, tmp_path / "nope", format="hf")


def test_classifier_merges_but_has_no_hf_form(tiny_config, tmp_path):
    model = _adapted(tiny_config, tmp_path, classifier=True)
    merged = merge_lora(model)
    save(merged, tmp_path / "plain")
    x = torch.randint(0, 50257, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "plain")(x), merged.eval()(x), atol=1e-6, rtol=0)
    with pytest.raises(GptforgeError, match="GPT2ForSequenceClassification"):
        save(merged, tmp_path / "hf", format="hf")


def test_missing_or_changed_base_is_one_line_and_exit_2(tiny_config, tmp_path, capsys):
    from gptforge.cli import main

    model = _adapted(tiny_config, tmp_path, classifier=True)
    save(model, tmp_path / "adapter")
    torch.manual_seed(1)
    save(GPTModel(tiny_config(vocab_size=50257)), tmp_path / "base")  # another model at the same path
    with pytest.raises(GptforgeError, match="weights changed"):
        load(tmp_path / "adapter")
    assert main(["classify", "--model", str(tmp_path / "adapter"), "hello"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "weights changed" in err
    (tmp_path / "base").rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match="not there any more"):
        load(tmp_path / "adapter")
    assert main(["classify", "--model", str(tmp_path / "adapter"), "hello"]) == 2
    with pytest.raises(GptforgeError, match="preset"):
        m = GPTModel(tiny_config(vocab_size=50257))
        apply_lora(m, rank=1, alpha=1)
        m.lora_base = "gpt2-124m"
        save(m, tmp_path / "x")
