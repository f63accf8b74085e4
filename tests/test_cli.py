"""The command line: the seed's sentence, the counts table, and clear errors with exit code 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SEED_TEXT
from gptforge.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "gptforge", *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_generate_prints_the_seed_sentence():
    result = run_cli("generate", "Hello, I am", "--model", "book-124m", "--seed", "123", "--max-new-tokens", "6")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == SEED_TEXT


def test_info_prints_counts_and_memory(capsys):
    assert main(["info", "book-124m"]) == 0
    out = capsys.readouterr().out
    assert "163,009,536" in out and "124,412,160" in out
    assert "621.8 MiB" in out and "310.9 MiB" in out  # 163,009,536 params x 4 and x 2 bytes
    assert main(["info", "gpt2-1558m"]) == 0
    assert "1,557,611,200" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["info", "gpt5"], "no preset or file named 'gpt5'"),
    (["generate", "hi", "--model", "nope"], "no preset or file named 'nope'"),
    (["generate", "hi", "--model", "/no/such/checkpoint"], "/no/such/checkpoint"),
    (["generate", "hi", "--max-new-tokens", "many"], "expected an integer"),
    (["generate", "hi", "--max-new-tokens", "-4"], ">= 0"),
    (["generate", "hi", "--seed", "x"], "expected an integer"),
])
def test_bad_input_is_one_line_and_exit_code_2(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("bug", [ValueError("an internal bug"), TypeError("an internal bug")])
def test_an_internal_error_keeps_its_traceback(monkeypatch, bug):
    """Only GptforgeError, FileNotFoundError and PermissionError are the user's mistake; a plain ValueError or
    TypeError raised inside a verb is a bug and must propagate, not become exit 2."""
    import gptforge.checkpoint

    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(gptforge.checkpoint, "load_config", broken)
    with pytest.raises(type(bug), match="an internal bug"):
        main(["info", "book-124m"])


def test_a_file_we_may_not_read_is_exit_2(monkeypatch, capsys):
    """A PermissionError (a checkpoint, data or output path this user may not read or write) is
    the user's to fix: one line, exit 2. (Tests run as root, where chmod 000 does not stop a read.)"""
    import gptforge.checkpoint

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/runs/x/checkpoint/config.json")

    monkeypatch.setattr(gptforge.checkpoint, "load_config", denied)
    assert main(["info", "book-124m"]) == 2
    err = capsys.readouterr().err
    assert err == "gptforge: error: [Errno 13] Permission denied: '/runs/x/checkpoint/config.json'\n"


