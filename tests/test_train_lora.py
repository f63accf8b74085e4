"""`gptforge train --lora-rank`: the phases train only the adapters of a saved base, save an adapter
checkpoint, and resume from it exactly."""

from __future__ import annotations

import json

import pytest
import torch

from gptforge.checkpoint import detect_format, load, save
from gptforge.errors import GptforgeError
from gptforge.lora import has_lora, lora_layers
from gptforge.model import GPTModel
from gptforge.train import train

TEXT = "Every effort moves you forward, one small step at a time, until the work is done. " * 40


def _losses(out) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_lora_training_saves_adapters_only_and_resumes_exactly(tiny_config, tmp_path):
    torch.manual_seed(0)
    base = GPTModel(tiny_config(vocab_size=50257, tie_weights=True))
    save(base, tmp_path / "base")
    (tmp_path / "text.txt").write_text(TEXT)
    options = dict(data=str(tmp_path / "text.txt"), model=str(tmp_path / "base"), batch_size=2, eval_every=0,
                   sample_tokens=0, progress=False, device="cpu", precision="fp32", lora_rank=2, lora_alpha=4,
                   lora_targets="W_query,W_value,out_head", lr=1e-3, schedule="constant")
    train(out=str(tmp_path / "straight"), max_steps=4, **options)
    train(out=str(tmp_path / "resumed"), max_steps=2, **options)
    train(out=str(tmp_path / "resumed"), max_steps=4, resume=True, **options)
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")

    ckpt = tmp_path / "straight" / "checkpoint"
    assert detect_format(ckpt) == "lora"
    model = load(ckpt)
    assert has_lora(model) and len(lora_layers(model)) == 2 * 2 + 1
    base_state = base.state_dict()
    for name, tensor in model.state_dict().items():  # the base weights did not move
        if ".lora." not in name:
            assert torch.equal(tensor, base_state[name.replace(".linear.", ".")])
    assert any(layer.lora.B.abs().sum() > 0 for layer in lora_layers(model).values())


def test_lora_on_a_model_config_is_refused(tiny_config, tmp_path):
    """A config JSON is random weights: an adapter checkpoint on it could never be loaded again
    (its base is no checkpoint), so the run is refused before it trains, like a preset."""
    (tmp_path / "cfg.json").write_text(json.dumps(tiny_config(vocab_size=50257)))
    (tmp_path / "text.txt").write_text(TEXT)
    with pytest.raises(GptforgeError, match="needs a saved base model, and .*cfg.json is a model config"):
        train(data=str(tmp_path / "text.txt"), model=str(tmp_path / "cfg.json"), out=str(tmp_path / "run"),
              lora_rank=2, max_steps=1, sample_tokens=0, progress=False, device="cpu")
    assert not (tmp_path / "run" / "checkpoint").exists()
