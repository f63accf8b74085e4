"""Generation: the KV-cached engine against the seed's loop and transformers, the decoding options
against Hugging Face's processors, stopping, batching and streaming."""

from __future__ import annotations

import pytest
import torch

import gptforge
from gptforge import GenerationConfig, generate, generate_text, generate_text_simple, next_tokens, stream_text
from gptforge.generation import MinP, RepetitionPenalty, TextStream, TopK, TopP, left_pad
from gptforge.tokenizer import get_tokenizer

from gen_helpers import generation_config, ScriptedModel, hf_twin, tiny_model


@pytest.fixture
def cfg(tiny_config):
    """The tiny model these tests share (see gen_helpers.generation_config)."""
    return generation_config(tiny_config)

HELLO = [15496, 11, 314, 716]


@pytest.fixture(scope="module")
def book_model():
    torch.manual_seed(123)
    return gptforge.GPTModel(gptforge.preset("book-124m")).eval()


def test_seed_sentence_through_the_cached_engine(book_model):
    out = generate(book_model, torch.tensor([HELLO]), 6)
    assert out.tolist() == [[15496, 11, 314, 716, 27018, 24086, 47843, 30961, 42348, 7267]]
    assert generate_text(book_model, "Hello, I am", 6) == "Hello, I am Featureiman Byeswickattribute argue"


def test_cache_matches_seed_loop_for_500_tokens_past_the_context(cfg):
    model = tiny_model(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    expected = generate_text_simple(model, idx, 500, cfg.context_length)
    got = generate(model, idx, 500, stop_token_ids=())
    assert got.shape == (2, 505)
    assert torch.equal(got, expected)


def test_prompt_longer_than_the_context_is_cropped_like_the_seed(cfg):
    model = tiny_model(cfg)
    idx = torch.randint(0, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2))
    assert torch.equal(generate(model, idx, 20, stop_token_ids=()), generate_text_simple(model, idx, 20, 32))


def test_greedy_matches_transformers_generate(cfg):
    model = tiny_model(cfg.replace(qkv_bias=True, tie_weights=True, init="gpt2"))
    hf = hf_twin(model)
    idx = torch.randint(0, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), rtol=1e-4, atol=1e-4)
        expected = hf.generate(idx, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0,
                               attention_mask=torch.ones_like(idx))
    assert torch.equal(generate(model, idx, 20, stop_token_ids=()), expected)


def test_batch_of_different_lengths_equals_each_prompt_alone(cfg):
    model = tiny_model(cfg)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (3, 9, 1, 6)]
    batch = generate(model, prompts, 40, stop_token_ids=(), pad_token_id=0)  # runs past context 32
    width = max(len(p) for p in prompts)
    for row, p in zip(batch, prompts):
        alone = generate(model, torch.tensor([p]), 40, stop_token_ids=())[0]
        assert row[width - len(p):].tolist() == alone.tolist()
        assert row[:width - len(p)].tolist() == [0] * (width - len(p))


def test_left_padded_tensor_with_attention_mask(cfg):
    model = tiny_model(cfg)
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    out = generate(model, ids, 5, attention_mask=mask, stop_token_ids=())
    assert out[1, 2:].tolist() == generate(model, torch.tensor([[8]]), 5, stop_token_ids=())[0].tolist()
    with pytest.raises(ValueError, match="left padding"):
        generate(model, ids, 5, attention_mask=mask.flip(1))


# --------------------------------------------------------------------------- processors vs Hugging Face

def _hf(name, *args):
    import transformers.generation.logits_process as lp
    return getattr(lp, name)(*args)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers(penalty):
    gen = torch.Generator().manual_seed(5)
    logits, ids = torch.randn(3, 50, generator=gen), torch.randint(0, 50, (3, 12), generator=gen)
    expected = _hf("RepetitionPenaltyLogitsProcessor", penalty)(ids, logits.clone())
    torch.testing.assert_close(RepetitionPenalty(penalty)(logits, ids), expected)


