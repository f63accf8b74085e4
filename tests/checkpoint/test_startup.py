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


def test_hf_weights_are_mapped_without_a_copy(tmp_path, tiny_config):
    from gptforge.fast import inference_view

    torch.manual_seed(0)
    model = GPTModel(tiny_config(vocab_size=50257))
    gptforge.save(model, tmp_path / "hf", format="hf")
    loaded = gptforge.load(tmp_path / "hf")
    fc = loaded.trf_blocks[0].ff.layers[0].weight
    assert torch.equal(fc, model.trf_blocks[0].ff.layers[0].weight)
    assert not fc.is_contiguous() and fc.t().is_contiguous()  # Conv1D's (in, out) storage, not copied
    decoding = inference_view(loaded).trf_blocks[0].ff.layers[0].weight  # the kernels' (out, in) layout
    assert decoding.is_contiguous() and torch.equal(decoding, fc)
    with torch.no_grad():
        fc.add_(1.0)  # copy-on-write pages: the file keeps its values
    # an in-place change (an optimizer step's) to a transposed weight makes the view anew
    assert torch.equal(inference_view(loaded).trf_blocks[0].ff.layers[0].weight, fc)
    again = gptforge.load(tmp_path / "hf")
    assert torch.equal(again.trf_blocks[0].ff.layers[0].weight, model.trf_blocks[0].ff.layers[0].weight)
