"""Start-up cost of gptforge.load: building the model skeleton must not import torch._dynamo (its
first import is 1-4 s, more than reading a 124M checkpoint) and must leave nn.init as it was."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import gptforge
from gptforge import GPTModel

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.mark.slow
def test_load_does_not_import_dynamo(tmp_path, tiny_config):
    torch.manual_seed(0)
    gptforge.save(GPTModel(tiny_config()), tmp_path / "ckpt")
    code = ("import sys, gptforge; m = gptforge.load(sys.argv[1]); "
            "print('torch._dynamo' in sys.modules, float(m.tok_emb.weight.abs().sum()) > 0)")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ckpt")], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]


def test_load_restores_initialisers(tmp_path, tiny_config):
    original = nn.init.normal_
    torch.manual_seed(0)
    model = GPTModel(tiny_config())
    gptforge.save(model, tmp_path / "ckpt")
    loaded = gptforge.load(tmp_path / "ckpt")
    assert nn.init.normal_ is original
    assert torch.equal(loaded.tok_emb.weight, model.tok_emb.weight)
    torch.manual_seed(0)
    assert torch.equal(GPTModel(tiny_config()).tok_emb.weight, model.tok_emb.weight)  # init still runs


def test_hf_weights_are_mapped_and_decoded_in_place(tmp_path, tiny_config):
    """A Hugging Face checkpoint's Conv1D weights (in, out) are views of the mapped file, c_attn's
    thirds included: no copy at load, and none when decoding where gptforge's kernels run (they
    read that layout in place); the view computes the model's function and follows in-place edits."""
    from gptforge.fast import inference_view, kernels

    torch.manual_seed(0)
    model = GPTModel(tiny_config(vocab_size=50257))
    gptforge.save(model, tmp_path / "hf", format="hf")
    loaded = gptforge.load(tmp_path / "hf")
    block = loaded.trf_blocks[0]
    fc, query, key = block.ff.layers[0].weight, block.att.W_query.weight, block.att.W_key.weight
    assert torch.equal(fc, model.trf_blocks[0].ff.layers[0].weight)
    assert torch.equal(key, model.trf_blocks[0].att.W_key.weight)
    assert not fc.is_contiguous() and fc.t().is_contiguous()  # Conv1D's (in, out) storage, not copied
    assert key.data_ptr() == query.data_ptr() + 4 * query.shape[0]  # the next third of c_attn's rows
    view = inference_view(loaded)
    if kernels.available():  # the kernels read the weights where they are
        assert view.trf_blocks[0].ff.layers[0].weight.data_ptr() == fc.data_ptr()
        assert view.trf_blocks[0].att.W_key.weight.data_ptr() == key.data_ptr()
    idx = torch.randint(0, 50257, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(view(idx), model(idx), rtol=1e-4, atol=1e-4)
        fc.add_(0.5)  # copy-on-write pages: the file keeps its values
        key.mul_(2.0)
        torch.testing.assert_close(inference_view(loaded)(idx), loaded(idx), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(loaded(idx), model(idx), atol=1e-2)
    again = gptforge.load(tmp_path / "hf")
    assert torch.equal(again.trf_blocks[0].ff.layers[0].weight, model.trf_blocks[0].ff.layers[0].weight)