def test_penalties_ignore_padding_and_count_occurrences():
    logits = torch.zeros(1, 6)
    ids = torch.tensor([[-1, -1, 2, 2, 2, 4]])
    cfg = GenerationConfig(presence_penalty=0.5, frequency_penalty=0.25)
    out = cfg.processors[0](logits, ids)
    assert out.tolist() == [[0, 0, -1.25, 0, -0.75, 0]]


@pytest.mark.parametrize("p", [0.3, 0.8, 0.95])
def test_top_p_matches_transformers(p):
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(6))
    expected = _hf("TopPLogitsWarper", p)(None, logits.clone())
    assert torch.equal(TopP(p)(logits, None).isfinite(), expected.isfinite())


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_min_p_matches_transformers(p):
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(7))
    expected = _hf("MinPLogitsWarper", p)(None, logits.clone())
    assert torch.equal(MinP(p)(logits, None).isfinite(), expected.isfinite())


def test_top_k_keeps_exactly_k_even_with_ties():
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 2.0, 0.5]])
    kept = TopK(3)(logits, None).isfinite()
    assert kept.sum() == 3
    assert kept.tolist() == [[False, True, True, True, False, False]]  # ties go to the lower ids
    random = torch.randn(5, 1000, generator=torch.Generator().manual_seed(8))
    expected = _hf("TopKLogitsWarper", 17)(None, random.clone())  # no ties in random floats
    assert torch.equal(TopK(17)(random, None).isfinite(), expected.isfinite())
    assert (TopK(17)(random, None).isfinite().sum(-1) == 17).all()


def test_temperature_and_processor_order():
    cfg = GenerationConfig(temperature=0.5, top_k=10, top_p=0.9, min_p=0.1, repetition_penalty=1.1,
                           presence_penalty=0.1)
    names = [type(p).__name__ for p in cfg.processors]
    assert names == ["RepetitionPenalty", "PresenceFrequencyPenalty", "Temperature", "TopK", "TopP", "MinP"]
    assert GenerationConfig(top_k=10).processors == ()  # greedy ignores the sampling warpers
    logits = torch.tensor([[2.0, 1.0]])
    # logits / 0.5, shifted so that the largest is 0 (the same softmax as Hugging Face's warper gives)
    torch.testing.assert_close(cfg.processors[2](logits, None), torch.tensor([[0.0, -2.0]]))
    expected = _hf("TemperatureLogitsWarper", 0.5)(None, logits.clone())
    torch.testing.assert_close(cfg.processors[2](logits, None).softmax(-1), expected.softmax(-1))


def test_next_tokens_greedy_and_sampling():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    assert next_tokens(logits, None, GenerationConfig()).tolist() == [1, 0]
    assert next_tokens(logits, None, GenerationConfig(temperature=1.0, top_k=1)).tolist() == [1, 0]
    cfg = GenerationConfig(temperature=1.0)
    draws = torch.stack([next_tokens(torch.zeros(1, 4), None, cfg, torch.Generator().manual_seed(s))
                         for s in range(400)])
    assert set(draws.flatten().tolist()) == {0, 1, 2, 3}
    # A penalty can change the greedy choice.
    ids = torch.tensor([[1]])
    assert next_tokens(torch.tensor([[0.0, 2.0, 1.5]]), ids, GenerationConfig(repetition_penalty=2.0)).tolist() == [2]


# Values every option accepts, at the ends of its range, where float32 overflows or underflows.
EXTREME_OPTIONS = [
    {"temperature": 1e-38}, {"temperature": 5e-324}, {"temperature": 1e300},
    {"temperature": 1.0, "top_p": 1e-300}, {"temperature": 1e-38, "top_p": 1e-300},
    {"temperature": 1.0, "min_p": 1.0}, {"temperature": 1e-30, "top_k": 1, "min_p": 1.0},
    {"temperature": 1.0, "repetition_penalty": 1e-300}, {"temperature": 1.0, "repetition_penalty": 1e300},
    {"temperature": 1e-38, "presence_penalty": 2.0, "frequency_penalty": -2.0},
]


