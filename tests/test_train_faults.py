"""What a run does when the system fails it or another process gets in its way: a full disk mid-run
(whole metrics lines, a best-effort checkpoint, one line, a resume that works), two processes on one
--out (one lock per run folder, with real processes), a stop while the corpus is tokenized, and OS
errors as one line on the command line."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import gptforge
import gptforge.data
import gptforge.metrics
from gptforge.cli import main
from gptforge.errors import SystemFailure
from gptforge.train import train

SRC = os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"), *os.environ.get("PYTHONPATH", "").split(os.pathsep)])
ENV = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """~2,000 tokens of made-up English."""
    rng = random.Random(0)
    words = "the king said that a man would go to the sea and find gold in a ship of old wood".split()
    path = tmp_path_factory.mktemp("corpus") / "story.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(150)))
    return path


@pytest.fixture(scope="module")
def tiny_json(tmp_path_factory, tiny_config) -> Path:
    """GPT-2's vocabulary (training needs it) on a very narrow model: a checkpoint of ~5 MB."""
    path = tmp_path_factory.mktemp("model") / "tiny.json"
    path.write_text(json.dumps(tiny_config(vocab_size=50257, emb_dim=8, n_heads=2, n_layers=1, tie_weights=True)))
    return path


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _options(corpus: Path, tiny_json: Path, out: Path, **changes) -> dict:
    return {"data": str(corpus), "model": str(tiny_json), "out": str(out), "batch_size": 4, "eval_every": 0,
            "sample_tokens": 0, "progress": False, "precision": "fp32", "checkpoint_every": 0, **changes}


def _steps(out: Path) -> list[int]:
    """The steps of metrics.jsonl's training records; every line must be a whole record."""
    text = (out / "metrics.jsonl").read_text()
    assert not text or text.endswith("\n")
    return [r["step"] for r in map(json.loads, text.splitlines()) if r["kind"] == "train"]


def _stop_at(step: int):
    def on_step(record):
        if record["step"] == step:
            os.kill(os.getpid(), signal.SIGINT)  # the real handler: finish the step, save, stop
    return on_step


# ---------------------------------------------------------------------------------------------
# A full disk


def test_a_write_error_mid_run_saves_ends_in_one_line_and_resumes_exactly(corpus, tiny_json, tmp_path, monkeypatch):
    """metrics.jsonl refused at step 4 (a stand-in for a full disk): the run saves its checkpoint
    and ends with a SystemFailure saying so; a torn last line (a write cut short by an older
    version, or a kill) is trimmed on --resume, which then equals an uninterrupted run."""
    full = train(**_options(corpus, tiny_json, tmp_path / "a", max_steps=8))
    real_append = gptforge.metrics.append_line

    def disk_full_at_step_4(path, line):
        if json.loads(line)["step"] == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_append(path, line)

    monkeypatch.setattr(gptforge.metrics, "append_line", disk_full_at_step_4)
    out = tmp_path / "b"
    with pytest.raises(SystemFailure, match=r"cannot write .*metrics.jsonl: No space left on device; free some "
                                            r"space .*; the checkpoint of step 4 is saved in .*continue with --resume"):
        train(**_options(corpus, tiny_json, out, max_steps=8))
    monkeypatch.undo()
    assert gptforge.checkpoint.load_training_state(out / "checkpoint")["step"] == 5
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 5, "lo')
    rest = train(out=str(out), resume=True)
    assert rest.steps == 8 and _steps(out) == [0, 1, 2, 3, *range(5, 8)]  # step 4's line was never written
    a = {k: v for k, v in gptforge.load(tmp_path / "a" / "checkpoint").state_dict().items()}
    b = gptforge.load(out / "checkpoint").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and full.steps == 8


@contextlib.contextmanager
def _small_disk(path: Path, size: str):
    """A tmpfs of `size` at `path` (root only; skips otherwise), unmounted after."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a small tmpfs needs root (the stand-in test above covers the same path)")
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(disk: Path) -> Path:
    """Fill the disk to its last byte."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 20, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * size)
    return filler


