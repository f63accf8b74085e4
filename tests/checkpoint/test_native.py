"""Our checkpoint format (checkpoint/native.py): round trip, training state, checksums, overwriting,
and clear errors for bad files. Atomic writes themselves: tests/test_io.py."""

from __future__ import annotations

import json
import os

import pytest
import torch

import gptforge
from gptforge.config import GPTConfig



@pytest.fixture
def tiny(tiny_config) -> GPTConfig:
    """The conftest tiny config with a tied head (97 tokens, context 32)."""
    return GPTConfig(**tiny_config(context_length=32), tie_weights=True)


def _tiny(cfg: GPTConfig, seed: int = 0) -> gptforge.GPTModel:
    torch.manual_seed(seed)
    return gptforge.GPTModel(cfg).eval()


def _ids() -> torch.Tensor:
    return torch.tensor([[1, 5, 9, 3, 50 % 97, 7]])


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_keeps_config_weights_and_tying(tmp_path, tiny, tie):
    model = _tiny(tiny.replace(tie_weights=tie, qkv_bias=not tie))
    gptforge.save(model, tmp_path / "ckpt")
    loaded = gptforge.load(tmp_path / "ckpt")
    assert loaded.cfg == model.cfg
    assert not loaded.training
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (loaded.out_head.weight is loaded.tok_emb.weight) == tie
    assert loaded.num_parameters() == model.num_parameters()
    with torch.no_grad():
        torch.testing.assert_close(loaded(_ids()), model(_ids()), rtol=0, atol=0)
    assert gptforge.load_training_state(tmp_path / "ckpt") is None


def test_training_state_round_trip(tmp_path, tiny):
    model = _tiny(tiny)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(_ids()).sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "step": 7, "rng": torch.get_rng_state(), "tokens_seen": 1234}
    gptforge.save(model, tmp_path / "ckpt", training_state=state)
    back = gptforge.load_training_state(tmp_path / "ckpt")
    assert back["step"] == 7 and back["tokens_seen"] == 1234
    assert torch.equal(back["rng"], state["rng"])
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(back["optimizer"])
    torch.testing.assert_close(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_overwrite_replaces_whole_directory_and_leaves_no_temporaries(tmp_path, tiny):
    gptforge.save(_tiny(tiny, seed=0), tmp_path / "ckpt", training_state={"step": 1})
    gptforge.save(_tiny(tiny, seed=1), tmp_path / "ckpt")  # no training state this time
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    torch.testing.assert_close(gptforge.load(tmp_path / "ckpt").tok_emb.weight, _tiny(tiny, seed=1).tok_emb.weight)


def test_saved_files_get_ordinary_permissions(tmp_path, tiny):
    """Temporary files are private (0600) until renamed; a saved checkpoint must not stay so, or
    nobody else on a shared machine or cluster could read it: it gets what open()/mkdir() give."""
    gptforge.save(_tiny(tiny), tmp_path / "ckpt", training_state={"step": 1})
    (tmp_path / "plain.txt").write_text("x")
    (tmp_path / "plain").mkdir()
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "ckpt") == mode(tmp_path / "plain")
    for file in (tmp_path / "ckpt").iterdir():
        assert mode(file) == mode(tmp_path / "plain.txt"), file.name