@pytest.mark.parametrize("options", EXTREME_OPTIONS)
def test_sampling_never_fails_for_an_accepted_value(options):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 300, generator=gen) * 20
    logits[3] = 0.0  # a row of ties
    logits[2, :150] = torch.finfo(torch.float32).min / 2  # far below the rest
    ids = torch.randint(0, 300, (4, 40), generator=gen)
    for seed in range(5):
        tokens = next_tokens(logits, ids, GenerationConfig(**options, seed=seed), torch.Generator().manual_seed(seed))
        assert tokens.shape == (4,) and bool(((tokens >= 0) & (tokens < 300)).all())


def test_extreme_sampling_reaches_its_greedy_limit():
    """A temperature near 0, or a top_p near 0, leaves only the most likely token: the argmax."""
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(1)) * 5
    greedy = logits.argmax(-1)
    for options in ({"temperature": 1e-38}, {"temperature": 5e-324}, {"temperature": 1.0, "top_p": 1e-300},
                    {"temperature": 0.7, "top_p": 1e-45}):
        for seed in range(5):
            assert torch.equal(next_tokens(logits, None, GenerationConfig(**options), torch.Generator().manual_seed(seed)),
                               greedy), options


def test_logits_that_are_not_finite_are_refused_by_name():
    from gptforge.generation import NonFiniteLogits

    logits = torch.zeros(3, 10)
    logits[1, 4] = float("nan")
    for config in (GenerationConfig(), GenerationConfig(temperature=0.8), GenerationConfig(repetition_penalty=1.2)):
        with pytest.raises(NonFiniteLogits, match="not finite .* in row 1:"):
            next_tokens(logits, torch.zeros(3, 2, dtype=torch.long), config)
    for bad in (float("inf"), None):  # +inf; a row with every token ruled out
        logits = torch.zeros(3, 10)
        if bad is None:
            logits[2] = float("-inf")
        else:
            logits[2, 0] = bad
        with pytest.raises(NonFiniteLogits, match="in row 2:"):
            next_tokens(logits, None, GenerationConfig())
    # -inf rules a token out (a grammar's mask, a ban): the others are picked from as usual
    masked = torch.arange(10.0).repeat(2, 1)
    masked[:, 9] = float("-inf")
    assert next_tokens(masked, None, GenerationConfig()).tolist() == [8, 8]
    assert set(next_tokens(masked, None, GenerationConfig(temperature=1.0), torch.Generator().manual_seed(0)).tolist()) <= set(range(9))


def test_seed_repeats_and_leaves_global_rng_alone(cfg):
    model = tiny_model(cfg)
    idx = torch.tensor([[1, 2, 3]])
    torch.manual_seed(42)
    before = torch.get_rng_state()
    a = generate(model, idx, 30, temperature=1.0, seed=7, stop_token_ids=())
    assert torch.equal(torch.get_rng_state(), before)
    b = generate(model, idx, 30, temperature=1.0, seed=7, stop_token_ids=())
    c = generate(model, idx, 30, temperature=1.0, seed=8, stop_token_ids=())
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_num_return_sequences(cfg):
    model = tiny_model(cfg)
    out = generate(model, [[1, 2], [3]], 10, temperature=1.0, num_return_sequences=3, seed=0,
                   stop_token_ids=(), pad_token_id=0)
    assert out.shape == (6, 12)
    assert out[:3, :2].tolist() == [[1, 2]] * 3 and out[3:, :2].tolist() == [[0, 3]] * 3
    assert len({tuple(r) for r in out[:3].tolist()}) > 1


