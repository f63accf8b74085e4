"""GGUF both ways, checked against llama.cpp itself (llama-cpp-python) and llama.cpp's own
converter (`convert_hf_to_gguf.py`) and reader (gguf's GGUFReader)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gptforge
from gptforge.cli import main
from gptforge.errors import GptforgeError
from gptforge.model import GPTModel
from gptforge.tokenizer import get_tokenizer

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "ROMEO:\nWhat light through yonder window breaks?"


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[test]')")


def _llama(llama_cpp, path: Path, n_ctx: int):
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=2, logits_all=True,
                           verbose=False)


def _llama_logits(llm, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of `ids`, (T, vocab)."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def _llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    """n tokens by argmax over llama.cpp's logits, one eval per token (as its greedy sampler)."""
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


def _greedy(model, ids: list[int], n: int) -> list[int]:
    out = gptforge.generate(model, torch.tensor([ids]), max_new_tokens=n, stop_token_ids=())
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def builtin():
    return gptforge.load("gptforge-shakespeare", dtype=torch.float32)


def _random_gpt2_shaped(tiny_config, **changes) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(tiny_config(vocab_size=50257, context_length=64, **changes)).eval()


# ---------------------------------------------------------------------------------------------
# Round trip and reading


@pytest.mark.parametrize("gguf_type", ["f32", "q8_0"])
def test_a_file_replaced_while_it_loads_is_read_as_it_was(tmp_path, tiny_config, monkeypatch, gguf_type):
    """An atomic replace between two tensor reads (a download or convert finishing) must not mix the
    two files: the whole model is the one that was opened."""
    from gptforge.checkpoint.gguf import GGUFHeader

    first = _random_gpt2_shaped(tiny_config)
    torch.manual_seed(1)
    second = GPTModel(first.cfg).eval()
    path = gptforge.save(first, tmp_path / "m.gguf", format="gguf", gguf_type=gguf_type)
    replacement = gptforge.save(second, tmp_path / "new.gguf", format="gguf", gguf_type=gguf_type)
    expected = gptforge.load(path).state_dict()
    read = GGUFHeader.tensor
    names: list[str] = []

    def read_then_replace(self, name):
        tensor = read(self, name)
        if not names:
            os.replace(replacement, path)  # what `mv new.gguf m.gguf` does
        names.append(name)
        return tensor

    monkeypatch.setattr(GGUFHeader, "tensor", read_then_replace)
    loaded = gptforge.load(path).state_dict()
    assert len(names) > 10
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    assert not torch.equal(gptforge.load(path).tok_emb.weight, expected["tok_emb.weight"])  # the file did change


@pytest.mark.parametrize("changes", [{}, {"qkv_bias": False, "tie_weights": True}])
def test_f32_round_trip_is_bit_exact(tmp_path, tiny_config, changes):
    model = _random_gpt2_shaped(tiny_config, **changes)
    back = gptforge.load(gptforge.save(model, tmp_path / "m.gguf", format="gguf"))
    assert back.cfg == model.cfg
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_layout_read_by_ggufs_own_reader(tmp_path, builtin):
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFReader

    path = gptforge.save(builtin, tmp_path / "m.gguf", format="gguf", gguf_type="q8_0")
    reader = GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()
              if name not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")}
    cfg = builtin.cfg
    assert fields["general.architecture"] == "gpt2"
    assert (fields["gpt2.block_count"], fields["gpt2.embedding_length"], fields["gpt2.attention.head_count"],
            fields["gpt2.context_length"], fields["gpt2.feed_forward_length"]) == (
        cfg.n_layers, cfg.emb_dim, cfg.n_heads, cfg.context_length, 4 * cfg.emb_dim)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.bos_token_id"] == 50256
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == 50257 and tokens.contents(50256) == "<|endoftext|>" and tokens.contents(262) == "Ġthe"
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert tensors["token_embd.weight"].tensor_type == Q.Q8_0
    assert tensors["position_embd.weight"].tensor_type == Q.F32  # as llama.cpp's converter keeps it
    assert tensors["blk.0.attn_norm.weight"].tensor_type == Q.F32
    assert tuple(tensors["blk.0.attn_qkv.weight"].shape) == (cfg.emb_dim, 3 * cfg.emb_dim)  # GGML order
    assert tuple(tensors["blk.0.ffn_down.weight"].shape) == (4 * cfg.emb_dim, cfg.emb_dim)


