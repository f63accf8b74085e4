"""Parity with transformers for weights round-tripped through every checkpoint format.

Reference models are random `GPT2LMHeadModel`s built here (no downloads). Each format route must
give logits within 1e-4 of transformers', the same 64-token greedy continuation as its `generate`,
the same logits token by token through the KV cache, and the same left-padded batched generation.
"""

from __future__ import annotations

import json

import pytest
import torch

import gptforge
from gptforge.checkpoint import read_safetensors
from gptforge.generation import positions_from_mask

transformers = pytest.importorskip("transformers")

SHAPES = {  # name -> GPT2Config fields; small enough to be quick, different in every dimension
    "d48-L3-h4": dict(vocab_size=101, n_positions=96, n_embd=48, n_layer=3, n_head=4),
    "d64-L2-h2-untied": dict(vocab_size=257, n_positions=128, n_embd=64, n_layer=2, n_head=2,
                             tie_word_embeddings=False),
    "d32-L1-h1-gpt2vocab": dict(vocab_size=50257, n_positions=80, n_embd=32, n_layer=1, n_head=1),
}
ROUTES = ("hf-safetensors", "hf-bare-GPT2Model", "hf-pytorch_model.bin", "gptforge", "hf-export", "book-state-dict")
ATOL = 1e-4
NEW_TOKENS = 64


def _reference(fields: dict, seed: int = 0) -> transformers.GPT2LMHeadModel:
    fields = dict(fields)
    if fields["vocab_size"] <= 50256:
        fields.update(bos_token_id=None, eos_token_id=None)
    torch.manual_seed(seed)
    # A wide initialisation makes the logits peaked, so greedy choices are far from ties.
    cfg = transformers.GPT2Config(initializer_range=0.2, **fields)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _write_bin(ref: transformers.GPT2LMHeadModel, out_dir) -> None:
    """The layout of the original hub files: bare GPT2Model keys in a pickle, with the causal-mask
    buffers (`h.N.attn.bias`, `h.N.attn.masked_bias`) that old transformers saved."""
    out_dir.mkdir()
    state = {k: v.clone() for k, v in ref.transformer.state_dict().items()}
    n = ref.config.n_positions
    for i in range(ref.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    if not ref.config.tie_word_embeddings:
        state["lm_head.weight"] = ref.lm_head.weight.detach().clone()
    torch.save(state, out_dir / "pytorch_model.bin")
    ref.config.to_json_file(out_dir / "config.json")


def _route(name: str, ref, tmp_path) -> gptforge.GPTModel:
    """Our model after the reference's weights went through one format route."""
    hf_dir = tmp_path / "hf"
    if not hf_dir.exists():
        ref.save_pretrained(hf_dir)
    if name == "hf-safetensors":
        return gptforge.load(hf_dir)
    if name == "hf-bare-GPT2Model":  # the layout of the hub's gpt2 model.safetensors
        bare = tmp_path / "bare"
        ref.transformer.save_pretrained(bare)
        tensors = read_safetensors(bare / "model.safetensors")
        assert not any(k.startswith("transformer.") for k in tensors)
        n = ref.config.n_positions
        for i in range(ref.config.n_layer):  # the hub files still carry the causal-mask buffers
            tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        if not ref.config.tie_word_embeddings:  # a bare model has no head: keep the head in the file
            tensors["lm_head.weight"] = ref.lm_head.weight.detach()
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(bare / "model.safetensors"),
                  metadata={"format": "pt"})
        return gptforge.load(bare)
    if name == "hf-pytorch_model.bin":
        _write_bin(ref, tmp_path / "bin")
        return gptforge.load(tmp_path / "bin")
    if name == "gptforge":
        gptforge.save(gptforge.load(hf_dir), tmp_path / "ours")
        return gptforge.load(tmp_path / "ours")
    if name == "hf-export":  # ours -> HF directory -> transformers loads it -> ours loads it
        gptforge.save(gptforge.load(hf_dir), tmp_path / "export", format="hf")
        back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
        ids = torch.randint(0, ref.config.vocab_size, (2, 11))
        with torch.no_grad():
            torch.testing.assert_close(back(ids).logits, ref(ids).logits, rtol=0, atol=ATOL)
        return gptforge.load(tmp_path / "export")
    if name == "book-state-dict":
        model = gptforge.load(hf_dir)
        torch.save(model.state_dict(), tmp_path / "model.pth")
        return gptforge.load(tmp_path / "model.pth", config=model.cfg)
    raise AssertionError(name)


