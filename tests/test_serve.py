"""The HTTP server, end to end: `gptforge serve` in a real process on loopback, serving a tiny random
model from a checkpoint, driven by the official `openai` client (and httpx for what the client
cannot send). Results are checked against the library's own `generate` on the same weights."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import hypothesis
import openai
import pytest
import torch
from hypothesis import strategies as st

from gptforge import GPTModel, generate
from gptforge.checkpoint import save
from gptforge.cli import DEFAULT_MODEL, build_parser, main
from gptforge.generation import prompt_ids
from gptforge.serve import is_loopback
from gptforge.tokenizer import get_tokenizer

SRC = str(Path(__file__).resolve().parents[1] / "src")
CAP = 100  # the server's max_tokens cap
BODY_LIMIT = 4096
PROMPTS = ["Hello, I am", "The quick brown fox", "A", "Once upon a time", "x y z", "In 1999, the",
           "Every effort moves you", "import torch"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model(tiny_config) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(tiny_config(vocab_size=50257, context_length=128, emb_dim=64)).eval()


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory) -> Path:
    """The tiny model saved as a gptforge checkpoint: what the server subprocess loads."""
    return save(model, tmp_path_factory.mktemp("serve") / "tiny")


def start_server(checkpoint: Path, port: int, grace: float = 10.0) -> subprocess.Popen:
    """`gptforge serve` in a subprocess, on loopback, serving the tiny checkpoint as "tiny"."""
    cmd = [sys.executable, "-m", "gptforge", "serve", "--model", str(checkpoint), "--served-model-name", "tiny",
           "--port", str(port), "--max-tokens-cap", str(CAP), "--max-body-bytes", str(BODY_LIMIT),
           "--max-batch-size", "8", "--shutdown-grace", str(grace)]
    return launch(cmd, checkpoint.parent / f"server-{port}.log")


def launch(cmd: list[str], log: Path, timeout: float = 60.0) -> subprocess.Popen:
    """Start a server command with its output in `log` (a file, so a chatty server never blocks on a
    full pipe) and wait until /health answers."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"},
                                stdout=out, stderr=subprocess.STDOUT)
    proc.log = log
    wait_healthy(proc, int(cmd[cmd.index("--port") + 1]), timeout)
    return proc


def wait_healthy(proc: subprocess.Popen, port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not become healthy")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(checkpoint):
    port = free_port()
    proc = start_server(checkpoint, port)
    yield f"http://127.0.0.1:{port}"
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def alone(model, prompt, max_tokens, **options) -> str:
    """The library's completion of one prompt (the reference for what the server returns)."""
    ids = prompt_ids(prompt)
    out = generate(model, torch.tensor([ids]), max_tokens, **options)[0, len(ids):].tolist()
    return get_tokenizer().decode([t for t in out if t != 50256])


def health(server) -> dict:
    return httpx.get(f"{server}/health").json()


# --------------------------------------------------------------------------- the happy paths

@pytest.mark.slow
def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    state = health(server)
    assert state["status"] == "ok" and state["model"] == "tiny"


@pytest.mark.slow
def test_plain_completion_equals_the_library_with_usage(client, model):
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.model == "tiny" and len(r.choices) == 1
    assert r.choices[0].text == alone(model, PROMPTS[0], 12)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (4, 12, 16)


@pytest.mark.slow
def test_streamed_completion_equals_the_plain_one(client, model):
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=15, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == alone(model, PROMPTS[1], 15)
    assert len([c for c in chunks if c.choices]) > 1  # it streamed, not one final chunk
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 15 and chunks[-1].usage.prompt_tokens == 4


@pytest.mark.slow
def test_seeded_sampling_repeats_and_matches_the_library(client, model):
    options = dict(temperature=0.9, top_p=0.8, seed=42)
    first = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=10, **options)
    again = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=10, **options)
    assert first.choices[0].text == again.choices[0].text == alone(model, PROMPTS[2], 10, **options)
    # n choices sample independently: choice i as a lone request with seed + i.
    two = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=10, n=2, **options)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[1].text == alone(model, PROMPTS[2], 10, **{**options, "seed": 43})
    assert two.choices[0].text != two.choices[1].text