@pytest.mark.parametrize("args, message", [
    (["generate", "x", "--top-k", "0"], "--top-k"),
    (["generate", "x", "--temperature", "hot"], "expected a number"),
    (["serve", "--port", "70000"], "--port"),
    (["train", "--batch-size", "-1"], "--batch-size"),
    (["train", "--set", "nonsense=3"], "unknown GPTConfig fields (--set KEY=VALUE) ['nonsense']"),
    (["train", "--data", "x.txt", "--lora-alpha", "8"], "--lora-alpha only applies to LoRA training: add --lora-rank"),
    (["generate", "x", "--seed", str(10**23)], "--seed: expected an integer >= 0 and <= 9223372036854775807"),
    (["eval", "--data", "x", "--seed", str(10**23)], "--seed"),
    (["train", "--seed", str(10**23)], "--seed"),
    (["finetune", "classify", "--seed", str(10**23)], "--seed"),
])
def test_a_bad_flag_value_is_exit_2_and_one_line(capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_an_output_path_that_cannot_be_a_folder_is_exit_2(tmp_path, capsys, tiny_config):
    """--out under (or at) a file: one line and exit 2 from convert and train, the file untouched."""
    import json

    import torch

    from gptforge.checkpoint import save
    from gptforge.model import GPTModel

    save(GPTModel(tiny_config(vocab_size=50257)), tmp_path / "tiny")
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    (tmp_path / "cfg.json").write_text(json.dumps(tiny_config(vocab_size=50257)))
    (tmp_path / "text.txt").write_text("Every effort moves you. " * 40)
    for argv in (["convert", str(tmp_path / "tiny"), "--to", "gptforge", "--out", str(notes / "out")],
                 ["train", "--data", str(tmp_path / "text.txt"), "--model", str(tmp_path / "cfg.json"),
                  "--out", str(notes), "--no-progress"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "notes.txt is a file, not a folder" in err and err.count("\n") == 1, err
    assert notes.read_text() == "mine"


@pytest.mark.parametrize("suffix, text", [(".json", '{"max_step": 3}'), (".toml", "max_step = 3")])
def test_a_training_config_file_with_an_unknown_key_is_exit_2(tmp_path, capsys, suffix, text):
    config = tmp_path / f"run{suffix}"
    config.write_text(text)
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "unknown training options ['max_step']" in err and err.count("\n") == 1, err


def test_an_empty_model_or_out_is_exit_2_and_writes_nothing_here(tmp_path, monkeypatch, capsys, tiny_config):
    """`--out ''` and `--model ''` were Path(''), the current directory: train and finetune wrote
    their run into it and generate loaded whatever run folder was there."""
    import json

    from gptforge.checkpoint import save
    from gptforge.model import GPTModel

    save(GPTModel(tiny_config(vocab_size=50257)), tmp_path / "tiny")
    (tmp_path / "cfg.json").write_text(json.dumps(tiny_config(vocab_size=50257)))
    (tmp_path / "text.txt").write_text("Every effort moves you. " * 40)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    tiny, cfg, text = str(tmp_path / "tiny"), str(tmp_path / "cfg.json"), str(tmp_path / "text.txt")
    for argv, message in ((["train", "--data", text, "--model", cfg, "--out", "", "--no-progress"], "out must name"),
                          (["train", "--data", text, "--model", "", "--out", "run"], "no model given"),
                          (["finetune", "classify", "--model", tiny, "--data", text, "--out", ""], "--out must name"),
                          (["convert", tiny, "--to", "gptforge", "--out", ""], "output path is empty"),
                          (["generate", "hi", "--model", ""], "no model given"),
                          (["eval", "--model", " ", "--data", text], "no model given")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert list(here.iterdir()) == []


def test_a_config_file_that_cannot_be_read_is_exit_2(tmp_path, capsys):
    """train --config and --config beside a book state dict: a folder (as a file without read
    permission) or bytes that are not UTF-8 were IsADirectoryError/UnicodeDecodeError tracebacks."""
    (tmp_path / "folder.json").mkdir()
    (tmp_path / "bytes.json").write_bytes(b"\xff\xfe{")
    for name, reason in (("folder.json", "Is a directory"), ("bytes.json", "can't decode")):
        path = str(tmp_path / name)
        for argv in (["train", "--config", path], ["info", "book-124m", "--config", path]):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert f"{path} cannot be read (" in err and reason in err and err.count("\n") == 1, err


SIGTERM_MID_WRITE = """
import os, signal, sys
from gptforge import cli
from gptforge.io import atomic_write

def convert(args):  # SIGTERM arrives while the output is being written
    atomic_write(args.out, lambda tmp: (tmp.write_text("half"), os.kill(os.getpid(), signal.SIGTERM)))

cli.cmd_convert = convert
sys.exit(cli.main(["convert", "x", "--to", "gguf", "--out", sys.argv[1]]))
"""


def test_sigterm_mid_write_is_exit_130_one_line_and_leaves_no_temp_file(tmp_path):
    out = tmp_path / "m.gguf"
    out.write_text("earlier")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run([sys.executable, "-c", SIGTERM_MID_WRITE, str(out)], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 130 and result.stderr == "gptforge: interrupted\n", result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"] and out.read_text() == "earlier"


def test_version(capsys):
    import gptforge

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"gptforge {gptforge.__version__}"


@pytest.mark.parametrize("args, hint", [
    (["genrate", "hi"], "did you mean generate?"),
    (["finetune", "clasify"], "did you mean classify?"),
    (["generate", "hi", "--dtype", "bfloat"], "did you mean bfloat16?"),
])
def test_a_mistyped_verb_or_choice_names_the_closest(capsys, args, hint):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert hint in err and err.count("\n") == 1


@pytest.mark.parametrize("name, hint", [("gpt2-124", "gpt2-124m"), ("gpt2-125m", "gpt2-124m"), ("GPT2-355", "gpt2-355m"),
                                        ("book-124", "book-124m"), ("gptforge-shakespear", "gptforge-shakespeare")])
def test_a_mistyped_preset_names_the_closest_instead_of_asking_the_hub(capsys, monkeypatch, name, hint):
    import gptforge.checkpoint.hub as hub

    monkeypatch.setattr(hub, "hub_download", lambda *a, **k: pytest.fail("a preset's typo went to the hub"))
    assert main(["info", name]) == 2
    err = capsys.readouterr().err
    assert f"no preset or file named {name!r}; did you mean {hint}?" in err and err.count("\n") == 1


def test_a_flag_must_be_spelled_whole(capsys):
    """No prefix matching: `--temp` is not --temperature (a later --temp-something would change it)."""
    assert main(["generate", "hi", "--temp", "0.5"]) == 2
    assert "unrecognized arguments: --temp 0.5" in capsys.readouterr().err


def test_an_untrained_preset_says_so_and_names_openais_weights(capsys, monkeypatch, tiny_config):
    """One stderr line for a preset's random weights, naming the hub id of the trained ones in its
    shape; none for the book's seed reproduction (book-124m with --seed), nor for a checkpoint."""
    import gptforge.checkpoint
    from gptforge.model import GPTModel

    monkeypatch.setattr(gptforge.checkpoint, "load", lambda *a, **k: GPTModel(tiny_config(vocab_size=50257)).eval())
    run = ["--max-new-tokens", "2", "--no-stream"]
    notes = {}
    for model, extra in (("gpt2-124m", []), ("gpt2-774m", []), ("book-124m", []), ("book-124m", ["--seed", "123"]),
                         ("gptforge-shakespeare", [])):
        assert main(["generate", "Hello", "--model", model, *run, *extra]) == 0
        notes[model, bool(extra)] = capsys.readouterr().err.splitlines()
    assert notes["gpt2-124m", False] == ["gptforge: note: gpt2-124m is an untrained preset (random weights), so its "
                                         "text is gibberish; for OpenAI's trained GPT-2 in this shape use --model gpt2 "
                                         "(from the Hugging Face hub)"]
    assert "--model gpt2-large" in notes["gpt2-774m", False][0]
    assert "--model gpt2 " in notes["book-124m", False][0]
    assert notes["book-124m", True] == [] and notes["gptforge-shakespeare", False] == []
