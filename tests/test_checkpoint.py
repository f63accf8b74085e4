"""Our checkpoint format: round trip, atomic writes, checksums, and clear errors for bad files."""

from __future__ import annotations

import json
import os

import pytest
import torch

import gptforge
from gptforge.checkpoint import CHECKPOINT_FILES, atomic_directory, atomic_write_bytes, read_safetensors
from gptforge.config import GPTConfig

TINY = GPTConfig(vocab_size=97, context_length=32, emb_dim=32, n_heads=4, n_layers=2, qkv_bias=True,
                 tie_weights=True)


def _tiny(cfg: GPTConfig = TINY, seed: int = 0) -> gptforge.GPTModel:
    torch.manual_seed(seed)
    return gptforge.GPTModel(cfg).eval()


def _ids() -> torch.Tensor:
    return torch.tensor([[1, 5, 9, 3, 50 % 97, 7]])


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_keeps_config_weights_and_tying(tmp_path, tie):
    model = _tiny(TINY.replace(tie_weights=tie, qkv_bias=not tie))
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


def test_training_state_round_trip(tmp_path):
    model = _tiny()
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


def test_overwrite_replaces_whole_directory_and_leaves_no_temporaries(tmp_path):
    gptforge.save(_tiny(seed=0), tmp_path / "ckpt", training_state={"step": 1})
    gptforge.save(_tiny(seed=1), tmp_path / "ckpt")  # no training state this time
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    torch.testing.assert_close(gptforge.load(tmp_path / "ckpt").tok_emb.weight, _tiny(seed=1).tok_emb.weight)


def test_saved_files_get_ordinary_permissions(tmp_path):
    """Temporary files are private (0600) until renamed; a saved checkpoint must not stay so, or
    nobody else on a shared machine or cluster could read it: it gets what open()/mkdir() give."""
    gptforge.save(_tiny(), tmp_path / "ckpt", training_state={"step": 1})
    (tmp_path / "plain.txt").write_text("x")
    (tmp_path / "plain").mkdir()
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "ckpt") == mode(tmp_path / "plain")
    for file in (tmp_path / "ckpt").iterdir():
        assert mode(file) == mode(tmp_path / "plain.txt"), file.name


