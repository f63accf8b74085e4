"""gptforge.io: atomic files and directories, and the safetensors reader's errors."""

from __future__ import annotations

import pytest
import torch

import gptforge
from gptforge.checkpoint import CHECKPOINT_FILES
from gptforge.io import atomic_directory, atomic_write, atomic_write_bytes, read_safetensors


def _tiny(tiny_config, seed: int = 0) -> gptforge.GPTModel:
    torch.manual_seed(seed)
    return gptforge.GPTModel(tiny_config()).eval()


def test_failed_write_leaves_old_checkpoint_intact(tmp_path, tiny_config):
    gptforge.save(_tiny(tiny_config, seed=0), tmp_path / "ckpt")
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

    def boom(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, boom)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_truncated_safetensors_named_without_checksum(tmp_path, tiny_config):
    gptforge.save(_tiny(tiny_config), tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        read_safetensors(cut)
    cut.write_bytes(weights.read_bytes()[:4])
    with pytest.raises(ValueError, match="truncated"):
        read_safetensors(cut)
