"""The batching scheduler, in process: every sequence decoded in a shared batch must equal what the
library's own `generate` gives it alone, and the batch must take one forward step per token."""

from __future__ import annotations

import time

import pytest
import torch

from gptforge import GPTModel, generate, prepare_for_inference
from gptforge.fast import kernels
from gptforge.model import KV_Q8_0
from gptforge.generation import GenerationConfig, prompt_ids
from gptforge.scheduler import FINISH_ABORT, FINISH_ERROR, FINISH_LENGTH, BatchScheduler, SequenceState

# A 512-token vocabulary (GPT-2's first 512 ids: bytes and early merges) keeps sampling over the
# vocabulary cheap; the HTTP tests use the full one.
VOCAB = 512
PROMPTS = ["Hello, I am", "The quick brown fox jumps over the lazy dog", "A", "Once upon a time there was",
           "x y z", "In 1999, the", "Every effort moves you", "import torch"]


def ids_of(text: str) -> list[int]:
    return [i % VOCAB for i in prompt_ids(text)]


@pytest.fixture(scope="module")
def model(tiny_config) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(tiny_config(vocab_size=VOCAB, context_length=32, emb_dim=64)).eval()


def alone(model, ids, max_tokens, **options):
    """The reference: the library's KV-cached generate on this prompt alone."""
    out = generate(model, torch.tensor([ids]), max_tokens, stop_token_ids=(), **options)
    return out[0, len(ids):].tolist()


def make_seq(ids, max_tokens, outputs, **options):
    config = GenerationConfig(stop_token_ids=(), **options)
    return SequenceState(ids, max_tokens, config, on_output=outputs.append)


def run_to_end(scheduler, limit=1000):
    steps = 0
    while scheduler.stats()["active"] or scheduler.stats()["waiting"]:
        scheduler.step()
        steps += 1
        assert steps < limit
    return steps


def test_concurrent_greedy_sequences_equal_alone_in_one_step_per_token(model):
    scheduler = BatchScheduler(model, max_batch_size=8)
    seqs, outputs = [], []
    for i, prompt in enumerate(PROMPTS):
        out: list = []
        seqs.append(make_seq(ids_of(prompt), 6 + i, out))
        outputs.append(out)
        scheduler.submit(seqs[-1])
    run_to_end(scheduler)
    # Batched: the longest sequence's tokens, minus the one its prefill picks; alone would be sum(...).
    assert scheduler.counters["decode_steps"] == max(s.max_tokens for s in seqs) - 1
    for seq, out in zip(seqs, outputs):
        assert seq.generated == alone(model, seq.prompt_ids, seq.max_tokens)
        assert out[-1].finish_reason == FINISH_LENGTH and out[-1].num_tokens == seq.max_tokens
        assert sum(len(o.text) for o in out) > 0


@pytest.fixture(scope="module")
def int4_model(tiny_config) -> GPTModel:
    """On gptforge's kernels, its KV cache as Q8_0 rows (heads of 32 values)."""
    if not kernels.available():
        pytest.skip(f"gptforge kernels: {kernels.describe()}")
    torch.manual_seed(0)
    model = prepare_for_inference(GPTModel(tiny_config(vocab_size=VOCAB, context_length=32, emb_dim=128)),
                                  "float32", "int4")
    assert model.new_cache(1, 4).keys.dtype == KV_Q8_0
    return model


