"""gptforge.io: atomic files and directories, whole-line appends, locks, hashing while reading, the
safetensors reader; and what a full disk, a killed writer or a concurrent one leave."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import gptforge
import gptforge.io as io_module
from gptforge.checkpoint import CHECKPOINT_FILES
from gptforge.errors import GptforgeError
from gptforge.io import (append_line, atomic_directory, atomic_write, atomic_write_bytes, exclusive_lock, read_hashed,
                         read_safetensors, read_safetensors_from, write_file)

SRC = os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"), *os.environ.get("PYTHONPATH", "").split(os.pathsep)])


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


# ----------------------------------------------------------------------------------------------
# Faults: a full disk, a killed writer, concurrent writers and readers


def test_append_line_cut_short_by_a_full_disk_leaves_whole_lines(tmp_path, monkeypatch):
    """A write the disk cuts short (part of the line written, then ENOSPC) is taken back off."""
    log = tmp_path / "metrics.jsonl"
    append_line(log, '{"step": 0}\n')
    real_write = os.write

    def half_then_full(fd, data):
        if len(data) > 4:
            return real_write(fd, bytes(data[:len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError) as caught:
        append_line(log, '{"step": 1, "loss": 3.25}\n')
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(log)
    monkeypatch.undo()
    assert log.read_text() == '{"step": 0}\n'


def test_a_lock_is_exclusive_names_its_holder_and_dies_with_it(tmp_path):
    """A second holder is refused naming the first's process; the lock of a process killed with
    SIGKILL (its file left behind, naming a dead process) does not block."""
    lock = tmp_path / "run.lock"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(lock)], stdout=subprocess.PIPE,
                              stdin=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": SRC})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(GptforgeError, match=rf"in use by another gptforge process \(process {holder.pid}\)"):
            with exclusive_lock(lock, wait=False):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert lock.read_text().strip() == str(holder.pid)  # SIGKILL: nothing cleaned up
    with exclusive_lock(lock, wait=False):
        assert lock.read_text().strip() == str(os.getpid())
    assert not lock.exists()


LOCK_HOLDER = """
import sys
from gptforge.io import exclusive_lock
with exclusive_lock(sys.argv[1], wait=False):
    print("locked", flush=True)
    sys.stdin.read()
"""

SAVE_THEN_HANG = """
import sys, time, torch
import gptforge, gptforge.io
real = gptforge.io.write_safetensors
def hang(tensors, path, metadata=None):
    real(tensors, path, metadata)
    print("writing", flush=True)
    time.sleep(600)
gptforge.checkpoint.native.write_safetensors = hang
torch.manual_seed(0)
gptforge.save(gptforge.GPTModel(dict(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2,
                                     drop_rate=0.0, qkv_bias=True)), sys.argv[1])
"""


def test_a_save_killed_part_way_leaves_copies_the_next_save_removes(tmp_path, tiny_config):
    """kill -9 during a save leaves its hidden temporary folder; the next save of that checkpoint
    removes it (and a set-aside .old one), but not a folder of another checkpoint's live writer."""
    ckpt = tmp_path / "checkpoint"
    gptforge.save(_tiny(tiny_config, seed=1), ckpt)
    writer = subprocess.Popen([sys.executable, "-c", SAVE_THEN_HANG, str(ckpt)], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": SRC})
    try:
        assert writer.stdout.readline().strip() == "writing"
    finally:
        writer.kill()
        writer.wait()
    leftovers = sorted(p.name for p in tmp_path.glob(".checkpoint.*.tmp"))
    assert len(leftovers) == 1
    (tmp_path / ".checkpoint.k3_x9a0z.old" / "checkpoint").mkdir(parents=True)  # killed between the renames
    (tmp_path / ".checkpoint.v2.abcdefgh.tmp").mkdir()  # another target's ("checkpoint.v2")
    gptforge.save(_tiny(tiny_config, seed=2), ckpt)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".checkpoint.v2.abcdefgh.tmp", "checkpoint"]
    torch.testing.assert_close(gptforge.load(ckpt).state_dict(), _tiny(tiny_config, seed=2).state_dict())