@pytest.mark.slow
def test_a_full_disk_mid_run_keeps_whole_lines_ends_in_one_line_and_resumes(corpus, tiny_json, tmp_path, capsys):
    """A real full disk (tmpfs): the run ends with one line and exit code 1, metrics.jsonl holds only
    whole lines, nothing half-written is left, and once there is room --resume goes on from the
    last checkpoint."""
    with _small_disk(tmp_path / "disk", "24m") as disk:
        out = disk / "run"
        first = train(**_options(corpus, tiny_json, out, max_steps=100000), on_step=_stop_at(2))
        assert first.interrupted and first.steps == 3

        filled = []

        def fill_after_two_more_steps():
            while len(_steps(out)) < 5:
                time.sleep(0.01)
            filled.append(_fill(disk))

        capsys.readouterr()  # (the first run's stop)
        filler = threading.Thread(target=fill_after_two_more_steps)
        filler.start()
        code = main(["train", "--resume", "--out", str(out)])
        filler.join()
        err = capsys.readouterr().err
        assert code == 1, err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert "metrics.jsonl: No space left on device" in err and "saving the checkpoint failed too" in err
        steps = _steps(out)  # whole lines only: the one the disk cut short was taken back off
        assert steps == list(range(len(steps))) and len(steps) >= 5
        assert [p.name for p in out.rglob(".*")] == []  # no temporary copy, no lock left
        assert gptforge.checkpoint.load_training_state(out / "checkpoint")["step"] == 3

        filled[0].unlink()
        again = train(out=str(out), resume=True, on_step=_stop_at(6))
        assert again.interrupted and _steps(out) == list(range(7))


def test_disk_full_while_converting_is_one_line_exit_1(tmp_path, tiny_json, capsys, monkeypatch):
    """safetensors' SafetensorError for a full disk is one line naming the output file, exit 1; the
    old checkpoint there is intact and nothing half-written is left."""
    from safetensors import SafetensorError

    torch.manual_seed(0)
    gptforge.save(gptforge.GPTModel(json.loads(tiny_json.read_text())), tmp_path / "src")
    gptforge.save(gptforge.GPTModel(json.loads(tiny_json.read_text())), tmp_path / "dst")
    before = (tmp_path / "dst" / "model.safetensors").read_bytes()

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr("safetensors.torch.save_file", disk_full)
    assert main(["convert", str(tmp_path / "src"), "--to", "gptforge", "--out", str(tmp_path / "dst")]) == 1
    err = capsys.readouterr().err
    assert err == f"gptforge: error: {tmp_path / 'dst' / 'model.safetensors'}: No space left on device; free " \
                  "some space on that disk or write elsewhere\n"
    assert (tmp_path / "dst" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]