@pytest.mark.slow
def test_prompt_lists_token_prompts_stop_echo_and_logprobs(client, model):
    r = client.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=5, n=2, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [alone(model, p, 5) for p in PROMPTS[:2] for _ in range(2)]
    assert r.usage.prompt_tokens == 4 + len(prompt_ids(PROMPTS[1])) and r.usage.completion_tokens == 20

    ids = prompt_ids(PROMPTS[3])
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == alone(model, PROMPTS[3], 5)

    full = alone(model, PROMPTS[4], 20)
    stop = full[8:11]
    cut = client.completions.create(model="tiny", prompt=PROMPTS[4], max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"

    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=3, temperature=0, echo=True, logprobs=2)
    choice = r.choices[0]
    assert choice.text == PROMPTS[0] + alone(model, PROMPTS[0], 3)
    lp = choice.logprobs
    generated = prompt_ids(choice.text)
    assert len(lp.tokens) == len(generated) == 7 and lp.token_logprobs[0] is None
    assert "".join(lp.tokens) == choice.text and lp.text_offset[4] == len(PROMPTS[0])
    expected = torch.log_softmax(model(torch.tensor([generated]))[0], -1)  # (T, V)
    expected = expected[:-1].gather(1, torch.tensor(generated[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:]), expected, atol=1e-4, rtol=1e-4)
    # the top 2, and the token itself where it is not among them (OpenAI's up to logprobs + 1)
    for token, top in zip(lp.tokens[1:], lp.top_logprobs[1:]):
        assert token in top and len(top) in (2, 3)
        assert len(top) == 2 or top[token] == min(top.values())


@pytest.mark.slow
def test_concurrent_requests_each_equal_their_lone_result(client, server, model):
    barrier = threading.Barrier(len(PROMPTS))
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        barrier.wait()
        r = client.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=16 + i, temperature=0)
        results[i] = r.choices[0].text

    before = health(server)["decode_steps"]
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    steps = health(server)["decode_steps"] - before
    assert results == {i: alone(model, p, 16 + i) for i, p in enumerate(PROMPTS)}
    # Decoded together: far fewer forward steps than the 156 tokens one at a time would take.
    assert steps < sum(16 + i for i in range(len(PROMPTS))) / 2, steps


# --------------------------------------------------------------------------- bad requests

@pytest.mark.parametrize("options, param", [
    ({"temperature": 3}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": CAP + 1}, "max_tokens"),
    ({"logprobs": 21}, "logprobs"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"seed": -1}, "seed"),
    ({"n": 70}, "n"),
])
@pytest.mark.slow
def test_bad_parameters_are_400_in_openai_format(client, options, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="Hi", **{"max_tokens": 4, **options})
    assert err.value.status_code == 400
    assert err.value.body["type"] == "invalid_request_error" and err.value.body["param"] == param


@pytest.mark.slow
def test_prompt_beyond_the_context_is_400_and_unknown_model_404(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="word " * 120, max_tokens=20)
    assert err.value.body["code"] == "context_length_exceeded" and "128" in err.value.body["message"]
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4", prompt="Hi", max_tokens=4)
    assert err.value.body["code"] == "model_not_found"