@pytest.mark.parametrize("options, name", [
    ({"temperature": -1}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 0}, "top_p"),
    ({"min_p": 1.5}, "min_p"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"frequency_penalty": "x"}, "frequency_penalty"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"stop_strings": [""]}, "stop_strings"),
    ({"num_return_sequences": 2}, "num_return_sequences"), ({"seed": -3}, "seed"),
    ({"max_new_tokens": -1}, "max_new_tokens"), ({"top_kk": 3}, "top_kk"),
])
def test_bad_options_name_themselves(options, name):
    with pytest.raises(ValueError, match=name):
        GenerationConfig.from_options(**options)


# --------------------------------------------------------------------------- stopping and streaming

def test_endoftext_stops_by_default_and_pads():
    tok = get_tokenizer()
    script = tok.encode(" one two") + [50256] + tok.encode(" three")
    model = ScriptedModel(script)
    out = generate(model, torch.tensor([[15496]]), 10)
    assert out[0].tolist() == [15496] + script[:3]  # stops after <|endoftext|>, which is kept in the ids
    assert generate_text(model, "Hello", 10) == "Hello one two"
    assert generate(model, torch.tensor([[15496]]), 10, stop_token_ids=()).shape == (1, 11)


def test_stop_string_across_tokens_is_cut():
    tok = get_tokenizer()
    script = tok.encode(" alpha beta\n\nUser: gamma delta")
    model = ScriptedModel(script)
    assert generate_text(model, "Q", 20, stop_token_ids=(), stop_strings=["\nUser:"]) == "Q alpha beta\n"
    chunks = list(stream_text(model, "Q", 20, stop_token_ids=(), stop_strings=["beta\n\nUs"]))
    assert "".join(chunks) == " alpha "
    ids = generate(model, torch.tensor([[48]]), 20, stop_token_ids=(), stop_strings=["\nUser:"])
    assert ids.shape[1] < 21  # generation ended at the stop string


def test_stream_never_breaks_a_character():
    tok = get_tokenizer()
    text = " naïve café 🤖🦜 日本語"
    script = tok.encode(text)
    assert any("\ufffd" in tok.decode([t]) for t in script)  # some tokens hold half a character
    chunks = list(stream_text(ScriptedModel(script), "x", len(script), stop_token_ids=()))
    assert "".join(chunks) == text
    assert all("\ufffd" not in c for c in chunks)
    assert len(chunks) > 3


def test_text_stream_holds_possible_stop_prefix():
    tok = get_tokenizer()
    stream = TextStream(tok, stop_strings=["END"])
    assert stream.push(tok.encode(" E")[0]) == " "
    assert stream.push(tok.encode("N")[0]) == ""
    assert stream.push(tok.encode("x")[0]) == "ENx"
    assert stream.finish() == "" and not stream.stopped


def test_generation_restores_training_mode(cfg):
    model = tiny_model(cfg)
    model.train()
    generate(model, torch.tensor([[1]]), 3)
    assert model.training and torch.is_grad_enabled()


def test_only_the_last_position_reaches_the_head(cfg):
    model = tiny_model(cfg)
    seen = []
    hook = model.out_head.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    try:
        generate(model, torch.tensor([[1, 2, 3, 4, 5]]), 4, stop_token_ids=())
    finally:
        hook.remove()
    assert seen == [(1, 1, cfg.emb_dim)] * 4  # the prefill's 5 positions included: only the last


# --------------------------------------------------------------------------- a caller's mistakes

@pytest.mark.parametrize("prompts, what", [
    ([1, 2, 3], "each prompt must be a list of integer token ids"),  # was three one-token prompts
    ([[1.5, 2]], "each prompt must be a list of integer token ids"),  # was truncated to [1, 2]
    ([[[1, 2], [3, 4]]], "each prompt must be a list"),  # was flattened into one prompt
    ([["a"]], "each prompt must be a list"), ("hello", "for text use generate_text"),
])
def test_bad_prompt_ids_are_refused_by_name(cfg, prompts, what):
    with pytest.raises(gptforge.GptforgeError, match=what):
        generate(tiny_model(cfg), prompts, 2)