@pytest.mark.parametrize("which", ["model", "int4_model"])
def test_joining_leaving_shifting_and_compacting_keep_results_exact(which, request):
    # A 32-position context and newcomers of every length force each layout move: a prompt longer
    # than the column joins (existing rows shift right), the column reaches the end (rows shift
    # left), rows leave mid-batch (the last row moves into the gap). Also for a cache of Q8_0 rows.
    model = request.getfixturevalue(which)
    scheduler = BatchScheduler(model, max_batch_size=3)
    shifts = []
    shift = scheduler._shift
    scheduler._shift = lambda delta: (shifts.append((delta, scheduler.stats()["active"])), shift(delta))
    plan = [(2, 20), (14, 6), (5, 12), (22, 4), (1, 9), (9, 14), (3, 3)]  # (prompt tokens, max_tokens)
    words = ids_of(" ".join(PROMPTS))
    seqs = []
    for i, (length, max_tokens) in enumerate(plan):
        seqs.append(make_seq(words[i:i + length], max_tokens, []))
        scheduler.submit(seqs[-1])
        scheduler.step()  # one joins per step, while others run
        scheduler.step()
    run_to_end(scheduler)
    assert any(d > 0 and active > 0 for d, active in shifts), shifts
    assert any(d < 0 and active > 0 for d, active in shifts), shifts
    for seq in seqs:
        assert seq.generated == alone(model, seq.prompt_ids, seq.max_tokens), seq.prompt_ids


def test_each_sequence_samples_with_its_own_settings_and_seed(model):
    scheduler = BatchScheduler(model, max_batch_size=4)
    settings = [dict(temperature=0.8, top_p=0.9, seed=1), dict(temperature=1.5, seed=2),
                dict(), dict(temperature=1.0, top_k=5, seed=3)]
    seqs = [make_seq(ids_of(PROMPTS[i]), 10, [], **s) for i, s in enumerate(settings)]
    for seq in seqs:
        scheduler.submit(seq)
    run_to_end(scheduler)
    for seq, s in zip(seqs, settings):
        assert seq.generated == alone(model, seq.prompt_ids, 10, **s)


