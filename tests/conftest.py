"""Shared fixtures: the seed's config, tiny configs, the book's reference package, corpora."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The seed's GPT_CONFIG_124M, exactly as the book writes it.
GPT_CONFIG_124M = {
    "vocab_size": 50257, "context_length": 1024, "emb_dim": 768, "n_heads": 12,
    "n_layers": 12, "drop_rate": 0.1, "qkv_bias": False,
}
SEED_IDS = [15496, 11, 314, 716, 27018, 24086, 47843, 30961, 42348, 7267]
SEED_TEXT = "Hello, I am Featureiman Byeswickattribute argue"

# ../shared/data beside the checkout; GPTFORGE_DATA_DIR points elsewhere (a git worktree, say).
DATA_DIR = Path(os.environ.get("GPTFORGE_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")


def _tiny_config(**changes) -> dict:
    """A model small enough for any test, in the book's dict keys (97 tokens; pass vocab_size=50257 for GPT-2 text)."""
    cfg = {"vocab_size": 97, "context_length": 16, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
           "drop_rate": 0.0, "qkv_bias": True}
    cfg.update(changes)
    return cfg


@pytest.fixture(scope="session")
def tiny_config():
    """The one tiny config, as a factory: `tiny_config(vocab_size=97, context_length=16)`."""
    return _tiny_config


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end tests that start subprocesses (deselect with -m 'not slow')")


@pytest.fixture
def book():
    """The book's own package (llms-from-scratch), the seed's reference code."""
    return pytest.importorskip("llms_from_scratch.ch04", reason="llms-from-scratch is not installed")


@pytest.fixture
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"corpora not found at {DATA_DIR} (../shared/data beside the checkout)")
    return DATA_DIR
