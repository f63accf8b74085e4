"""gptforge.io: atomic files and directories, hashing while reading, and the safetensors reader."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct

import pytest
import torch

import gptforge
from gptforge.checkpoint import CHECKPOINT_FILES
from gptforge.errors import GptforgeError
from gptforge.io import (atomic_directory, atomic_write, atomic_write_bytes, read_hashed, read_safetensors,
                         read_safetensors_from)


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


class _ShortReads(io.FileIO):
    """A file whose reads stop halfway, as a file shrinking under the reader's feet."""

    def readinto(self, buffer):
        return super().readinto(memoryview(buffer)[:len(buffer) // 2])


@pytest.mark.parametrize("size, chunk", [(0, 16), (5, 16), (100, 16), (64, 16), (1 << 20, 1 << 16)])
def test_read_hashed_is_the_whole_file_and_its_sha256(tmp_path, size, chunk):
    """read_hashed hashes chunk i on its thread while chunk i + 1 is read: the bytes and the digest
    must still be the file's, in order, for files of no chunk, part of one, whole ones and a rest."""
    data = os.urandom(size)
    (tmp_path / "f").write_bytes(data)
    with open(tmp_path / "f", "rb") as f:
        f.read(3)  # from the start, wherever the handle was
        got, digest = read_hashed(f, chunk_bytes=chunk)
    assert bytes(got) == data and digest == hashlib.sha256(data).hexdigest()
    with _ShortReads(tmp_path / "f", "rb") as f:
        if size:
            with pytest.raises(GptforgeError, match="shrank"):
                read_hashed(f, chunk_bytes=chunk)


def test_safetensors_from_bytes_in_memory_are_the_files_tensors(tmp_path):
    """read_safetensors_from(data=...) (the native loader's route: views of the verified bytes)
    gives what safetensors itself reads, also for an empty tensor; the views can be saved again
    (safetensors refuses tensors that share one storage). A tensor at an offset its dtype cannot
    view (other writers than safetensors' own may leave one) is copied out instead."""
    from safetensors.torch import load_file, save_file

    tensors = {"a": torch.randn(3, 5), "odd": torch.tensor([7], dtype=torch.uint8), "b": torch.randn(4, 2),
               "e": torch.empty(0, 3), "h": torch.randn(6).half()}
    save_file(tensors, tmp_path / "t.safetensors")
    with open(tmp_path / "t.safetensors", "rb") as f:
        data, _ = read_hashed(f)
    got = read_safetensors_from(None, tmp_path / "t.safetensors", lambda name: True, None, data=data)
    reference = load_file(tmp_path / "t.safetensors")
    assert got.keys() == reference.keys()
    for name in reference:
        assert got[name].dtype == reference[name].dtype and torch.equal(got[name], reference[name]), name
    as_float = read_safetensors_from(None, tmp_path / "t.safetensors", lambda name: name != "odd", torch.float32, data=data)
    assert as_float.keys() == {"a", "b", "e", "h"} and as_float["h"].dtype == torch.float32
    save_file(got, tmp_path / "again.safetensors")
    assert all(torch.equal(t, reference[n]) for n, t in load_file(tmp_path / "again.safetensors").items())
    header = json.dumps({"odd": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                         "a": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]}}).encode()
    header += b" " * (-len(header) % 8)
    (tmp_path / "unaligned.safetensors").write_bytes(
        struct.pack("<Q", len(header)) + header + b"\x07" + struct.pack("<2f", 1.5, -2.0))
    with open(tmp_path / "unaligned.safetensors", "rb") as f:
        data, _ = read_hashed(f)
    got = read_safetensors_from(None, tmp_path / "unaligned.safetensors", lambda name: True, None, data=data)
    assert got["odd"].tolist() == [7] and got["a"].tolist() == [1.5, -2.0]


def test_an_output_path_under_a_file_is_the_users_error(tmp_path):
    """A file where an output folder must go (`--out notes.txt/run`) is a GptforgeError naming it,
    not a FileExistsError/NotADirectoryError traceback; the file is untouched."""
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(GptforgeError, match="notes.txt is a file, not a folder"):
        atomic_write_bytes(notes / "x.json", b"{}")
    with pytest.raises(GptforgeError, match="notes.txt is a file, not a folder"):
        with atomic_directory(notes / "checkpoint"):
            pass
    assert notes.read_text() == "mine"