def test_failed_write_leaves_old_checkpoint_intact(tmp_path):
    gptforge.save(_tiny(seed=0), tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_directory(tmp_path / "ckpt", CHECKPOINT_FILES) as tmp:
            (tmp / "model.safetensors").write_bytes(b"partial")
            raise RuntimeError("crash")
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    gptforge.load(tmp_path / "ckpt")


def test_atomic_write_bytes_failure_keeps_old_file(tmp_path):
    target = tmp_path / "f.json"
    atomic_write_bytes(target, b"old")
    from gptforge.checkpoint import atomic_write

    def boom(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, boom)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_truncated_weights_fail_checksum(tmp_path):
    gptforge.save(_tiny(), tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="checksum.*truncated or corrupted"):
        gptforge.load(tmp_path / "ckpt")


def test_flipped_byte_fails_checksum(tmp_path):
    gptforge.save(_tiny(), tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        gptforge.load(tmp_path / "ckpt")


def test_truncated_safetensors_named_without_checksum(tmp_path):
    gptforge.save(_tiny(), tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        read_safetensors(cut)
    cut.write_bytes(weights.read_bytes()[:4])
    with pytest.raises(ValueError, match="truncated"):
        read_safetensors(cut)


def _edit_config(ckpt, **changes):
    path = ckpt / "config.json"
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


def test_mismatched_config_names_the_problem(tmp_path):
    gptforge.save(_tiny(), tmp_path / "ckpt")
    _edit_config(tmp_path / "ckpt", vocab_size=100)
    with pytest.raises(ValueError, match=r"tok_emb.weight has shape \(97, 32\).*vocab_size 97, the config 100"):
        gptforge.load(tmp_path / "ckpt")
    _edit_config(tmp_path / "ckpt", vocab_size=97, n_layers=3)
    with pytest.raises(ValueError, match=r"missing tensors trf_blocks.2"):
        gptforge.load(tmp_path / "ckpt")
    _edit_config(tmp_path / "ckpt", n_layers=2, emb_dim=64, n_heads=4)
    with pytest.raises(ValueError, match=r"has shape .* expects"):
        gptforge.load(tmp_path / "ckpt")


def test_missing_files_and_bad_config(tmp_path):
    gptforge.save(_tiny(), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        gptforge.load(tmp_path / "ckpt")
    gptforge.save(_tiny(), tmp_path / "ckpt")
    os.remove(tmp_path / "ckpt" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        gptforge.load(tmp_path / "ckpt")
    gptforge.save(_tiny(), tmp_path / "ckpt")
    _edit_config(tmp_path / "ckpt", format_version=99)
    with pytest.raises(ValueError, match="version 99 is not supported"):
        gptforge.load(tmp_path / "ckpt")


def test_unknown_save_format(tmp_path):
    with pytest.raises(ValueError, match="unknown checkpoint format 'onnx'"):
        gptforge.save(_tiny(), tmp_path / "x", format="onnx")


def test_dtype_on_load(tmp_path):
    gptforge.save(_tiny(), tmp_path / "ckpt")
    model = gptforge.load(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert model.tok_emb.weight.dtype == torch.bfloat16
    assert model.out_head.weight is model.tok_emb.weight


PEAK_RSS = r"""
import sys, gptforge
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
gptforge.load(sys.argv[2])  # warm up: lazy imports and one-off allocations
open("/proc/self/clear_refs", "w").write("5")  # reset the RSS high-water mark
before = status("VmRSS")
model = gptforge.load(sys.argv[1])
print(status("VmHWM") - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to measure RSS")
def test_loading_peak_memory_stays_within_1_5x_the_weights(tmp_path):
    """Hugging Face safetensors, the route with transposes and splits (ours only reads)."""
    import subprocess
    import sys
    from pathlib import Path

    cfg = GPTConfig(vocab_size=50257, context_length=256, emb_dim=256, n_heads=4, n_layers=6, qkv_bias=True,
                    tie_weights=True)
    torch.manual_seed(0)
    model = gptforge.GPTModel(cfg)
    weights = model.num_parameters() * 4  # ~68 MiB
    gptforge.save(model, tmp_path / "big", format="hf")
    gptforge.save(gptforge.GPTModel(cfg.replace(n_layers=1, vocab_size=64)), tmp_path / "small", format="hf")
    del model
    src = Path(__file__).resolve().parents[1] / "src"
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(tmp_path / "big"), str(tmp_path / "small")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(src)})
    assert out.returncode == 0, out.stderr
    peak = int(out.stdout.split()[-1])
    assert weights * 0.9 < peak < weights * 1.5, (peak, weights)


def test_training_state_that_weights_only_cannot_read_is_refused_at_save(tmp_path):
    import random

    import numpy as np

    model = _tiny()
    sched = torch.optim.lr_scheduler.LinearLR(torch.optim.SGD(model.parameters(), lr=0.1))
    ok = {"scheduler": sched.state_dict(), "python_rng": random.getstate(), "dtype": torch.float32}
    gptforge.save(model, tmp_path / "ok", training_state=ok)
    assert gptforge.load_training_state(tmp_path / "ok")["python_rng"] == random.getstate()
    with pytest.raises(ValueError, match=r"training_state\['rng'\]\['numpy'\] is a numpy.ndarray"):
        gptforge.save(model, tmp_path / "bad", training_state={"rng": {"numpy": np.zeros(3)}})
    assert not (tmp_path / "bad").exists()


def test_save_never_replaces_a_directory_that_is_not_a_checkpoint(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match=r"holds other things than a checkpoint \(notes.txt\); refusing"):
        gptforge.save(_tiny(), project)
    assert (project / "notes.txt").read_text() == "precious"
    (tmp_path / "empty").mkdir()
    gptforge.save(_tiny(), tmp_path / "empty", format="hf")  # an empty directory is fine
    gptforge.save(_tiny(), tmp_path / "empty")  # and so is a checkpoint, in either format
    assert gptforge.load(tmp_path / "empty").cfg == TINY
