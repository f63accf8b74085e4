"""Experiment loggers (TensorBoard, wandb offline, MLflow's file store), read back with each
library's own reader; activation checkpointing gives the losses of the run without it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from gptforge import GPTModel, save
from gptforge.cli import main
from gptforge.errors import GptforgeError
from gptforge.finetune import finetune_instruct
from gptforge.loggers import parse_loggers
from gptforge.train import train

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "instruct-sample.json"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = random.Random(0)
    words = "the king said that a man would go to the sea and find gold in a ship of old wood".split()
    path = tmp_path_factory.mktemp("corpus") / "story.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(120)))
    return path


@pytest.fixture
def tiny_json(tmp_path, tiny_config) -> Path:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(tiny_config(vocab_size=50257, context_length=16, n_heads=2)))
    return path


def _records(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def _options(corpus: Path, model: Path, out: Path, **changes) -> dict:
    return {"data": str(corpus), "model": str(model), "out": str(out), "batch_size": 2, "max_steps": 4,
            "eval_every": 2, "eval_batches": 2, "sample_tokens": 3, "precision": "fp32", "progress": False, **changes}


def wandb_records(path: Path) -> list[bytes]:
    """The records of a .wandb file: LevelDB's log format (32 KiB blocks, 7-byte record headers:
    checksum, length, FULL/FIRST/MIDDLE/LAST) after wandb's 7-byte ':W&B' file header; each record
    a protobuf of wandb's own schema. (wandb 0.2x's Python DataStore reader did this; newer
    releases read them in their Go core only.)"""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind in (2, 3):
            pending = (pending if kind == 3 else b"") + chunk
        elif kind == 4:
            records.append(pending + chunk)
    return records


def test_every_logger_reads_back_what_metrics_jsonl_holds(corpus, tiny_json, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    wandb = pytest.importorskip("wandb")
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    train(**_options(corpus, tiny_json, out, logger="tensorboard,wandb,mlflow"))
    steps, evals = _records(out, "train"), _records(out, "eval")
    assert len(steps) == 4 and len(evals) == 3

    # TensorBoard: its own EventAccumulator
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tb_loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert tb_loss == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in steps]
    for key in ("lr", "grad_norm", "tokens_per_s"):
        assert [e.value for e in acc.Scalars(f"train/{key}")] == pytest.approx([r[key] for r in steps], rel=1e-6)
    assert [e.value for e in acc.Scalars("eval/val_perplexity")] == pytest.approx(
        [r["val_perplexity"] for r in evals], rel=1e-6)
    texts = acc.Tags()["tensors"]
    assert "eval/sample/text_summary" in texts and "config/text_summary" in texts
    sample = acc.Tensors("eval/sample/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert sample == evals[-1]["sample"]

    # wandb: the offline run folder's .wandb file, read by wandb's own reader
    run_dirs = list((out / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    from wandb.proto import wandb_internal_pb2

    history, config = [], {}
    for data in wandb_records(next(run_dirs[0].glob("*.wandb"))):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):  # the config comes with the run record, changes after it
            update = record.run.config.update if kind == "run" else record.config.update
            config.update({item.key: json.loads(item.value_json) for item in update})
    assert [(row["_step"], row["train/loss"]) for row in history if "train/loss" in row] == \
        [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in steps]
    assert [row["eval/val_loss"] for row in history if "eval/val_loss" in row] == \
        pytest.approx([r["val_loss"] for r in evals], rel=1e-6)
    assert [row["eval/sample"] for row in history if "eval/sample" in row] == [r["sample"] for r in evals]
    assert config["batch_size"] == 2 and config["max_steps"] == 4

    # MLflow: search_runs on the local store
    mlflow.set_tracking_uri(f"sqlite:///{out.resolve() / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["gptforge"])
    assert len(runs) == 1
    assert runs["metrics.train/loss"][0] == pytest.approx(steps[-1]["loss"], rel=1e-6)
    assert runs["metrics.eval/val_perplexity"][0] == pytest.approx(evals[-1]["val_perplexity"], rel=1e-6)
    assert runs["params.batch_size"][0] == "2" and runs["status"][0] == "FINISHED"
    client = mlflow.MlflowClient()
    history = client.get_metric_history(runs["run_id"][0], "train/loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in steps]
    sample = client.download_artifacts(runs["run_id"][0], "eval/sample/step_0000003.txt", str(tmp_path))
    assert Path(sample).read_text() == evals[-1]["sample"]
    mlflow.set_tracking_uri(None)


def test_finetune_logs_the_same_way(tmp_path, tiny_config):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    base = save(GPTModel(tiny_config(vocab_size=50257, context_length=128)), tmp_path / "base")
    out = tmp_path / "ft"
    finetune_instruct(data=str(SAMPLE), model=str(base), out=str(out), epochs=1, eval_every=2, progress=False,
                      logger="tensorboard")
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    steps = _records(out, "train")
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
    assert [e.value for e in acc.Scalars("eval/train_loss")] == pytest.approx(
        [r["train_loss"] for r in _records(out, "eval") if "train_loss" in r], rel=1e-6)


def test_unknown_or_missing_loggers_are_one_line_naming_the_extra(tmp_path, corpus, tiny_json, capsys, monkeypatch):
    assert parse_loggers(" CSV,,csv") == ("csv",)
    code = main(["train", "--data", str(corpus), "--model", str(tiny_json), "--out", str(tmp_path / "o"),
                 "--logger", "csv,neptune"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "unknown logger 'neptune'" in err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(GptforgeError, match=r"--logger wandb needs the wandb library: pip install 'gptforge\[wandb\]'"):
        train(**_options(corpus, tiny_json, tmp_path / "o2", logger="wandb"))
    assert not (tmp_path / "o2").exists()  # refused before any work


@pytest.mark.parametrize("drop_rate", [0.0, 0.1])
def test_grad_checkpointing_gives_the_losses_of_the_run_without_it(corpus, tmp_path, tiny_config, drop_rate):
    model = tmp_path / "m.json"
    model.write_text(json.dumps(tiny_config(vocab_size=50257, context_length=16, n_heads=2, drop_rate=drop_rate)))
    plain = train(**_options(corpus, model, tmp_path / "plain", sample_tokens=0))
    recomputed = train(**_options(corpus, model, tmp_path / "ckpt", sample_tokens=0, grad_checkpointing=True))
    a, b = _records(tmp_path / "plain", "train"), _records(tmp_path / "ckpt", "train")
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-6, abs=1e-6)
    assert [r["grad_norm"] for r in b] == pytest.approx([r["grad_norm"] for r in a], rel=1e-6, abs=1e-6)
    assert recomputed.val_loss == pytest.approx(plain.val_loss, rel=1e-6)


def test_grad_checkpointing_recomputes_each_block(tiny_config):
    """Backward runs every block's forward again (what frees its activations)."""
    model = GPTModel(tiny_config(n_heads=2)).train()
    calls = []
    for block in model.trf_blocks:
        block.register_forward_pre_hook(lambda *a: calls.append(1))  # (recomputing stops early: no post-hook)
    x = torch.randint(0, 97, (2, 16))
    model(x, targets=x).backward()
    assert len(calls) == 2
    calls.clear()
    model.grad_checkpointing = True
    model(x, targets=x).backward()
    assert len(calls) == 4