def test_stop_strings_and_logprobs(model):
    ids = ids_of(PROMPTS[0])
    greedy = alone(model, ids, 12)
    scheduler = BatchScheduler(model)
    full_text = scheduler.tokenizer.decode(greedy)
    stop = full_text[len(full_text) // 2:len(full_text) // 2 + 3]
    out: list = []
    seq = SequenceState(ids, 12, GenerationConfig(stop_strings=(stop,), stop_token_ids=()), out.append, logprobs=2)
    scheduler.submit(seq)
    run_to_end(scheduler)
    text = "".join(o.text for o in out)
    assert text == full_text[:full_text.index(stop)] and out[-1].finish_reason == "stop"
    logits = model(torch.tensor([ids + greedy]))[0]  # (T, V)
    expected = torch.log_softmax(logits, -1)[len(ids) - 1:-1].gather(1, torch.tensor(greedy)[:, None])[:, 0]
    got = [lp.logprob for o in out for lp in o.logprobs]
    torch.testing.assert_close(torch.tensor(got), expected[:len(got)], atol=1e-4, rtol=1e-4)
    assert all(len(lp.top) == 2 and max(lp.top.values()) == pytest.approx(lp.logprob, abs=1e-5)
               for o in out for lp in o.logprobs)  # greedy: the chosen token is the most likely


def test_cancel_frees_the_row_and_drain_aborts(model):
    scheduler = BatchScheduler(model, max_batch_size=2)
    outs = [[], [], []]
    seqs = [make_seq(ids_of(PROMPTS[i]), 20, outs[i]) for i in range(3)]
    for seq in seqs:
        scheduler.submit(seq)
    scheduler.step()
    assert scheduler.stats()["active"] == 2 and scheduler.stats()["waiting"] == 1
    scheduler.cancel(seqs[0])
    scheduler.step()
    assert scheduler.counters["cancelled"] == 1 and seqs[2] in scheduler._rows
    scheduler.drain(0.0)
    scheduler.step()
    assert scheduler.stats()["active"] == 0
    assert outs[1][-1].finish_reason == FINISH_ABORT and outs[2][-1].finish_reason == FINISH_ABORT
    with pytest.raises(RuntimeError, match="shutting down"):
        scheduler.submit(make_seq([1], 1, []))


def test_a_failing_step_fails_its_sequences_and_the_thread_carries_on(model, monkeypatch):
    scheduler = BatchScheduler(model)
    decoded = scheduler.model  # the fast view the scheduler decodes with
    forward = decoded.forward
    calls = {"n": 0}

    def broken_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return forward(*args, **kwargs)

    import threading

    done = threading.Event()
    out1: list = []
    monkeypatch.setattr(decoded, "forward", broken_once)
    scheduler.start()
    try:
        scheduler.submit(make_seq([1, 2, 3], 5, out1))
        for _ in range(6000):  # up to 60 s on a loaded machine; it stops at the answer
            if out1 and out1[-1].finish_reason:
                break
            done.wait(0.01)
        assert out1[-1].finish_reason == FINISH_ERROR and "boom" in out1[-1].error
        out2: list = []
        scheduler.submit(make_seq([1, 2, 3], 5, out2))
        for _ in range(6000):
            if out2 and out2[-1].finish_reason:
                break
            done.wait(0.01)
        assert out2[-1].finish_reason == FINISH_LENGTH and out2[-1].num_tokens == 5
    finally:
        scheduler.stop()


def breaking(model, **options):
    """`model` made to overflow (NaN logits, NaN keys and values) at one token: the third token of
    PROMPTS[1] with these options, so a sequence on that prompt breaks in its third decode step, and
    one whose prompt holds that token breaks in its prefill. Other sequences decode as on `model`."""
    from gen_helpers import overflowing_model

    token = alone(model, ids_of(PROMPTS[1]), 3, **options)[2]
    return overflowing_model(model, token), token


@pytest.mark.parametrize("layout", ["fast", "torch"])
@pytest.mark.parametrize("options", [{}, {"temperature": 0.9, "top_p": 0.95, "seed": 4}], ids=["greedy", "sampled"])
def test_a_sequence_that_breaks_fails_alone_and_leaves_its_row_clean(model, options, layout):
    bad_model, token = breaking(model, **options)
    scheduler = BatchScheduler(bad_model, max_batch_size=3)
    if layout == "torch":  # the model's own forward (as on a GPU): attention through F.scaled_dot_product_attention
        scheduler.model = bad_model
    outs = {name: [] for name in ("long", "breaks", "bad_prompt", "after")}
    long = make_seq(ids_of(PROMPTS[0]), 24, outs["long"], **options)
    breaks = make_seq(ids_of(PROMPTS[1]), 10, outs["breaks"], **options)
    bad_prompt = make_seq(ids_of(PROMPTS[2]) + [token], 10, outs["bad_prompt"], **options)
    for seq in (long, breaks, bad_prompt):
        scheduler.submit(seq)
    for _ in range(6):
        scheduler.step()
    assert scheduler.stats()["active"] == 1 and long in scheduler._rows  # the two broken ones are gone
    for name in ("breaks", "bad_prompt"):
        assert outs[name][-1].finish_reason == FINISH_ERROR and "not finite" in outs[name][-1].error
    assert breaks.generated == alone(model, breaks.prompt_ids, 3, **options)  # its tokens until it broke
    # a newcomer takes the freed row, whose older slots (the broken one's) it reads under zero attention weight
    after = make_seq(ids_of(PROMPTS[3])[:1], 6, outs["after"], **options)
    scheduler.submit(after)
    run_to_end(scheduler)
    for seq, name in ((long, "long"), (after, "after")):
        assert outs[name][-1].finish_reason == FINISH_LENGTH and outs[name][-1].error is None
        assert seq.generated == alone(model, seq.prompt_ids, seq.max_tokens, **options)
    assert scheduler.counters["failed"] == 2
    assert all(sum(o.finish_reason is not None for o in out) == 1 for out in outs.values())  # one end each


def test_a_failing_prefill_fails_its_newcomers_only(model, monkeypatch):
    scheduler = BatchScheduler(model, max_batch_size=4)
    outs = [[], [], []]
    running = make_seq(ids_of(PROMPTS[0]), 12, outs[0])
    expected = alone(model, running.prompt_ids, 12)
    scheduler.submit(running)
    scheduler.step()
    forward = scheduler.model.forward

    def prefill_fails(ids, **kwargs):
        if ids.shape[1] > 1:
            raise RuntimeError("out of memory")
        return forward(ids, **kwargs)

    monkeypatch.setattr(scheduler.model, "forward", prefill_fails)
    for i in (1, 2):
        scheduler.submit(make_seq(ids_of(PROMPTS[i]), 5, outs[i]))
    run_to_end(scheduler)
    assert [out[-1].finish_reason for out in outs] == [FINISH_LENGTH, FINISH_ERROR, FINISH_ERROR]
    assert "RuntimeError: out of memory" in outs[1][-1].error
    assert running.generated == expected


def test_a_step_that_fails_answers_the_sequences_being_admitted(model, monkeypatch):
    """A failure outside any one sequence (here: in the shared prefill bookkeeping) ends what is in
    flight, the sequences taken off the queue for admission included: none is left unanswered."""
    scheduler = BatchScheduler(model, max_batch_size=4)
    outs = [[], []]
    monkeypatch.setattr(scheduler, "_prefill", lambda seqs, every_position=False: 1 / 0)
    monkeypatch.setattr(scheduler, "_fail", lambda seq, message: 1 / 0)  # its own recovery breaks too
    for out in outs:
        scheduler.submit(make_seq([1, 2], 3, out))
    scheduler.start()
    try:
        for _ in range(300):
            if all(out and out[-1].finish_reason for out in outs):
                break
            time.sleep(0.01)
    finally:
        scheduler.stop()
    assert [out[-1].finish_reason for out in outs] == [FINISH_ERROR, FINISH_ERROR]


def test_submit_rejects_what_cannot_fit(model):
    scheduler = BatchScheduler(model)
    with pytest.raises(ValueError, match="context length 32"):
        scheduler.submit(make_seq(list(range(30)), 3, []))
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchScheduler(model, max_batch_size=0)


def test_a_padded_vocabulary_never_yields_ids_without_text(tiny_config):
    # nanoGPT-style vocabularies are padded to 50304; ids >= 50257 have no text, so they are never
    # picked, even when the model prefers them.
    torch.manual_seed(0)
    model = GPTModel(tiny_config(vocab_size=50304, context_length=32, emb_dim=64)).eval()
    with torch.no_grad():
        model.out_head.weight[50257:] = model.out_head.weight[:47] * 100  # make the padding ids win
    assert int(model(torch.tensor([[1, 2, 3]]))[0, -1].argmax()) >= 50257
    scheduler = BatchScheduler(model)
    out: list = []
    seq = SequenceState([1, 2, 3], 5, GenerationConfig(stop_token_ids=()), out.append, logprobs=3)
    scheduler.submit(seq)
    run_to_end(scheduler)
    assert out[-1].finish_reason == FINISH_LENGTH and all(t < 50257 for t in seq.generated)


def test_a_batch_size_whose_cache_cannot_fit_is_refused_up_front(model, capsys, tmp_path):
    """`serve --max-batch-size 100000000`: its KV cache (allocated at the first request) could
    never fit; refused when the scheduler is made, not a traceback (or a failed first request)."""
    from gptforge.checkpoint import save
    from gptforge.cli import main
    from gptforge.errors import GptforgeError

    with pytest.raises(GptforgeError, match=r"KV cache of \d+ rows x \d+ positions needs .* GiB, more than .*"
                                            "lower max_batch_size"):
        BatchScheduler(model, max_batch_size=10**12)
    BatchScheduler(model, max_batch_size=64)  # a sensible one is still made
    save(model, tmp_path / "tiny")
    assert main(["serve", "--model", str(tmp_path / "tiny"), "--max-batch-size", str(10**23), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "lower max_batch_size" in err and err.count("\n") == 1, err