@pytest.mark.parametrize("fmt", ["gptforge", "hf", "gguf"])
def test_a_real_full_disk_while_converting_is_one_line_exit_1(tmp_path, tiny_json, fmt, capsys):
    """Each writer (safetensors, our JSON, the gguf package) on a real 1 MB disk: one line naming the
    file asked for, exit code 1, nothing left on the disk."""
    with _small_disk(tmp_path / "disk", "1m") as disk:
        torch.manual_seed(0)
        gptforge.save(gptforge.GPTModel(json.loads(tiny_json.read_text())), tmp_path / "src")  # ~1.7 MB
        dst = disk / ("model.gguf" if fmt == "gguf" else "model")
        assert main(["convert", str(tmp_path / "src"), "--out", str(dst), "--to", fmt]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert f"error: {dst}" in err and "No space left on device" in err
        assert list(disk.iterdir()) == []


def test_a_real_full_disk_while_saving_the_training_state_names_the_file(tmp_path, tiny_json):
    """torch.save's own error for a full disk (a RuntimeError without the reason) comes out as the
    OSError naming checkpoint/training_state.pt; the checkpoint there before is intact."""
    with _small_disk(tmp_path / "disk", "4m") as disk:
        torch.manual_seed(0)
        model = gptforge.GPTModel(json.loads(tiny_json.read_text()))  # weights ~1.6 MB: they fit
        ckpt = disk / "checkpoint"
        gptforge.save(model, ckpt)
        with pytest.raises(OSError) as caught:
            gptforge.save(model, ckpt, training_state={"optimizer": {"m": torch.zeros(400_000)}})
        assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(ckpt / "training_state.pt")
        assert sorted(p.name for p in disk.iterdir()) == ["checkpoint"]
        torch.testing.assert_close(gptforge.load(ckpt).state_dict(), model.state_dict())


def test_a_real_full_disk_while_tokenizing_names_the_token_file_and_leaves_nothing(tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("the king said that a man would go to the sea and find gold. " * 4000)  # ~56k tokens
    with _small_disk(tmp_path / "disk", "16k") as disk:
        with pytest.raises(OSError) as caught:
            gptforge.data.tokenize_corpus(big, disk / "data", val_fraction=0.1)
        assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(disk / "data" / "train.bin")
        assert [p.name for p in (disk / "data").iterdir()] == []


# ---------------------------------------------------------------------------------------------
# Two processes on one folder


LOCK_HOLDER = """
import sys
from gptforge.runtime import lock_run_folder
with lock_run_folder(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()
"""


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gptforge", *args], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_a_run_folder_in_use_is_refused_and_a_dead_holders_lock_is_not(corpus, tiny_json, tmp_path, capsys):
    """While a process holds --out, train, train --resume and finetune there are refused at once
    (one line, exit 2, naming the holder) and touch nothing; once the holder is killed (kill -9,
    its lock file left behind) a run there goes ahead."""
    out = tmp_path / "run"
    assert train(**_options(corpus, tiny_json, out, max_steps=100000), on_step=_stop_at(1)).interrupted
    before = (out / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out)], stdout=subprocess.PIPE,
                              stdin=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for attempt in (["train", "--resume", "--out", str(out)],
                        ["train", "--data", str(corpus), "--model", str(tiny_json), "--out", str(out)],
                        ["finetune", "instruct", "--data", str(corpus), "--model", str(tiny_json), "--out", str(out)],
                        ["finetune", "classify", "--resume", "--out", str(out)]):
            assert main(attempt) == 2
            assert capsys.readouterr().err == f"gptforge: error: the run folder {out} is in use by another gptforge " \
                                              f"process (process {holder.pid}); wait for it to end, or choose another path\n"
    finally:
        holder.kill()
        holder.wait()
    assert (out / "metrics.jsonl").read_bytes() == before
    assert (out / ".gptforge-run.lock").exists()  # killed: left behind, naming a dead process
    assert train(out=str(out), resume=True, max_steps=4).steps == 4
    assert _steps(out) == [0, 1, 2, 3] and not (out / ".gptforge-run.lock").exists()


@pytest.mark.slow
def test_two_runs_started_together_on_one_folder_one_runs_one_is_refused(corpus, tiny_json, tmp_path):
    out = tmp_path / "run"
    args = ("train", "--data", str(corpus), "--model", str(tiny_json), "--out", str(out), "--max-steps", "20",
            "--batch-size", "4", "--eval-every", "0", "--sample-tokens", "0", "--no-progress")
    procs = [_cli(*args), _cli(*args)]
    results = [(proc.wait(timeout=300), proc.stderr.read()) for proc in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "in use by another gptforge process" in refused or "already holds a run" in refused
    assert _steps(out) == list(range(20))
    gptforge.load(out / "checkpoint")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "data", "loss.png", "metrics.jsonl",
                                                     "train_config.json"]
    assert sorted(p.name for p in (out / "data").iterdir()) == ["meta.json", "train.bin", "val.bin"]


# ---------------------------------------------------------------------------------------------
# A stop while the corpus is tokenized


SLOW_TOKENIZER = """
import sys, time, pathlib
import gptforge.data
from gptforge.cli import main
real = gptforge.data._TokenWriter._emit
def slow(self, text):
    pathlib.Path(sys.argv[1]).touch()
    time.sleep(60)  # a corpus that takes a minute to tokenize
    real(self, text)
gptforge.data._TokenWriter._emit = slow
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_a_stop_while_the_corpus_is_tokenized_ends_at_once_leaving_nothing(corpus, tiny_json, tmp_path):
    """SIGTERM while a (slow) corpus is tokenized: the run ends at once with exit code 130, leaving no
    token files and no checkpoint (it used to wait for the whole corpus, then train a step and save)."""
    started, out = tmp_path / "tokenizing", tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_TOKENIZER, str(started), "train", "--data", str(corpus),
                             "--model", str(tiny_json), "--out", str(out), "--no-progress"],
                            env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert started.exists(), proc.communicate()[1]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=50)  # well before the minute the tokenizer would take
    assert proc.returncode == 130, err
    assert err == "gptforge: interrupted\n"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) in ([], ["data"])


# ---------------------------------------------------------------------------------------------
# OS errors on the command line


def test_an_out_that_is_a_dangling_link_is_one_line_exit_2(corpus, tiny_json, tmp_path, capsys):
    link = tmp_path / "run"
    link.symlink_to(tmp_path / "missing-disk" / "run")
    assert main(["train", "--data", str(corpus), "--model", str(tiny_json), "--out", str(link)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a symbolic link to" in err and "which does not exist" in err
    assert not (tmp_path / "missing-disk").exists()
