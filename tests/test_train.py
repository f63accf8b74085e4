"""The training loop: AdamW groups, the schedule, exact resume after Ctrl-C, the CLI, config files,
finetuning, bf16 autocast, and torchrun (2 CPU processes) matching one process."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import gptforge
from gptforge.errors import GptforgeError
from gptforge.model import GPTModel
from gptforge.train import TrainConfig, learning_rate, parameter_groups, train

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture
def tiny(tiny_config) -> dict:
    """GPT-2's tokenizer, dropout on, GPT-2's tied head and initialisation."""
    return tiny_config(vocab_size=50257, context_length=32, n_heads=2, drop_rate=0.1, tie_weights=True, init="gpt2")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """~2,000 tokens of made-up English (no corpus download needed)."""
    rng = random.Random(0)
    words = ("the king said that a man would go to the sea and find gold in a ship of old wood "
             "while the queen sang softly of rain and stone").split()
    text = "\n".join(" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(150))
    path = tmp_path_factory.mktemp("corpus") / "story.txt"
    path.write_text(text)
    return path


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one torch thread is faster, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_json(tiny, tmp_path) -> Path:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(tiny))
    return path


def _options(corpus: Path, tiny_json: Path, out: Path, **changes) -> dict:
    return {"data": str(corpus), "model": str(tiny_json), "out": str(out), "batch_size": 4,
            "eval_batches": 2, "eval_every": 3, "sample_tokens": 3, "progress": False,
            "precision": "fp32", "checkpoint_every": 0, **changes}


def _records(out: Path, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return gptforge.load(out / "checkpoint").state_dict()


@pytest.mark.parametrize("tie", [True, False])
def test_weight_decay_only_on_matrices_and_tied_weights_once(tie, tiny):
    model = GPTModel({**tiny, "tie_weights": tie})
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decay_ids = {id(p) for p in decay["params"]}
    expected = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    if tie:
        expected.discard(id(model.tok_emb.weight))  # the tied head is the embedding: no decay
    assert decay_ids == expected  # every Linear weight (an untied head too), nothing else
    assert id(model.tok_emb.weight) not in decay_ids and id(model.pos_emb.weight) not in decay_ids
    all_params = decay["params"] + no_decay["params"]
    assert len({id(p) for p in all_params}) == len(all_params)
    assert sum(p.numel() for p in all_params) == model.num_parameters()


FAULTS_SCRIPT = """
import resource, sys, torch
from gptforge.train import keep_freed_memory
def faults():  # minor page faults while a 256 MB tensor is allocated, written and freed, 3 times
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        x = torch.ones(64 * 2**20)
        del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
default = faults()
applied = keep_freed_memory()
faults()  # the first allocations after the change still grow the heap (to its steady size)
faults()
print(default, faults(), applied)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_keep_freed_memory_stops_per_step_page_faults():
    """What makes CPU training steps ~30% cheaper: freed tensors are reused, not unmapped and
    faulted in again (each 256 MB round trip costs ~65k page faults by default)."""
    out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(SRC)}, check=True).stdout.split()
    default, kept, applied = int(out[0]), int(out[1]), out[2]
    assert applied == "True"
    assert default > 3 * 60_000  # glibc unmaps and re-faults every time
    assert kept < default / 20


def test_warmup_then_cosine_schedule():
    cfg = TrainConfig(data="x", lr=1e-3, min_lr=1e-4, warmup_steps=10)
    assert learning_rate(0, cfg, 110) == pytest.approx(1e-4)
    assert learning_rate(9, cfg, 110) == pytest.approx(1e-3)
    assert learning_rate(10, cfg, 110) == pytest.approx(1e-3)
    mid = 10 + 99 / 2
    assert learning_rate(int(mid), cfg, 110) == pytest.approx(5.5e-4, rel=0.02)
    assert learning_rate(109, cfg, 110) == pytest.approx(1e-4)
    const = TrainConfig(data="x", lr=4e-4, schedule="constant")
    assert learning_rate(50, const, 100) == 4e-4


