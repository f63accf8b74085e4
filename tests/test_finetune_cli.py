"""`gptforge finetune classify` and `gptforge classify` on the command line: labels of any strings
saved with the model, predictions equal to the Python API's, and bad input answered by one line
and exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gptforge
from classify_data import messages, write_splits
from gptforge.checkpoint import save
from gptforge.cli import main
from gptforge.model import GPTModel

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def base(tiny_config, tmp_path):
    torch.manual_seed(0)
    save(GPTModel(tiny_config(vocab_size=50257, context_length=32)), tmp_path / "base")
    return str(tmp_path / "base")


def _jsonl(path: Path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_finetune_then_classify_with_string_labels(base, tmp_path, capsys):
    names = {1: "junk", 0: "personal"}
    train = _jsonl(tmp_path / "train.jsonl", [{"message": t, "kind": names[y]} for t, y in messages(24)])
    val = _jsonl(tmp_path / "val.jsonl", [{"message": t, "kind": names[y]} for t, y in messages(8, seed=1)])
    out = tmp_path / "run"
    assert main(["finetune", "classify", "--data", train, "--val", val, "--model", base, "--out", str(out),
                 "--text-column", "message", "--label-column", "kind", "--epochs", "1", "--eval-every", "1",
                 "--no-progress", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "done after 3 steps" in printed and "labels junk, personal" in printed
    config = json.loads((out / "checkpoint" / "config.json").read_text())
    assert config["classifier"]["labels"] == ["junk", "personal"] and config["classifier"]["pool"] == "last-real"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "eval" and "val_acc" in r for r in records) == 3

    texts = ["WIN a free prize now! Call 80082", "See you at the park around six?"]
    assert main(["classify", "--model", str(out / "checkpoint"), *texts]) == 0
    expected = gptforge.classify(str(out / "checkpoint"), texts)
    assert capsys.readouterr().out.splitlines() == [p.label for p in expected]
    assert main(["classify", "--json", "--model", str(out / "checkpoint"), *texts]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["probabilities"] for r in rows] == [p.probabilities for p in expected]
    assert all(sum(r["probabilities"].values()) == pytest.approx(1.0) for r in rows)


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gptforge: error: "), err
    return err


def test_bad_input_is_one_line_and_exit_2(base, tmp_path, capsys):
    splits = write_splits(tmp_path)
    run = ["finetune", "classify", "--model", base, "--out", str(tmp_path / "run"), "--no-progress", "--device", "cpu"]
    assert "no column 'sentence'" in _error(run + ["--data", str(splits["train"]), "--text-column", "sentence"], capsys)
    assert "both 'label'; name two columns" in _error(run + ["--data", str(splits["train"]), "--text-column", "label"],
                                                      capsys)
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\nhello there,a\n,b\n")
    assert "record 2 has an empty 'text'" in _error(run + ["--data", str(empty)], capsys)
    unseen = tmp_path / "unseen.csv"
    unseen.write_text("text,label\nhello there,7\n")
    assert "not trained on: ['7']" in _error(run + ["--data", str(splits["train"]), "--val", str(unseen)], capsys)
    long = tmp_path / "long.csv"
    long.write_text("text,label\n" + "word " * 40 + ",a\nshort,b\n")
    assert "--max-length" in _error(run + ["--data", str(long), "--batch-size", "2"], capsys)
    assert main(run + ["--data", str(long), "--batch-size", "2", "--max-length", "16", "--epochs", "1"]) == 0
    trained = (tmp_path / "run" / "checkpoint" / "model.safetensors").read_bytes()
    # a new run into that --out would write over the trained classifier: refused, the checkpoint kept
    assert "already holds a run" in _error(run + ["--data", str(long), "--batch-size", "2", "--max-length", "16"],
                                           capsys)
    assert (tmp_path / "run" / "checkpoint" / "model.safetensors").read_bytes() == trained
    run2 = run[:5] + [str(tmp_path / "run2")] + run[6:]
    assert "fewer than one batch of 8" in _error(run2 + ["--data", str(long), "--max-length", "16"], capsys)
    capsys.readouterr()
    assert "not a classifier" in _error(["classify", "--model", base, "text"], capsys)
    assert "empty" in _error(["classify", "--model", str(tmp_path / "run" / "checkpoint"), " "], capsys)
    assert "preset" in _error(run2 + ["--data", str(splits["train"]), "--model", "gpt2-124m", "--lora-rank", "2"],
                              capsys)
    (tmp_path / "notes.txt").write_text("mine")
    out_at_a_file = run + ["--data", str(splits["train"]), "--out", str(tmp_path / "notes.txt")]
    assert "notes.txt is a file, not a folder" in _error(out_at_a_file, capsys)


def test_labels_written_two_ways_are_refused_not_split_into_classes(base, tmp_path, capsys):
    """1, "1", 1.0 and true would otherwise be up to four classes of what the writer meant as one."""
    run = ["finetune", "classify", "--model", base, "--out", str(tmp_path / "run"), "--no-progress", "--device", "cpu"]
    texts = ["good day", "bad day", "fine day", "sad day"]
    mixed = _jsonl(tmp_path / "mixed.jsonl", [{"text": t, "label": v} for t, v in zip(texts, [1, "1", 0, True])])
    err = _error(run + ["--data", mixed], capsys)
    assert "mix JSON types (number 1 in record 1, string \"1\" in record 2, boolean true in record 4)" in err, err
    spelled = _jsonl(tmp_path / "spelled.jsonl", [{"text": t, "label": v} for t, v in zip(texts, [1, 0, 1.0, 0])])
    assert "labels '1' and '1.0' are one number written two ways" in _error(run + ["--data", spelled], capsys)
    csv = tmp_path / "spelled.csv"
    csv.write_text("text,label\ngood day,1\nbad day,0\nfine day,01\nsad day,0\n")
    assert "labels '1' and '01' are one number written two ways" in _error(run + ["--data", str(csv)], capsys)
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_labels_of_one_json_type_and_spelling_are_read_as_given(tmp_path):
    from gptforge.classifier import label_names, read_labeled
    from gptforge.errors import GptforgeError

    (tmp_path / "n.jsonl").write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n{"text": "c", "label": 2.5}\n')
    assert read_labeled(tmp_path / "n.jsonl").labels == ["1", "0", "2.5"]
    (tmp_path / "b.jsonl").write_text('{"text": "a", "label": true}\n{"text": "b", "label": false}\n')
    assert label_names(read_labeled(tmp_path / "b.jsonl").labels) == ("False", "True")
    (tmp_path / "w.csv").write_text("text,label\na,1\nb,one\nc,inf\nd,Infinity\n")  # words are labels as written
    assert read_labeled(tmp_path / "w.csv").labels == ["1", "one", "inf", "Infinity"]
    (tmp_path / "m.jsonl").write_text('{"text": "a", "label": "1"}\n{"text": "b", "label": 1}\n')
    with pytest.raises(GptforgeError, match=r'mix JSON types \(string "1" in record 1, number 1 in record 2\)'):
        read_labeled(tmp_path / "m.jsonl")


@pytest.mark.slow
def test_readme_example_on_the_sample_files(tmp_path):
    """The docs' example: the built-in model finetuned on examples/, then `gptforge classify`."""
    run = [sys.executable, "-m", "gptforge"]
    done = subprocess.run(run + ["finetune", "classify", "--data", str(EXAMPLES / "messages-train.csv"),
                                 "--val", str(EXAMPLES / "messages-val.csv"), "--model", "gptforge-shakespeare",
                                 "--out", str(tmp_path / "spam"), "--lr", "5e-4", "--no-progress"],
                          capture_output=True, text=True, check=True)
    assert "labels ham, spam" in done.stdout
    out = subprocess.run(run + ["classify", "--model", str(tmp_path / "spam" / "checkpoint"),
                                "URGENT! Claim your cash reward today by texting CASH to 80082",
                                "Let me know when you get home safe"], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["spam", "ham"]


def test_ctrl_c_in_the_final_accuracy_passes_keeps_the_trained_classifier(base, tmp_path, capsys, monkeypatch):
    from gptforge import finetune

    def interrupted(model, loader, num_batches=None):  # the final passes over all the data
        if num_batches is None:
            raise KeyboardInterrupt
        return 0.5

    monkeypatch.setattr(finetune, "loader_accuracy", interrupted)
    train = _jsonl(tmp_path / "train.jsonl", [{"text": t, "label": y} for t, y in messages(16)])
    out = tmp_path / "run"
    assert main(["finetune", "classify", "--data", train, "--model", base, "--out", str(out), "--eval-every", "0",
                 "--no-progress", "--device", "cpu"]) == 130
    assert capsys.readouterr().err == "gptforge: interrupted\n"
    assert gptforge.load(out / "checkpoint").cfg.classifier is not None  # the 2 steps done are not lost
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
