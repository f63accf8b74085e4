"""The book's state dicts, Hugging Face configs and files that cannot be loaded, hub ids through a
prepared local hub cache (never the network), and the convert / info / generate command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gptforge
from conftest import _tiny_config as tiny_config  # TODO(restructure): use the fixture
from gptforge.checkpoint import read_safetensors
from gptforge.cli import main

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-5


# ---------------------------------------------------------------------------------------------
# The book's state dicts


def _book_model(book, cfg, seed=123):
    torch.manual_seed(seed)
    return book.GPTModel(cfg).eval()


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_book_state_dict_gives_the_books_logits(book, tmp_path, qkv_bias):
    cfg = tiny_config(qkv_bias=qkv_bias)
    ref = _book_model(book, cfg)
    assert any(k.endswith("att.mask") for k in ref.state_dict())  # the book saves its mask buffers
    torch.save(ref.state_dict(), tmp_path / "model.pth")
    model = gptforge.load(tmp_path / "model.pth", config=cfg)
    assert model.cfg.qkv_bias == qkv_bias and not model.cfg.tie_weights
    ids = torch.randint(0, cfg["vocab_size"], (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids), rtol=0, atol=ATOL)


def test_book_chapter5_checkpoint_and_inferred_heads(book, tmp_path):
    # GPT-2 small's width: n_heads (12) is inferred; the book's ch05 saves model + optimizer.
    cfg = tiny_config(emb_dim=768, n_heads=12, n_layers=1, context_length=8, qkv_bias=False)
    ref = _book_model(book, cfg)
    opt = torch.optim.AdamW(ref.parameters())
    torch.save({"model_state_dict": ref.state_dict(), "optimizer_state_dict": opt.state_dict()},
               tmp_path / "model_and_optimizer.pth")
    model = gptforge.load(tmp_path / "model_and_optimizer.pth")
    assert model.cfg.n_heads == 12 and model.cfg.context_length == 8
    ids = torch.randint(0, cfg["vocab_size"], (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids), rtol=0, atol=ATOL)


def test_book_state_dict_errors(book, tmp_path):
    cfg = tiny_config()
    torch.save(_book_model(book, cfg).state_dict(), tmp_path / "model.pth")
    with pytest.raises(ValueError, match="width 32 does not say its number of heads; pass config="):
        gptforge.load(tmp_path / "model.pth")
    with pytest.raises(ValueError, match="n_layers is 2 in the file, 3 in the config"):
        gptforge.load(tmp_path / "model.pth", config=tiny_config(n_layers=3))
    with pytest.raises(ValueError, match="vocab_size is 97 in the file, 100 in the config"):
        gptforge.load(tmp_path / "model.pth", config=tiny_config(vocab_size=100))
    (tmp_path / "cut.pth").write_bytes((tmp_path / "model.pth").read_bytes()[:2000])
    with pytest.raises(ValueError, match="cannot be read as a PyTorch state dict"):
        gptforge.load(tmp_path / "cut.pth", config=cfg)


class Payload:  # a pickled object that full unpickling would construct: refused
    def __reduce__(self):
        return (os.system, ("echo unpickled > /dev/null",))


def test_pickles_are_read_weights_only(tmp_path):
    torch.save({"tok_emb.weight": torch.zeros(2, 2), "evil": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="weights-only"):
        gptforge.load(tmp_path / "evil.pth")


def test_own_state_dict_with_tied_head_stays_tied(tmp_path):
    torch.manual_seed(0)
    model = gptforge.GPTModel(gptforge.GPTConfig(**tiny_config(emb_dim=768, n_heads=12, n_layers=1),
                                                 tie_weights=True)).eval()
    torch.save(model.state_dict(), tmp_path / "m.pth")  # torch.save keeps the shared storage
    back = gptforge.load(tmp_path / "m.pth")
    assert back.cfg.tie_weights and back.out_head.weight is back.tok_emb.weight


# ---------------------------------------------------------------------------------------------
# Hugging Face files and configs that cannot be loaded


@pytest.fixture
def hf_dir(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=50257, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    ref.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("changes, message", [
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon 1e-06 is not supported"),
    ({"activation_function": "relu"}, "activation_function 'relu' is not supported"),
    ({"n_inner": 100}, "n_inner=100 is not supported"),
    ({"vocab_size": 50000}, r"tok_emb.weight has shape \(50257, 32\).*vocab_size 50257, the config 50000"),
    ({"n_layer": 3}, "missing tensors trf_blocks.2"),
    ({"n_embd": 64}, "has shape"),
    ({"n_head": 5}, "must be divisible by n_heads"),
])
def test_bad_hf_configs_are_named(hf_dir, changes, message):
    _edit_json(hf_dir / "config.json", **changes)
    with pytest.raises(ValueError, match=message):
        gptforge.load(hf_dir)


def test_bad_hf_weights_are_named(hf_dir):
    from safetensors.torch import save_file

    weights = hf_dir / "model.safetensors"
    tensors = read_safetensors(weights)
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) - 1000])
    with pytest.raises(ValueError, match="truncated"):
        gptforge.load(hf_dir)
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match="header is not valid JSON"):
        gptforge.load(hf_dir)
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors trf_blocks.1.ff.layers.0.bias"):
        gptforge.load(hf_dir)
    tensors["transformer.h.1.mlp.c_fc.bias"] = torch.zeros(128)
    tensors["transformer.h.0.mlp.c_gate.weight"] = torch.zeros(3)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="unexpected tensor 'transformer.h.0.mlp.c_gate.weight'"):
        gptforge.load(hf_dir)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors or pytorch_model.bin"):
        gptforge.load(hf_dir)


def test_untied_config_without_head_is_an_error(hf_dir):
    _edit_json(hf_dir / "config.json", tie_word_embeddings=False)
    with pytest.raises(ValueError, match="no lm_head.weight"):
        gptforge.load(hf_dir)


def test_directory_that_is_no_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="without config.json"):
        gptforge.load(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="neither a gptforge config"):
        gptforge.load(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------
# Hub ids, through a hub cache prepared here; HF_HUB_OFFLINE=1 so nothing touches the network.


def _hub_cache(tmp_path, hf_dir, repo_id="tiny-org/tiny-gpt2", files=("config.json", "model.safetensors")):
    """The huggingface_hub cache layout: models--ORG--NAME/{refs/main, snapshots/COMMIT/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name in files:
        (snapshot / name).write_bytes((hf_dir / name).read_bytes())
    return tmp_path / "hub"


def test_hub_id_from_the_cache_offline(tmp_path, hf_dir, monkeypatch):
    from huggingface_hub import constants

    hub = _hub_cache(tmp_path, hf_dir)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model = gptforge.load("tiny-org/tiny-gpt2")
    direct = gptforge.load(hf_dir)
    for key, value in direct.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)
    with pytest.raises(FileNotFoundError, match=r"no preset or file named 'gpt2'.*offline.*pass its directory"):
        gptforge.load("gpt2")
    # Only the config cached: enough for its shape, not for the model.
    _hub_cache(tmp_path, hf_dir, "tiny-org/config-only", files=("config.json",))
    assert gptforge.checkpoint.load_config("tiny-org/config-only") == direct.cfg
    with pytest.raises(FileNotFoundError, match="offline"):
        gptforge.load("tiny-org/config-only")