def test_interrupted_and_resumed_run_equals_uninterrupted(corpus, tiny_json, tmp_path):
    opts = _options(corpus, tiny_json, tmp_path / "a", epochs=2, grad_accum_steps=2, warmup_steps=2,
                    grad_clip=0.5)
    full = train(**opts)
    assert not full.interrupted and full.steps > 8  # crosses an epoch boundary (steps per epoch ~ 5)

    def ctrl_c_at_step_4(record):
        if record["step"] == 4:
            os.kill(os.getpid(), signal.SIGINT)  # the real handler: finish the step, save, stop

    opts_b = {**opts, "out": str(tmp_path / "b")}
    part = train(**opts_b, on_step=ctrl_c_at_step_4)
    assert part.interrupted and part.steps == 5
    assert gptforge.checkpoint.load_training_state(tmp_path / "b" / "checkpoint")["step"] == 5
    rest = train(out=str(tmp_path / "b"), resume=True)
    assert not rest.interrupted and rest.steps == full.steps

    a, b = _records(tmp_path / "a", "train"), _records(tmp_path / "b", "train")
    assert [r["step"] for r in b] == list(range(full.steps))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [(r["train_loss"], r["val_loss"], r["sample"]) for r in _records(tmp_path / "a", "eval")] == \
        [(r["train_loss"], r["val_loss"], r["sample"]) for r in _records(tmp_path / "b", "eval")]
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (tmp_path / "b" / "loss.png").stat().st_size > 1000

    with pytest.raises(ValueError, match="lr cannot change on --resume"):
        train(out=str(tmp_path / "b"), resume=True, lr=1e-2)
    # a new run (no resume) into b would write over its trained checkpoint: refused before any work
    with pytest.raises(GptforgeError, match="already holds a run .*continue it with --resume"):
        train(**opts_b)
    assert all(torch.equal(wb[k], v) for k, v in _weights(tmp_path / "b").items())


def test_an_unknown_device_is_refused_before_the_data_is_tokenized(corpus, tiny_json, tmp_path):
    with pytest.raises(GptforgeError, match="unknown device 'gpu'"):
        train(**_options(corpus, tiny_json, tmp_path / "a", device="gpu"))
    assert not (tmp_path / "a").exists()  # it failed at once: no token files, no run folder


def test_the_largest_seed_trains_and_a_larger_one_is_refused(corpus, tiny_json, tmp_path):
    """Seeds are 64-bit: the epoch order's seed * 1_000_003 used to overflow torch's generator
    (a traceback after the data and model were ready) for any seed past ~1.8e13."""
    assert train(**_options(corpus, tiny_json, tmp_path / "a", max_steps=1, eval_every=0, sample_tokens=0,
                            seed=2**63 - 1)).steps == 1
    with pytest.raises(GptforgeError, match="seed must be an integer >= 0 and <= 9223372036854775807"):
        train(**_options(corpus, tiny_json, tmp_path / "b", seed=2**63))


def test_finetune_from_a_checkpoint_and_bf16(corpus, tiny_json, tmp_path):
    base = train(**_options(corpus, tiny_json, tmp_path / "base", max_steps=8, eval_every=0, lr=1e-2))
    scratch = _records(tmp_path / "base", "train")[0]["loss"]
    tuned = train(**_options(corpus, str(base.checkpoint), tmp_path / "tuned", max_steps=2, eval_every=0,
                             model_overrides={"drop_rate": 0.0}))
    first = _records(tmp_path / "tuned", "train")[0]["loss"]
    assert first < scratch - 1.0  # starts from the trained weights, not a new initialisation
    assert first == pytest.approx(base.train_loss, abs=0.5)
    assert gptforge.load(tuned.checkpoint).cfg.drop_rate == 0.0

    bf16 = train(**_options(corpus, tiny_json, tmp_path / "bf16", max_steps=2, eval_every=0, precision="bf16"))
    fp32 = train(**_options(corpus, tiny_json, tmp_path / "fp32", max_steps=2, eval_every=0))
    assert bf16.train_loss == pytest.approx(fp32.train_loss, abs=0.1)
    assert bf16.train_loss != fp32.train_loss  # autocast really ran in bf16


