"""The front of gptforge.checkpoint (detect_format, resolve, the FORMATS table) and the command
line on every format: convert, info, generate."""

from __future__ import annotations

import json

import pytest
import torch

import gptforge
from gptforge.checkpoint import FORMATS, SAVE_FORMATS
from gptforge.cli import main
from hf_reference import edit_json, save_reference_hf


@pytest.fixture
def hf_dir(tmp_path):
    return save_reference_hf(tmp_path / "hf")


def test_formats_table_lists_each_format_once_book_last():
    assert list(FORMATS) == ["lora", "gptforge", "hf", "gguf", "book"] and SAVE_FORMATS == ("gptforge", "hf", "gguf")
    assert [fmt.name for fmt in FORMATS.values() if fmt.takes_config] == ["book"]


def test_a_run_folder_means_its_checkpoint(tmp_path, tiny_config):
    model = gptforge.GPTModel(tiny_config()).eval()
    gptforge.save(model, tmp_path / "run" / "checkpoint")
    loaded = gptforge.load(tmp_path / "run").eval()  # `gptforge classify --model runs/spam` as well
    idx = torch.tensor([[1, 2, 3]])
    assert torch.equal(loaded(idx), model(idx))


def test_directory_that_is_no_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="without config.json"):
        gptforge.load(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="neither a gptforge config"):
        gptforge.load(tmp_path / "empty")


def test_cli_convert_then_info_and_generate_on_each_format(tmp_path, hf_dir, capsys):
    assert main(["convert", str(hf_dir), "--to", "gptforge", "--out", str(tmp_path / "ours")]) == 0
    assert "wrote gptforge checkpoint" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "ours"), "--to", "hf", "--out", str(tmp_path / "back"),
                 "--dtype", "bfloat16"]) == 0
    assert json.loads((tmp_path / "back" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (tmp_path / "back" / "tokenizer.json").is_file()  # GPT-2's vocabulary: its tokenizer comes along
    model = gptforge.load(hf_dir)
    torch.save(model.state_dict(), tmp_path / "book.pth")
    (tmp_path / "book.json").write_text(json.dumps(model.cfg.to_dict()))
    outputs = set()
    for name, extra in ((hf_dir, []), (tmp_path / "ours", []), (tmp_path / "book.pth", ["--config", str(tmp_path / "book.json")])):
        capsys.readouterr()
        assert main(["info", str(name), *extra]) == 0
        out = capsys.readouterr().out
        assert "vocab_size=50257" in out and "emb_dim=32" in out and "tie_weights=True" in out
        assert main(["generate", "Hello, I am", "--model", str(name), "--max-new-tokens", "5", *extra]) == 0
        outputs.add(capsys.readouterr().out)
    assert len(outputs) == 1  # the same weights generate the same text whatever the format
    assert outputs.pop().startswith("Hello, I am")
    assert main(["convert", str(tmp_path / "book.pth"), "--to", "hf", "--out", str(tmp_path / "x")]) == 2
    assert "pass config= to gptforge.load" in capsys.readouterr().err


def test_cli_convert_errors_are_one_line(tmp_path, hf_dir, capsys):
    edit_json(hf_dir / "config.json", layer_norm_epsilon=1e-6)
    assert main(["convert", str(hf_dir), "--to", "gptforge", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "layer_norm_epsilon" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    assert main(["info", "book-124m", "--model", "gpt2-124m"]) == 2
    assert "two models given" in capsys.readouterr().err
    (tmp_path / "cfg.json").write_text(json.dumps(gptforge.preset("book-124m").to_dict()))
    assert main(["info", "book-124m", "--config", str(tmp_path / "cfg.json")]) == 2
    assert "config= is only for the book's state dicts" in capsys.readouterr().err


def test_a_single_file_of_the_wrong_kind_is_named(tmp_path, tiny_config, capsys):
    """Every single file no format claims is tried as a state dict; a config JSON, a .gguf without
    GGUF's magic and a pickle of other objects say what they are, not torch's page of advice."""
    from pathlib import PurePosixPath

    (tmp_path / "cfg.json").write_text(json.dumps(tiny_config()))
    (tmp_path / "empty.gguf").write_bytes(b"")
    (tmp_path / "text.gguf").write_text("not a model")
    torch.save({"tok_emb.weight": torch.zeros(2, 2), "where": PurePosixPath("x")}, tmp_path / "other.pth")
    for name, message in (("cfg.json", "cfg.json is JSON, not a checkpoint"),
                          ("empty.gguf", "empty.gguf is not a GGUF file"), ("text.gguf", "text.gguf is not a GGUF file"),
                          ("other.pth", "other.pth cannot be read as a PyTorch state dict: it is not a weights-only")):
        assert main(["info", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "PyTorch 2.6" not in err, err


def test_wrong_types_of_name_path_and_dtype_are_named(tmp_path, tiny_config):
    model = gptforge.GPTModel(tiny_config())
    ckpt = gptforge.save(model, tmp_path / "ckpt")
    for name in (None, 5):  # were looked up as the names 'None' and '5' on the hub
        with pytest.raises(gptforge.GptforgeError, match="must be a str or pathlib.Path, got"):
            gptforge.load(name)
    for dtype in ("float16", torch.int64):  # 'Invalid device string', then a load_state_dict error
        with pytest.raises(gptforge.GptforgeError, match="dtype must be a floating torch.dtype"):
            gptforge.load(ckpt, dtype=dtype)
    with pytest.raises(gptforge.GptforgeError, match="out_dir must be a str or pathlib.Path"):
        gptforge.save(model, None)
    with pytest.raises(gptforge.GptforgeError, match="ckpt_dir must be a str or pathlib.Path"):
        gptforge.load_training_state(None)
    assert gptforge.load(ckpt, dtype=torch.bfloat16).tok_emb.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("fmt", ["gptforge", "hf", "gguf", "book", "lora"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_that_are_not_finite_are_refused_at_load_naming_the_tensor(tmp_path, tiny_config, capsys, fmt, bad):
    """Such a model would load, then fail (or talk nonsense) at its first token: refused in one line."""
    from gptforge.lora import apply_lora, lora_layers

    torch.manual_seed(0)
    model = gptforge.GPTModel(tiny_config(vocab_size=50257)).eval()
    with torch.no_grad():
        if fmt == "lora":
            gptforge.save(model, tmp_path / "base")
            model = gptforge.load(tmp_path / "base")
            apply_lora(model, rank=2, alpha=4)
            model.lora_base = str(tmp_path / "base")
            next(iter(lora_layers(model).values())).lora.B[0, 1] = bad
            name = "lora.B"
        else:
            model.trf_blocks[1].ff.layers[0].weight[3, 5] = bad
            name = "trf_blocks.1.ff.layers.0.weight"
    shape = {}  # a book state dict of a width GPT-2 never had needs its config
    if fmt == "book":
        path = tmp_path / "model.pth"
        torch.save(model.state_dict(), path)
        (tmp_path / "cfg.json").write_text(json.dumps(tiny_config(vocab_size=50257)))
        shape = {"config": tiny_config(vocab_size=50257)}
    else:
        path = gptforge.save(model, tmp_path / ("m.gguf" if fmt == "gguf" else "m"), format="gptforge"
                             if fmt == "lora" else fmt)
    with pytest.raises(gptforge.GptforgeError, match=rf"tensor \S*{name}\S* has 1 of its \d+ values not finite"):
        gptforge.load(path, **shape)
    flags = ["--config", str(tmp_path / "cfg.json")] if shape else []
    assert main(["generate", "Hello", "--model", str(path), "--max-new-tokens", "2", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not finite" in err and name in err, err