def test_cli_hub_id_offline_and_missing(tmp_path, hf_dir):
    # A real process, so that the environment variables are read as a user's shell sets them.
    env = {"HF_HUB_CACHE": str(_hub_cache(tmp_path, hf_dir)), "HF_HUB_OFFLINE": "1"}
    code = ("from gptforge.cli import main\n"
            "assert main(['info', '--model', 'tiny-org/tiny-gpt2']) == 0\n"
            "raise SystemExit(main(['generate', 'hi', '--model', 'openai-community/gpt2-medium']))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src"), **env})
    assert "emb_dim=32" in result.stdout and "n_layers=2" in result.stdout, result.stderr
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "offline" in result.stderr and "pass its directory" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# The command line: convert, and info / generate on every format


def test_cli_convert_then_info_and_generate_on_each_format(tmp_path, hf_dir, capsys):
    assert main(["convert", str(hf_dir), "--to", "gptforge", "--out", str(tmp_path / "ours")]) == 0
    assert "wrote gptforge checkpoint" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "ours"), "--to", "hf", "--out", str(tmp_path / "back"),
                 "--dtype", "bfloat16"]) == 0
    assert json.loads((tmp_path / "back" / "config.json").read_text())["torch_dtype"] == "bfloat16"
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
    _edit_json(hf_dir / "config.json", layer_norm_epsilon=1e-6)
    assert main(["convert", str(hf_dir), "--to", "gptforge", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "layer_norm_epsilon" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    assert main(["info", "book-124m", "--model", "gpt2-124m"]) == 2
    assert "two models given" in capsys.readouterr().err
    (tmp_path / "cfg.json").write_text(json.dumps(gptforge.preset("book-124m").to_dict()))
    assert main(["info", "book-124m", "--config", str(tmp_path / "cfg.json")]) == 2
    assert "config= is only for the book's state dicts" in capsys.readouterr().err