@torch.no_grad()
def _greedy_with_cache(model, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding through the KV cache, one token per forward. Returns (ids (1, T + new),
    logits of every position (1, T + new - 1, vocab))."""
    cache = model.new_cache(1, prompt.shape[1] + new_tokens)
    logits = [model(prompt, cache=cache)]
    ids = prompt
    for _ in range(new_tokens):
        nxt = logits[-1][:, -1].argmax(-1, keepdim=True)  # (1, 1)
        ids = torch.cat([ids, nxt], dim=1)
        if ids.shape[1] < prompt.shape[1] + new_tokens:
            logits.append(model(nxt, cache=cache))
    return ids, torch.cat(logits, dim=1)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_route_gives_transformers_logits_and_identical_weights(shape, tmp_path):
    ref = _reference(SHAPES[shape])
    x = torch.randint(0, ref.config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref(x).logits
    first = None
    for route in ROUTES:
        model = _route(route, ref, tmp_path / route)
        assert model.cfg.tie_weights == ref.config.tie_word_embeddings, route
        assert model.num_parameters() == ref.num_parameters(), route
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, rtol=0, atol=ATOL, msg=lambda m: f"{route}: {m}")
        state = model.state_dict()
        first = first or state
        assert list(state) == list(first), route
        for key in first:
            assert torch.equal(state[key], first[key]), f"{route}: {key} differs"


# Generation through every route, each route on one of the shapes (all shapes covered): the
# weights are bit-identical across routes (above), so this covers every route on every shape.
BEHAVIOUR_CASES = [(route, list(SHAPES)[i % len(SHAPES)]) for i, route in enumerate(ROUTES)]


@pytest.mark.parametrize("route, shape", BEHAVIOUR_CASES)
def test_route_generates_like_transformers(route, shape, tmp_path):
    ref = _reference(SHAPES[shape])
    vocab = ref.config.vocab_size
    model = _route(route, ref, tmp_path)
    gen = torch.Generator().manual_seed(1)

    # 64 greedy tokens, identical to transformers' generate: gptforge.generate, and a plain loop
    # through the KV cache one token per forward, whose logits equal transformers' full forward.
    prompt = torch.randint(1, vocab, (1, 9), generator=gen)
    greedy = ref.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                          max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)
    assert gptforge.generate(model, prompt, NEW_TOKENS, stop_token_ids=()).tolist() == greedy.tolist()
    ours, cached_logits = _greedy_with_cache(model, prompt, NEW_TOKENS)
    assert ours.tolist() == greedy.tolist()
    with torch.no_grad():
        full = ref(greedy[:, :-1]).logits
    torch.testing.assert_close(cached_logits, full, rtol=0, atol=ATOL)

    # Left-padded batch: same tokens as transformers' left-padded generate...
    lengths = [12, 5, 9]
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)  # pad id 0, on the left
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, -n:] = torch.randint(1, vocab, (n,), generator=gen)
        mask[row, -n:] = 1
    padded = ref.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20,
                          min_new_tokens=20, pad_token_id=0)
    ours = gptforge.generate(model, ids, 20, attention_mask=mask, stop_token_ids=(), pad_token_id=0)
    assert ours.tolist() == padded.tolist()
    # ...and the same logits at the real positions of the prefill.
    positions = positions_from_mask(mask)
    with torch.no_grad():
        ours_logits = model(ids, positions=positions, attention_mask=mask)
        theirs = ref(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    torch.testing.assert_close(ours_logits[real], theirs[real], rtol=0, atol=ATOL)


def test_gpt2_124m_shaped_round_trip(tmp_path):
    """The real size once: HF safetensors -> ours -> gptforge format -> HF export -> transformers."""
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    ref.save_pretrained(tmp_path / "hf")
    model = gptforge.load(tmp_path / "hf")
    assert model.num_parameters() == 124_439_808  # GPT-2 small with its tied head, as transformers counts
    gptforge.save(model, tmp_path / "ours")
    del model
    model = gptforge.load(tmp_path / "ours")
    ids = torch.tensor([[15496, 11, 314, 716, 257, 1332, 286, 262]])
    with torch.no_grad():
        expected = ref(ids).logits
        torch.testing.assert_close(model(ids), expected, rtol=0, atol=ATOL)
    ours = gptforge.generate(model, ids, 8, stop_token_ids=())
    theirs = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                          min_new_tokens=8, pad_token_id=50256)
    assert ours.tolist() == theirs.tolist()
    gptforge.save(model, tmp_path / "export", format="hf")
    del model
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, expected, rtol=0, atol=ATOL)
