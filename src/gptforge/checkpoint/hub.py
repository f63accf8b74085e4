"""Hugging Face hub ids ("gpt2", "openai-community/gpt2-medium"): found in the hub cache, or
downloaded into it when online; offline and uncached is a FileNotFoundError saying what to do."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..config import PRESETS
from ..errors import GptforgeError
from .base import CONFIG_FILE, HF_BIN_FILE, WEIGHTS_FILE

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def looks_like_hub_id(name: str) -> bool:
    """`owner/name` or `name`, and not a file name of a checkpoint that does not exist."""
    return bool(_HUB_ID.match(name)) and not name.endswith((".pt", ".pth", ".bin", ".safetensors", ".json"))



class _NoHubWeights(FileNotFoundError):
    """A hub repo (or its cached copy) without GPT-2 weight files."""


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def hub_download(repo_id: str, weights: bool = True) -> Path:
    """The local snapshot directory of a Hugging Face model repo (config.json, and the weights
    unless `weights` is False), from the hub cache, downloading into it when online. Offline and
    not cached: FileNotFoundError saying how to use a local directory instead."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError
    except ImportError:
        raise GptforgeError(f"{repo_id!r} looks like a Hugging Face hub id, but huggingface_hub is not "
                         f"installed; pip install huggingface_hub, or pass a local directory") from None

    def fetch(local_only: bool) -> Path:
        config = hf_hub_download(repo_id, CONFIG_FILE, local_files_only=local_only)
        if not weights:
            return Path(config).parent
        for name in (WEIGHTS_FILE, HF_BIN_FILE):
            try:
                hf_hub_download(repo_id, name, local_files_only=local_only)
                return Path(config).parent
            except EntryNotFoundError:
                continue
        raise _NoHubWeights(f"hub model {repo_id!r} has neither {WEIGHTS_FILE} nor {HF_BIN_FILE}")

    how = (f"to use a copy on disk, pass its directory (holding config.json and model.safetensors or "
           f"pytorch_model.bin) as --model / gptforge.load(path); to cache it, run "
           f"`hf download {repo_id}` where there is a network")
    missing = f"no preset or file named {repo_id!r}"
    try:
        return fetch(local_only=True)
    except (EntryNotFoundError, _NoHubWeights):
        pass  # not (fully) in the cache
    except ValueError as err:  # huggingface_hub's id validation
        raise GptforgeError(f"{missing}, and it is not a valid hub id ({err})") from None
    if _hub_offline():
        raise FileNotFoundError(f"{missing}, and the Hugging Face hub is offline (HF_HUB_OFFLINE) with "
                                f"no cached copy of it; {how}")
    if not _hub_reachable():
        raise FileNotFoundError(f"{missing}, and the Hugging Face hub cannot be reached (no network) "
                                f"with no cached copy of it; {how}")
    try:
        return fetch(local_only=False)
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{missing}, and no such model on the Hugging Face hub; presets are "
                                f"{', '.join(PRESETS)}") from None
    except _NoHubWeights:
        raise
    except (EntryNotFoundError, HfHubHTTPError, ConnectionError, OSError) as err:
        raise FileNotFoundError(f"{missing}, and downloading it from the Hugging Face hub failed "
                                f"({type(err).__name__}); {how}") from None


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """A quick TCP probe of the hub endpoint, so that no network fails in seconds rather than
    after huggingface_hub's half-minute of retries. With a proxy configured, assume reachable."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s):
            return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------
