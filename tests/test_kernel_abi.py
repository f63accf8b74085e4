"""The C boundary: the compiled kernels' struct layout against kernels/abi.py's ctypes mirrors (a
drift falls back to PyTorch with a warning), allocation failures in C as MemoryError, and no
process-wide change made by `import gptforge`."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from gptforge.fast import kernels
from gptforge.fast.kernels import abi

needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"gptforge kernels: {kernels.describe()}")


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)


@needs_kernels
def test_the_library_reports_the_layout_the_mirrors_declare():
    reported = abi.reported_layout(kernels.library())
    assert reported == abi.expected_layout()
    assert reported[0] == abi.ABI_VERSION
    # gf_lin is 8 eight-byte fields
    assert reported[1] == 8 * 8 == ctypes.sizeof(abi.Linear)
    assert abi.mismatch(kernels.library()) is None


@needs_kernels
@pytest.mark.parametrize("drift", ["version", "struct"])
def test_a_layout_drift_falls_back_to_pytorch_with_a_warning(drift):
    # A mirror that no longer matches C (a field lost on the Python side, or another version) must never
    # reach the C code: the kernels are refused and generation runs on PyTorch's path, the same tokens.
    change = ("abi.ABI_VERSION = abi.ABI_VERSION + 1\n" if drift == "version" else
              "class Drifted(ctypes.Structure):  # gf_lin without its last field\n"
              "    _fields_ = abi.Linear._fields_[:-1]\n"
              "abi.STRUCTS = (Drifted, abi.Block, abi.Model)\n")
    result = _run("import ctypes, warnings\nimport torch\nfrom gptforge.fast.kernels import abi\n" + change + textwrap.dedent("""
        import gptforge
        from gptforge.fast import kernels
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert kernels.library() is None
        print(kernels.describe())
        print([str(w.message) for w in caught])
        torch.manual_seed(0)
        cfg = gptforge.GPTConfig(vocab_size=97, context_length=32, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0)
        model = gptforge.GPTModel(cfg).eval()
        out = gptforge.generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=5)
        with torch.no_grad():  # greedy by the book's forward pass, no cache
            ids = torch.tensor([[1, 2, 3]])
            for _ in range(5):
                ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
        print(out.tolist() == ids.tolist())
    """))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "unavailable (C structs differ from gptforge/fast/kernels/abi.py)"
    assert "do not match their Python declarations" in lines[1]
    assert lines[2] == "True"


@needs_kernels
def test_a_failed_allocation_in_c_is_a_memory_error_not_a_crash(tiny_config):
    from gptforge import GPTModel
    from gptforge.fast.blocks import FusedTransformerBlock
    from gptforge.model import KVCache
    from gptforge.fast import prepare_for_inference

    cfg = tiny_config()
    model = prepare_for_inference(GPTModel(cfg).eval())
    block = model.trf_blocks[0]
    assert type(block) is FusedTransformerBlock
    spec = block.c_block.spec
    keys = torch.zeros(1, cfg['n_heads'], 8, cfg['emb_dim'] // cfg['n_heads'])
    x = torch.randn(1, 1, cfg['emb_dim'])
    # a start position so far out that the block's working memory (its attention scores) cannot be had
    with pytest.raises(MemoryError, match="gf_block_decode"):
        kernels.call("gf_block_decode", ctypes.addressof(spec), x.data_ptr(), 1, 1, keys.data_ptr(),
                     keys.data_ptr(), keys.stride(0), keys.shape[2], 2**60 // cfg['n_heads'], 0, None, 1)
    # the flag was cleared: the next call is an ordinary one
    cache = KVCache(cfg, 1)
    out = model(torch.tensor([[1, 2]]), cache=cache)
    assert torch.isfinite(out).all()


def test_import_changes_nothing_process_wide():
    result = _run(textwrap.dedent("""
        import os
        from torch.optim import optimizer
        os.umask(0o027)
        hooks = len(optimizer._global_optimizer_post_hooks)
        import gptforge, gptforge.fast, gptforge.io, gptforge.serve, gptforge.train
        print(oct(os.umask(0o027)), len(optimizer._global_optimizer_post_hooks) - hooks)
    """))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0o27", "0"]


def test_published_files_take_the_umask_at_the_time_of_the_write(tmp_path):
    from gptforge.io import atomic_write_bytes

    old = os.umask(0o077)
    try:
        atomic_write_bytes(tmp_path / "private.bin", b"x")
    finally:
        os.umask(old)
    atomic_write_bytes(tmp_path / "shared.bin", b"x")
    assert (tmp_path / "private.bin").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "shared.bin").stat().st_mode & 0o777 == 0o666 & ~old
