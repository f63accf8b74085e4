"""Hub ids (checkpoint/hub.py), through a hub cache prepared here; HF_HUB_OFFLINE so nothing
touches the network."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gptforge
from hf_reference import save_reference_hf

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def hf_dir(tmp_path):
    return save_reference_hf(tmp_path / "hf")


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


@pytest.mark.slow
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