def test_a_diverging_run_stops_and_keeps_the_last_good_step(corpus, tiny_json, tmp_path, capsys):
    """A learning rate far too high: the loss overflows at the second step. The run stops with one
    line, and its checkpoint is the model after the first step, as a run of one step saves it."""
    opts = _options(corpus, tiny_json, tmp_path / "a", max_steps=20, eval_every=0, sample_tokens=0, lr=1e30,
                    grad_clip=0.0)
    with pytest.raises(GptforgeError, match=r"training diverged at step 1: the loss is (nan|inf) .*the model after "
                                            r"step 0, the last good one, is saved in"):
        train(**opts)
    assert gptforge.checkpoint.load_training_state(tmp_path / "a" / "checkpoint")["step"] == 1
    one_step = train(**{**opts, "out": str(tmp_path / "b"), "max_steps": 1})
    assert one_step.steps == 1
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the command line: one line, exit 2
    from gptforge.cli import main

    args = ["train", "--data", str(corpus), "--model", str(tiny_json), "--out", str(tmp_path / "c"), "--lr", "1e30",
            "--grad-clip", "0", "--batch-size", "4", "--max-steps", "20", "--eval-every", "0", "--sample-tokens", "0",
            "--precision", "fp32", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "training diverged at step 1" in err, err


def test_a_loss_beyond_exp_range_has_an_infinite_perplexity(corpus, tiny_json, tmp_path):
    """A validation loss above ~709.78 nats (here a learning rate of 1e4): exp overflows a float; its
    perplexity is inf, logged and returned, not an OverflowError that ends the run unsaved."""
    result = train(**_options(corpus, tiny_json, tmp_path / "a", max_steps=2, eval_every=1, sample_tokens=0,
                              lr=1e4, val_fraction=0.2))
    evals = _records(tmp_path / "a", "eval")
    assert min(r["val_loss"] for r in evals) > 710 and result.val_loss > 710, evals
    assert result.val_perplexity == math.inf and all(r["val_perplexity"] == math.inf for r in evals)
    assert (tmp_path / "a" / "checkpoint" / "model.safetensors").exists()
    from gptforge.evaluate import loss_perplexity

    assert loss_perplexity(709.0) == pytest.approx(math.exp(709.0)) and math.isnan(loss_perplexity(math.nan))


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "gptforge", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


@pytest.mark.slow
def test_cli_config_file_flags_and_ctrl_c(corpus, tiny_json, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(f'data = "{corpus}"\nmodel = "{tiny_json}"\nbatch_size = 4\nmax_steps = 100000\n'
                      'eval_every = 0\nsample_tokens = 0\nprecision = "fp32"\n')
    out = tmp_path / "run"
    proc = _cli("train", "--config", str(config), "--out", str(out), "--lr", "0.001", "--no-progress")
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "stopping after this step" in stderr
    assert "stopped after" in stdout
    state = gptforge.checkpoint.load_training_state(out / "checkpoint")
    assert 3 <= state["step"] < 100000
    assert state["train_config"]["lr"] == 0.001 and state["train_config"]["batch_size"] == 4


@pytest.mark.slow
def test_cli_bad_data_is_one_line_and_exit_2(tmp_path, tiny_json):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for data in (str(empty), str(tmp_path / "missing.txt")):
        proc = _cli("train", "--data", data, "--model", str(tiny_json), "--out", str(tmp_path / "o"))
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2
        assert stderr.count("\n") == 1 and stderr.startswith("gptforge: error:"), stderr
    with pytest.raises(ValueError, match="unknown training options"):
        TrainConfig.from_dict({"data": "x", "learning_rate": 1})
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(data="x", batch_size=0)


DDP_SCRIPT = """
import json, sys
from gptforge.train import train
train(**json.loads(sys.argv[1]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_torchrun_two_cpu_processes_match_one_process(corpus, tiny_json, tmp_path, sharding):
    common = dict(max_steps=4, eval_every=2, sample_tokens=0, grad_clip=1.0, warmup_steps=1,
                  model_overrides={"drop_rate": 0.0})  # dropout masks differ per rank by design
    train(**_options(corpus, tiny_json, tmp_path / "one", batch_size=4, **common))
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    opts = _options(corpus, tiny_json, tmp_path / "two", batch_size=2, fsdp=sharding == "fsdp", **common)
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(script), json.dumps(opts)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _records(tmp_path / "one", "train"), _records(tmp_path / "two", "train")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["tokens_seen"] == a["tokens_seen"]
    for a, b in zip(_records(tmp_path / "one", "eval"), _records(tmp_path / "two", "eval")):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
    w1, w2 = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
    state = gptforge.checkpoint.load_training_state(tmp_path / "two" / "checkpoint")
    assert len(state["rng"]) == 2  # every rank's RNG state, for an exact resume


def test_wrong_option_types_and_names_are_refused_before_any_work(tmp_path):
    for field, value in (("data", 5), ("out", None), ("model", None), ("device", 5), ("sample_prompt", 5),
                         ("compile", "yes"), ("progress", 1)):  # all were accepted by TrainConfig
        with pytest.raises(GptforgeError, match=field):
            TrainConfig(**{field: value})
    with pytest.raises(GptforgeError, match="unknown training options \\['bacth_size'\\]"):
        train(data="corpus.txt", out=str(tmp_path / "run"), bacth_size=4)  # was TrainConfig's TypeError
    with pytest.raises(GptforgeError, match="unknown training options"):
        train(TrainConfig(), bacth_size=4)
    with pytest.raises(GptforgeError, match="first argument is a TrainConfig"):
        train("corpus.txt")  # was dataclasses' TypeError
    assert TrainConfig(data=[tmp_path / "a.txt"], out=tmp_path / "run").out == tmp_path / "run"  # Paths are fine