def test_truncated_weights_fail_checksum(tmp_path, tiny):
    gptforge.save(_tiny(tiny), tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="checksum.*truncated or corrupted"):
        gptforge.load(tmp_path / "ckpt")


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_flipped_byte_fails_checksum(tmp_path, tiny, dtype):
    """Both routes: in the saved dtype (the file read once, hashed as it comes in) and converted
    (hashed, then each tensor read)."""
    gptforge.save(_tiny(tiny), tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        gptforge.load(tmp_path / "ckpt", dtype=dtype)


def _edit_config(ckpt, **changes):
    """Change config.json's values and its own checksum with them (a config that is wrong, not corrupted)."""
    from gptforge.checkpoint.native import config_digest

    path = ckpt / "config.json"
    meta = json.loads(path.read_text())
    meta.update(changes)
    meta["sha256"]["config.json"] = config_digest(meta)
    path.write_text(json.dumps(meta))


def test_mismatched_config_names_the_problem(tmp_path, tiny):
    gptforge.save(_tiny(tiny), tmp_path / "ckpt")
    _edit_config(tmp_path / "ckpt", vocab_size=100)
    with pytest.raises(ValueError, match=r"tok_emb.weight has shape \(97, 32\).*vocab_size 97, the config 100"):
        gptforge.load(tmp_path / "ckpt")
    _edit_config(tmp_path / "ckpt", vocab_size=97, n_layers=3)
    with pytest.raises(ValueError, match=r"missing tensors trf_blocks.2"):
        gptforge.load(tmp_path / "ckpt")
    _edit_config(tmp_path / "ckpt", n_layers=2, emb_dim=64, n_heads=4)
    with pytest.raises(ValueError, match=r"has shape .* expects"):
        gptforge.load(tmp_path / "ckpt")


def test_missing_files_and_bad_config(tmp_path, tiny):
    gptforge.save(_tiny(tiny), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        gptforge.load(tmp_path / "ckpt")
    gptforge.save(_tiny(tiny), tmp_path / "ckpt")
    os.remove(tmp_path / "ckpt" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        gptforge.load(tmp_path / "ckpt")
    gptforge.save(_tiny(tiny), tmp_path / "ckpt")
    _edit_config(tmp_path / "ckpt", format_version=99)
    with pytest.raises(ValueError, match="version 99 is not supported"):
        gptforge.load(tmp_path / "ckpt")


def test_unknown_save_format(tmp_path, tiny):
    with pytest.raises(ValueError, match="unknown checkpoint format 'onnx'"):
        gptforge.save(_tiny(tiny), tmp_path / "x", format="onnx")


def test_dtype_on_load(tmp_path, tiny):
    gptforge.save(_tiny(tiny), tmp_path / "ckpt")
    model = gptforge.load(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert model.tok_emb.weight.dtype == torch.bfloat16
    assert model.out_head.weight is model.tok_emb.weight


def test_training_state_that_weights_only_cannot_read_is_refused_at_save(tmp_path, tiny):
    import random

    import numpy as np

    model = _tiny(tiny)
    sched = torch.optim.lr_scheduler.LinearLR(torch.optim.SGD(model.parameters(), lr=0.1))
    ok = {"scheduler": sched.state_dict(), "python_rng": random.getstate(), "dtype": torch.float32}
    gptforge.save(model, tmp_path / "ok", training_state=ok)
    assert gptforge.load_training_state(tmp_path / "ok")["python_rng"] == random.getstate()
    with pytest.raises(ValueError, match=r"training_state\['rng'\]\['numpy'\] is a numpy.ndarray"):
        gptforge.save(model, tmp_path / "bad", training_state={"rng": {"numpy": np.zeros(3)}})
    assert not (tmp_path / "bad").exists()


def test_save_never_replaces_a_directory_that_is_not_a_checkpoint(tmp_path, tiny):
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match=r"holds other things than a checkpoint \(notes.txt\); refusing"):
        gptforge.save(_tiny(tiny), project)
    assert (project / "notes.txt").read_text() == "precious"
    (tmp_path / "empty").mkdir()
    gptforge.save(_tiny(tiny), tmp_path / "empty", format="hf")  # an empty directory is fine
    gptforge.save(_tiny(tiny), tmp_path / "empty")  # and so is a checkpoint, in either format
    assert gptforge.load(tmp_path / "empty").cfg == tiny


def test_config_json_is_covered_by_its_own_checksum(tmp_path, tiny):
    """One bit flipped in config.json (n_heads 4 -> 5: a model that loads and generates other text)
    fails its checksum; re-indenting the file does not; a checkpoint saved before config.json kept
    its own checksum still loads."""
    gptforge.save(_tiny(tiny), tmp_path / "ckpt")
    config = tmp_path / "ckpt" / "config.json"
    text = config.read_text()
    assert '"n_heads": 4' in text
    config.write_text(text.replace('"n_heads": 4', '"n_heads": 5'))  # '4' is 0x34, '5' 0x35: one bit
    with pytest.raises(ValueError, match="config.json fails its checksum: a value in it changed"):
        gptforge.load(tmp_path / "ckpt")
    meta = json.loads(text)
    config.write_text(json.dumps(meta, indent=None))
    assert gptforge.load(tmp_path / "ckpt").cfg.n_heads == 4
    del meta["sha256"]["config.json"]
    config.write_text(json.dumps({**meta, "n_heads": 2}))
    assert gptforge.load(tmp_path / "ckpt").cfg.n_heads == 2


def test_the_built_in_model_keeps_its_config_checksum():
    from gptforge.checkpoint.native import config_digest

    meta = json.loads((gptforge.checkpoint.builtin_model_path("gptforge-shakespeare") / "config.json").read_text())
    assert meta["sha256"]["config.json"] == config_digest(meta)