def test_quantized_files_load_dequantized(tmp_path, builtin):
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize, quantize

    ids = torch.tensor([get_tokenizer().encode(PROMPT)])
    with torch.no_grad():
        ref = builtin(ids)
    for kind, qtype in (("bf16", Q.BF16), ("q8_0", Q.Q8_0), ("q4_0", Q.Q4_0)):
        model = gptforge.load(gptforge.save(builtin, tmp_path / f"m-{kind}.gguf", format="gguf", gguf_type=kind))
        w = builtin.trf_blocks[0].ff.layers[0].weight.detach().numpy()
        expected = dequantize(quantize(w, qtype), qtype)  # gguf's reference round trip
        assert np.array_equal(model.trf_blocks[0].ff.layers[0].weight.detach().numpy(), expected)
        with torch.no_grad():
            logits = model(ids)
            agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
        if kind == "bf16":  # the built-in model's weights are stored in bf16: nothing lost
            assert torch.equal(logits, ref)
        print(f"{kind}: top-1 agreement with fp32 {agree:.3f}")
        assert agree > 0.5  # a sanity bound only; the benchmark reports the figures


def test_errors(tmp_path, tiny_config):
    with pytest.raises(GptforgeError, match="vocab_size"):
        gptforge.save(GPTModel(tiny_config()), tmp_path / "small.gguf", format="gguf")
    model = _random_gpt2_shaped(tiny_config)
    with pytest.raises(GptforgeError, match="gguf_type is for format='gguf'"):
        gptforge.save(model, tmp_path / "hf", format="hf", gguf_type="q8_0")
    with pytest.raises(GptforgeError, match="unknown GGUF type"):
        gptforge.save(model, tmp_path / "m.gguf", format="gguf", gguf_type="q5_k")
    data = gptforge.save(model, tmp_path / "m.gguf", format="gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(GptforgeError, match="truncated"):
        gptforge.load(tmp_path / "cut.gguf")
    (tmp_path / "head.gguf").write_bytes(data[:1000])
    with pytest.raises(GptforgeError, match="truncated or corrupted"):
        gptforge.load(tmp_path / "head.gguf")

    import gguf

    writer = gguf.GGUFWriter(tmp_path / "llama.gguf", "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GptforgeError, match="architecture 'llama'"):
        gptforge.load(tmp_path / "llama.gguf")


def test_cli_convert_to_gguf(tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert main(["convert", "gptforge-shakespeare", "--to", "gguf", "--out", str(out), "--gguf-type", "f16"]) == 0
    assert "Q" not in capsys.readouterr().out.split("parameters")[-1]
    assert gptforge.checkpoint.load_config(out) == gptforge.checkpoint.load_config("gptforge-shakespeare")
    assert main(["convert", "gptforge-shakespeare", "--to", "hf", "--out", str(tmp_path / "hf"),
                 "--gguf-type", "q8_0"]) == 2
    assert "--gguf-type is for --to gguf" in capsys.readouterr().err
    notes = tmp_path / "notes.txt"  # an existing file that is not a GGUF is the user's, never replaced
    notes.write_text("mine")
    assert main(["convert", "gptforge-shakespeare", "--to", "gguf", "--out", str(notes)]) == 2
    assert "notes.txt exists and is not a GGUF file" in capsys.readouterr().err
    assert notes.read_text() == "mine"
    assert main(["convert", "gptforge-shakespeare", "--to", "gguf", "--out", str(out), "--gguf-type", "q8_0"]) == 0


# ---------------------------------------------------------------------------------------------
# llama.cpp itself


@pytest.mark.parametrize("which", ["builtin", "random"])
def test_llama_cpp_greedy_tokens_equal_ours(llama_cpp, tmp_path, builtin, tiny_config, which):
    model = builtin if which == "builtin" else _random_gpt2_shaped(tiny_config)
    path = gptforge.save(model, tmp_path / "m.gguf", format="gguf")
    ids = get_tokenizer().encode(PROMPT)
    n = 40 if which == "builtin" else 20
    llm = _llama(llama_cpp, path, model.cfg.context_length)
    theirs = _llama_logits(llm, ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
    print(f"{which}: max |logit difference| llama.cpp F32 vs gptforge fp32 {np.abs(theirs - ours).max():.2e}")
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=2e-3 * np.abs(ours).max())
    assert _llama_greedy(llm, ids, n) == _greedy(model, ids, n)


def test_llama_cpp_tokenizes_like_gptforge(llama_cpp, tmp_path, tiny_config):
    path = gptforge.save(_random_gpt2_shaped(tiny_config), tmp_path / "m.gguf", format="gguf")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, vocab_only=True, verbose=False)
    text = "Hello, world!  It's 2024:\n\tcafé naïve 東京 <|endoftext|> don't  stop\n\n"
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == get_tokenizer().encode(text)
    ids = get_tokenizer().encode(PROMPT)
    assert llm.detokenize(ids).decode() == PROMPT


def test_llama_cpp_quantized_agreement_reported(llama_cpp, tmp_path, builtin):
    ids = get_tokenizer().encode(PROMPT * 3)
    with torch.no_grad():
        ref = builtin(torch.tensor([ids]))[0].numpy()
    for kind in ("bf16", "q8_0", "q4_0"):
        llm = _llama(llama_cpp, gptforge.save(builtin, tmp_path / f"m-{kind}.gguf", format="gguf", gguf_type=kind), builtin.cfg.context_length)
        theirs = _llama_logits(llm, ids)
        agree = float((theirs.argmax(-1) == ref.argmax(-1)).mean())
        print(f"llama.cpp {kind.upper()} vs gptforge fp32: top-1 agreement {agree:.3f}")
        assert agree > 0.5  # sanity only: quantization changes some choices


# ---------------------------------------------------------------------------------------------
# llama.cpp's own converter


def _converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py: $GPTFORGE_LLAMA_CPP (a llama.cpp source tree) or the copy
    .ci/run unpacks from the llama-cpp-python source package."""
    for root in (os.environ.get("GPTFORGE_LLAMA_CPP"), ROOT / ".ci" / "llama.cpp"):
        if root and (Path(root) / "convert_hf_to_gguf.py").is_file():
            return Path(root) / "convert_hf_to_gguf.py"
    pytest.skip("llama.cpp's convert_hf_to_gguf.py not found: set GPTFORGE_LLAMA_CPP to a llama.cpp "
                "source tree (or run .ci/run, which unpacks one)")


def _convert(tmp_path: Path, model: GPTModel, outtype: str) -> Path:
    """Our Hugging Face export of `model`, converted by llama.cpp's convert_hf_to_gguf.py."""
    converter = _converter()
    hf_dir = gptforge.save(model, tmp_path / "hf", format="hf")
    assert (hf_dir / "vocab.json").is_file()  # GPT-2's tokenizer files, which the converter reads
    out = tmp_path / f"converted-{outtype}.gguf"
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # it uses the gguf-py beside it
    subprocess.run([sys.executable, str(converter), str(hf_dir), "--outfile", str(out), "--outtype", outtype],
                   check=True, capture_output=True, env={**env, "HF_HUB_OFFLINE": "1"}, timeout=300)
    return out


@pytest.mark.slow
def test_our_file_is_what_llama_cpps_converter_writes(tmp_path, tiny_config):
    from gguf import GGUFReader

    model = _random_gpt2_shaped(tiny_config, tie_weights=True)
    theirs = GGUFReader(_convert(tmp_path, model, "f32"))
    ours = GGUFReader(gptforge.save(model, tmp_path / "ours.gguf", format="gguf"))
    only_theirs = set(theirs.fields) - set(ours.fields)
    assert only_theirs <= {"general.size_label"}, only_theirs
    for name in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
        assert ours.fields[name].contents() == theirs.fields[name].contents(), name
    for name, field in theirs.fields.items():
        if name.startswith(("gpt2.", "tokenizer.ggml.")) and len(field.types) == 1:
            assert ours.fields[name].contents() == field.contents(), name
    their_tensors = {t.name: t for t in theirs.tensors}
    assert sorted(t.name for t in ours.tensors) == sorted(their_tensors)
    for a in ours.tensors:
        b = their_tensors[a.name]
        assert a.tensor_type == b.tensor_type and np.array_equal(a.data, b.data), a.name


@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_llama_cpp_converter_output_loads(tmp_path, tiny_config, outtype):
    model = _random_gpt2_shaped(tiny_config, tie_weights=True)
    back = gptforge.load(_convert(tmp_path, model, outtype))
    assert back.cfg == model.cfg.replace(drop_rate=0.0)
    ids = torch.randint(0, 50257, (2, 32))
    with torch.no_grad():
        ref, got = model(ids), back(ids)
    if outtype == "f32":
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    else:
        print(f"converter Q8_0: top-1 agreement {(got.argmax(-1) == ref.argmax(-1)).float().mean():.3f}")
        torch.testing.assert_close(got, ref, rtol=0, atol=0.05 * ref.abs().max().item())