def test_left_pad_refuses_bad_pad_ids_and_rows():
    for bad in (-1, 1.5):
        with pytest.raises(gptforge.GptforgeError, match="pad_token_id"):
            left_pad([[1], [1, 2]], pad_token_id=bad)
    for bad in ("abc", 5, [torch.tensor([[1, 2]])]):
        with pytest.raises(gptforge.GptforgeError, match="prompt"):
            left_pad(bad)


def test_a_pad_id_outside_the_vocabulary_is_named_before_the_model_reads_it(cfg):
    """The pad fills padding and finished rows, which go through the embedding: on a 256-token
    model the default 50256 was an IndexError from inside the model."""
    model = tiny_model(cfg)
    first = int(generate(model, [[1, 2]], 1)[0, -1])
    with pytest.raises(gptforge.GptforgeError, match="pad_token_id 50256 is outside the model's vocabulary of 256"):
        generate(model, [[1, 2], [3, 4]], 4, stop_token_ids=[first])  # row 0 finishes first
    with pytest.raises(gptforge.GptforgeError, match="pad_token_id"):
        generate(model, [[1, 2], [3]], 2)
    assert generate(model, [[1, 2], [3, 4]], 2).shape == (2, 4)  # nothing to pad, no stop it can make: fine


def test_attention_mask_must_be_zeros_and_ones(cfg):
    model, idx = tiny_model(cfg), torch.tensor([[1, 2, 3]])
    for mask in (torch.tensor([[2, 1, 1]]), torch.tensor([[0.5, 1.0, 1.0]])):
        with pytest.raises(gptforge.GptforgeError, match="attention_mask must hold 1"):
            generate(model, idx, 2, attention_mask=mask)


def test_wrong_config_tokenizer_and_prompt_types_are_named(cfg):
    model = tiny_model(cfg)
    with pytest.raises(gptforge.GptforgeError, match="config must be a GenerationConfig"):
        generate(model, [[1]], 2, config={"temperature": 1.0})
    with pytest.raises(gptforge.GptforgeError, match="generation options"):
        GenerationConfig().replace(temprature=1.0)
    with pytest.raises(gptforge.GptforgeError, match="tokenizer must be"):
        generate_text(model, "hi", 2, "gpt2")  # the tokenizer's place
    with pytest.raises(gptforge.GptforgeError, match="prompt must be a string"):
        generate_text(model, 5, 2)
    for prompt in (5, ["a"], torch.tensor([[1, 2]])):
        with pytest.raises(gptforge.GptforgeError, match="each prompt must be"):
            stream_text(model, prompt, 2)


def test_stream_text_refuses_bad_arguments_when_called_not_when_iterated(cfg):
    with pytest.raises(gptforge.GptforgeError, match="temprature"):
        stream_text(tiny_model(cfg), [1, 2], 2, temprature=1.0)  # no next() needed


def test_next_tokens_names_bad_arguments():
    penalty = GenerationConfig(repetition_penalty=1.2)
    logits = torch.randn(2, 5)
    with pytest.raises(gptforge.GptforgeError, match="one row per row of logits"):
        next_tokens(logits, torch.tensor([[1]]), penalty)  # was broadcast over both rows
    with pytest.raises(gptforge.GptforgeError, match="ids must be"):
        next_tokens(logits, torch.tensor([[1.0], [2.0]]), penalty)
    with pytest.raises(gptforge.GptforgeError, match="config must be"):
        next_tokens(logits, None, None)
    with pytest.raises(gptforge.GptforgeError, match="logits must be a tensor"):
        next_tokens([[1.0, 2.0]], None, GenerationConfig())


def test_text_stream_checks_its_stop_strings_and_tokenizer():
    assert TextStream(stop_strings="ab").stop_strings == ("ab",)  # was ("a", "b")
    with pytest.raises(gptforge.GptforgeError, match="stop_strings"):
        TextStream(stop_strings=[""])  # would stop at once, showing nothing
    with pytest.raises(gptforge.GptforgeError, match="tokenizer must be"):
        TextStream("gpt2")