@pytest.mark.slow
def test_raw_bad_bodies(server):
    post = lambda **kw: httpx.post(f"{server}/v1/completions", timeout=30, **kw)  # noqa: E731
    r = post(content=json.dumps({"model": "tiny", "prompt": "x" * (BODY_LIMIT + 10)}))
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # A chunked body (no Content-Length) is cut off at the limit too.
    r = post(content=iter([b'{"model": "tiny", "prompt": "', b"x" * BODY_LIMIT, b'"}']))
    assert r.status_code == 413
    for body in [b"{not json", b"[1, 2]", b'{"model": "tiny"}', b'{"model": "tiny", "prompt": "a", "bogus": 1}',
                 b'{"model": "tiny", "prompt": [1, "a"]}', b'{"model": "tiny", "prompt": [99999999]}',
                 b'{"model": "tiny", "prompt": "a", "max_tokens": true}', b'{"model": "tiny", "prompt": []}',
                 b'{"model": "tiny", "prompt": "a", "temperature": NaN}']:
        r = post(content=body)
        assert r.status_code == 400, body
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(f"{server}/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


@pytest.mark.slow
def test_random_bodies_never_crash_the_server(server):
    scalars = st.none() | st.booleans() | st.integers(-5, 200) | st.floats(-3, 3) | st.text(max_size=20)
    values = scalars | st.lists(scalars, max_size=4) | st.lists(st.integers(-1, 60000), max_size=4)
    fields = st.sampled_from(["prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream",
                              "logprobs", "echo", "best_of", "presence_penalty", "suffix", "extra",
                              "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "logit_bias",
                              "response_format", "guided_json", "structured_outputs"])
    # the structured fields take objects: some valid, some not
    objects = st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "json_schema"}, {"type": "yaml"},
                               {"json": {"type": "integer"}}, {"choice": ["a", "b"]}, {"regex": "[0-9]+"},
                               {"regex": "(("}, {"type": "boolean"}, {"type": 7}, {"0": 5, "50256": -100}, {}])
    bodies = st.fixed_dictionaries({"model": st.just("tiny")}, optional={"prompt": values}).flatmap(
        lambda base: st.dictionaries(fields, values | objects, max_size=5).map(lambda more: {**base, **more}))

    @hypothesis.settings(max_examples=60, deadline=None, database=None)
    @hypothesis.given(bodies)
    def check(body):
        r = httpx.post(f"{server}/v1/completions", json=body, timeout=60)
        assert r.status_code in (200, 400), (body, r.status_code, r.text)
        if r.status_code == 400:
            assert r.json()["error"]["type"] == "invalid_request_error"

    check()
    assert health(server)["status"] == "ok"


# --------------------------------------------------------------------------- one request's failure is its own

BREAK_TOKEN = get_tokenizer().encode(" zebra")[-1]
STREAMED = 64  # tokens per stream


@pytest.fixture(scope="module")
def breaking_server(model, tmp_path_factory):
    """The tiny model made to overflow at one token (NaN logits from there on: see
    gen_helpers.overflowing_model), its weights all finite, served like the others."""
    from gen_helpers import overflowing_model

    breaking = overflowing_model(model, BREAK_TOKEN)
    path = save(breaking, tmp_path_factory.mktemp("serve-break") / "tiny")
    port = free_port()
    proc = start_server(path, port)
    yield f"http://127.0.0.1:{port}", breaking
    stop_server(proc)
    assert "Traceback" not in proc.log.read_text()


@pytest.mark.slow
def test_a_failing_or_extreme_request_never_breaks_the_streams_beside_it(breaking_server):
    """Streams in flight, and beside them: a request whose prompt makes the model overflow (a 500 for
    it alone), and requests with a temperature or top_p that float32 cannot compute directly (their
    greedy limit). Every stream ends as it would alone on those weights; the server then serves on."""
    url, model = breaking_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    streams = PROMPTS[:4]
    extremes = {"temperature": {"temperature": 1e-38}, "top_p": {"temperature": 1.0, "top_p": 1e-300}}
    bad_prompt = prompt_ids(PROMPTS[4]) + [BREAK_TOKEN]
    barrier = threading.Barrier(len(streams) + len(extremes) + 1)
    results: dict = {}

    def stream(i: int) -> None:
        barrier.wait()
        chunks = list(client.completions.create(model="tiny", prompt=streams[i], max_tokens=STREAMED, temperature=0,
                                                stream=True))
        results[i] = ("".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason)

    def extreme(name: str) -> None:
        barrier.wait()
        r = client.completions.create(model="tiny", prompt=PROMPTS[5], max_tokens=16, **extremes[name])
        results[name] = (r.choices[0].text, r.choices[0].finish_reason)

    def broken() -> None:
        barrier.wait()
        with pytest.raises(openai.InternalServerError) as err:
            client.completions.create(model="tiny", prompt=bad_prompt, max_tokens=20, temperature=0)
        results["broken"] = err.value.body

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(streams))]
    threads += [threading.Thread(target=extreme, args=(name,)) for name in extremes] + [threading.Thread(target=broken)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, prompt in enumerate(streams):
        assert results[i][0] == alone(model, prompt, STREAMED) and results[i][1] in ("length", "stop"), i
    for name in extremes:
        assert results[name][0] == alone(model, PROMPTS[5], 16) and results[name][1] in ("length", "stop"), name
    assert results["broken"]["type"] == "server_error" and "not finite" in results["broken"]["message"]
    state = health(url)
    assert state["failed"] == 1 and state["active"] == 0 and state["waiting"] == 0
    # its row, freed, serves the next request as if nothing had happened there
    after = client.completions.create(model="tiny", prompt=PROMPTS[6], max_tokens=16, temperature=0)
    assert after.choices[0].text == alone(model, PROMPTS[6], 16)


# --------------------------------------------------------------------------- disconnects and shutdown

@pytest.mark.slow
def test_a_client_leaving_mid_stream_frees_its_slot(server):
    before = health(server)["cancelled"]
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": CAP, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        state = health(server)
        if state["active"] == 0 and state["waiting"] == 0:
            break
        time.sleep(0.05)
    assert state["active"] == 0 and state["waiting"] == 0
    assert state["cancelled"] == before + 1  # it was freed, not run to its end


@pytest.mark.slow
def test_sigterm_ends_in_flight_streams_cleanly(checkpoint):
    port = free_port()
    proc = start_server(checkpoint, port, grace=0.0)
    try:
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": CAP, "temperature": 0, "stream": True}
        events = []
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    events.append(line[len("data: "):])
                    if len(events) == 1:
                        proc.send_signal(signal.SIGTERM)
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])["choices"][0]
        # The grace period is 0: the stream is ended at once, well before its 100 tokens.
        assert last["finish_reason"] == "abort" and len(events) < CAP
        proc.wait(timeout=20)
    finally:
        stop_server(proc)
    assert "Traceback" not in proc.log.read_text(), proc.log.read_text()