def test_concurrent_saves_of_one_checkpoint_take_turns(tmp_path, tiny_config):
    """A second writer of a checkpoint waits for the first (neither removes the other's files); the
    last to finish is what stays."""
    ckpt = tmp_path / "ckpt"
    inside, release, order = threading.Event(), threading.Event(), []

    def first():
        with atomic_directory(ckpt, CHECKPOINT_FILES) as tmp:
            inside.set()
            release.wait(30)
            (tmp / "config.json").write_text('{"writer": 1}')
        order.append(1)

    def second():
        with atomic_directory(ckpt, CHECKPOINT_FILES) as tmp:
            (tmp / "config.json").write_text('{"writer": 2}')
        order.append(2)

    a = threading.Thread(target=first)
    a.start()
    assert inside.wait(30)
    b = threading.Thread(target=second)
    b.start()
    b.join(0.5)
    assert b.is_alive() and len(list(tmp_path.glob(".ckpt.*.tmp"))) == 1  # waiting; the first's copy kept
    release.set()
    a.join(30)
    b.join(30)
    assert order == [1, 2] and json.loads((ckpt / "config.json").read_text()) == {"writer": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def _can_exchange(tmp_path) -> bool:
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    try:
        return io_module._exchange(tmp_path / "x", tmp_path / "y")
    finally:
        (tmp_path / "x").rmdir()
        (tmp_path / "y").rmdir()


WATCHER = """
import os, sys
config, stop = sys.argv[1], sys.argv[2]
looks = missing = 0
print("watching", flush=True)
while not os.path.exists(stop):
    looks += 1
    missing += not os.path.exists(config)
print(looks, missing)
"""


def test_a_checkpoint_being_replaced_is_readable_at_every_instant(tmp_path, tiny_config):
    """Another process looking at checkpoint/config.json while the checkpoint is saved over and
    over always finds it: the new copy is swapped in, in one step."""
    if not _can_exchange(tmp_path):
        pytest.skip("this system or filesystem cannot swap two names in one step (renameat2 RENAME_EXCHANGE)")
    ckpt, stop = tmp_path / "checkpoint", tmp_path / "stop"
    model = _tiny(tiny_config)
    gptforge.save(model, ckpt)
    watcher = subprocess.Popen([sys.executable, "-c", WATCHER, str(ckpt / "config.json"), str(stop)],
                               stdout=subprocess.PIPE, text=True)
    assert watcher.stdout.readline().strip() == "watching"
    for _ in range(60):
        gptforge.save(model, ckpt)
    stop.touch()
    looks, missing = map(int, watcher.communicate(timeout=60)[0].split())
    assert looks > 1000 and missing == 0


def test_a_library_write_error_becomes_the_oserror_it_stands_for(tmp_path):
    """safetensors reports a full disk as SafetensorError with Rust's errno; torch's writer as a
    RuntimeError caused by the OSError: both become OSError(ENOSPC) naming the file."""
    target = tmp_path / "model.safetensors"

    def rust():
        raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                           '"No space left on device" })')

    with pytest.raises(OSError) as caught:
        write_file(target, rust)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    with pytest.raises(ValueError, match="not a write error"):
        write_file(target, lambda: (_ for _ in ()).throw(ValueError("not a write error")))


def test_an_output_path_that_is_a_dangling_link_is_the_users_error(tmp_path):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(GptforgeError, match="out is a symbolic link to .*gone, which does not exist"):
        atomic_write_bytes(link / "x.json", b"{}")
    with pytest.raises(GptforgeError, match="which does not exist"):
        with atomic_directory(link):
            pass
    assert link.is_symlink() and not (tmp_path / "gone").exists()