# --------------------------------------------------------------------------- the command line

def test_cli_serve_binds_loopback_by_default():
    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.model == DEFAULT_MODEL
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")


def test_the_server_runs_with_its_long_lived_objects_frozen_out_of_the_collector(model, monkeypatch):
    """run_server freezes what exists before it serves (gc.freeze), so that the collector's full
    passes walk only the requests' objects: it checks as uvicorn would start serving."""
    import gc

    import uvicorn

    from gptforge.serve import ServeSettings, run_server

    seen = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: seen.update(frozen=gc.get_freeze_count()))
    try:
        run_server(model, ServeSettings(model_name="tiny"), port=free_port())
    finally:
        gc.unfreeze()
    assert seen["frozen"] > 10_000  # the model's, torch's and the server's objects


def test_cli_serve_rejects_bad_options(capsys):
    assert main(["serve", "--model", "no-such-model"]) == 2
    assert "no-such-model" in capsys.readouterr().err
    assert main(["serve", "--port", "70000"]) == 2


def test_cli_serve_on_an_address_it_cannot_have_is_one_line(tmp_path, tiny_config, capsys):
    """A port in use or a host that is not this machine's: one line and exit 2 (it was uvicorn's
    log lines and exit 3)."""
    torch.manual_seed(0)
    save(GPTModel(tiny_config(vocab_size=50257)), tmp_path / "tiny")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(tmp_path / "tiny"), "--port", str(port), "--dtype", "float32"]) == 2
        err = capsys.readouterr().err
        assert f"cannot listen on 127.0.0.1:{port}" in err and "choose another --port" in err
        assert err.count("\n") == 1, err
    assert main(["serve", "--model", str(tmp_path / "tiny"), "--host", "999.1.1.1", "--dtype", "float32"]) == 2
    assert "check --host" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_serve_end_to_end_with_the_seed_model(tmp_path):
    port = free_port()
    proc = launch([sys.executable, "-m", "gptforge", "serve", "--model", "book-124m", "--port", str(port),
                   "--max-batch-size", "1"],
                  tmp_path / "server.log", timeout=120)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["book-124m"]
        r = client.completions.create(model="book-124m", prompt="Hello, I am", max_tokens=2, temperature=0)
        # The seed's untrained model (torch.manual_seed(123), the CLI's default seed) continues the
        # seed's prompt with the seed's first two tokens.
        assert r.choices[0].text == " Featureiman"
    finally:
        stop_server(proc)
    assert "Uvicorn running on http://127.0.0.1:" in proc.log.read_text()
