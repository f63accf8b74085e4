"""The server's other endpoints, end to end in a real `gptforge serve` process: embeddings through
the `openai` client against transformers, /classify against `gptforge classify`, /metrics parsed by
prometheus_client, the API key (401 in OpenAI's shape), CORS, and the served model by default."""

from __future__ import annotations

import base64
import json
import sys

import httpx
import hypothesis
import numpy as np
import openai
import pytest
import torch
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from classify_data import messages
from gptforge import GPTModel, embed
from gptforge.checkpoint import save
from gptforge.cli import main
from gptforge.tokenizer import get_tokenizer
from test_embeddings import TEXTS, hf_vectors
from test_serve import free_port, launch, stop_server

KEY = "sk-test-123"
ORIGIN = "http://page.example"
CONTEXT = 64


@pytest.fixture(scope="module")
def model(tiny_config) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(tiny_config(vocab_size=50257, context_length=CONTEXT, emb_dim=64)).eval()


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    """The tiny language model served as "tiny" with an API key and one CORS origin."""
    checkpoint = save(model, tmp_path_factory.mktemp("endpoints") / "tiny")
    port = free_port()
    proc = launch([sys.executable, "-m", "gptforge", "serve", "--model", str(checkpoint), "--served-model-name",
                   "tiny", "--port", str(port), "--dtype", "float32", "--api-key", KEY, "--cors-origin", ORIGIN],
                  checkpoint.parent / "server.log")
    yield f"http://127.0.0.1:{port}"
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def post(server, path, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server}{path}", json=body, headers=headers, timeout=60, **kw)


# --------------------------------------------------------------------------- embeddings

@pytest.mark.slow
def test_embeddings_through_the_openai_client_equal_transformers(client, model, tmp_path):
    r = client.embeddings.create(model="tiny", input=TEXTS)  # the client asks for base64 and decodes it
    assert r.object == "list" and r.model == "tiny" and [d.index for d in r.data] == list(range(len(TEXTS)))
    got = torch.tensor([d.embedding for d in r.data])
    rows = get_tokenizer().encode_batch(TEXTS)
    torch.testing.assert_close(got, hf_vectors(model, tmp_path, rows), atol=1e-4, rtol=0)
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(map(len, rows))
    floats = client.embeddings.create(model="tiny", input=TEXTS[0], encoding_format="float", dimensions=64)
    torch.testing.assert_close(torch.tensor(floats.data[0].embedding), got[0], atol=1e-6, rtol=0)
    by_ids = client.embeddings.create(model="tiny", input=rows[:2], encoding_format="float")
    torch.testing.assert_close(torch.tensor([d.embedding for d in by_ids.data]), got[:2], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_litellm_embedding_smoke(server, model):
    litellm = pytest.importorskip("litellm")
    r = litellm.embedding(model="openai/tiny", input=["Every effort moves you"], api_base=f"{server}/v1", api_key=KEY)
    torch.testing.assert_close(torch.tensor(r.data[0]["embedding"]), embed(model, "Every effort moves you")[0],
                               atol=1e-5, rtol=0)


@pytest.mark.slow
def test_raw_base64_and_the_served_model_by_default(server, model):
    r = post(server, "/v1/embeddings", {"input": "Every effort moves you", "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny"
    vector = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    torch.testing.assert_close(torch.from_numpy(vector.copy()), embed(model, "Every effort moves you")[0],
                               atol=1e-5, rtol=0)
    r = post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["model"] == "tiny"
    r = post(server, "/v1/completions", {"model": "gpt-4", "prompt": "Hello", "max_tokens": 3})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert post(server, "/v1/embeddings", {"model": "gpt-4", "input": "x"}).status_code == 404


@pytest.mark.parametrize("body, param, code", [
    ({"input": []}, "input", None),
    ({"input": ""}, "input", None),
    ({"input": [[]]}, "input", None),
    ({"input": "word " * (CONTEXT + 1)}, "input", "context_length_exceeded"),
    ({"input": [1, 2, 99999]}, "input", None),
    ({"input": 5}, "input", None),
    ({"input": [1, "a"]}, "input", None),
    ({"input": ["a", ["b"]]}, "input", None),
    ({"input": "a", "dimensions": 32}, "dimensions", None),
    ({"input": "a", "dimensions": "64"}, "dimensions", None),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format", None),
    ({"input": "a", "bogus": 1}, "bogus", None),
])
@pytest.mark.slow
def test_bad_embedding_requests_are_400_in_openai_shape(server, body, param, code):
    r = post(server, "/v1/embeddings", {"model": "tiny", **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["code"] == code, error


@pytest.mark.slow
def test_classify_on_a_language_model_is_400(server):
    r = post(server, "/classify", {"input": "hello"})
    assert r.status_code == 400 and "not a classifier" in r.json()["error"]["message"]


# --------------------------------------------------------------------------- metrics

def scrape(server) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, by (name, sorted labels)."""
    text = httpx.get(f"{server}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.mark.slow
def test_metrics_move_by_the_requests_made(client, server):
    before = scrape(server)
    usages = []
    for i, prompt in enumerate(["Hello there", "The quick brown fox", "A"]):
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=4 + i, temperature=0)
        usages.append(r.usage)
    client.embeddings.create(model="tiny", input=["one two", "three"])
    post(server, "/v1/completions", {"prompt": "x", "max_tokens": 10_000})  # a 400
    after = scrape(server)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("gptforge_requests_total", endpoint="/v1/completions", status="200") == 3
    assert delta("gptforge_requests_total", endpoint="/v1/completions", status="400") == 1
    assert delta("gptforge_requests_total", endpoint="/v1/embeddings", status="200") == 1
    generated = sum(u.completion_tokens for u in usages)
    assert delta("gptforge_generation_tokens_total") == generated
    assert delta("gptforge_prompt_tokens_total") == sum(u.prompt_tokens for u in usages) + 3  # + the embeddings' 3
    assert delta("gptforge_time_to_first_token_seconds_count") == 3
    assert delta("gptforge_time_per_output_token_seconds_count") == generated - 3
    assert delta("gptforge_time_to_first_token_seconds_sum") > 0
    assert after[("gptforge_num_requests_running", ())] == 0 and after[("gptforge_num_requests_waiting", ())] == 0
    assert after[("gptforge_kv_cache_usage_ratio", ())] == 0


# --------------------------------------------------------------------------- access

@pytest.mark.slow
def test_the_api_key_is_required_where_it_should_be(server):
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.embeddings.create(model="tiny", input="hi")
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    for path in ["/v1/models", "/metrics", "/tokenizer_info"]:
        r = httpx.get(f"{server}{path}")
        assert r.status_code == 401, path
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and "API key" in error["message"]
    for path, body in [("/v1/completions", {"prompt": "a"}), ("/tokenize", {"prompt": "a"}),
                       ("/classify", {"input": "a"}), ("/v1/chat/completions", {"messages": []})]:
        assert post(server, path, body, key=None).status_code == 401, path
        assert post(server, path, body, key="nope").status_code == 401, path
    assert httpx.get(f"{server}/health").status_code == 200  # open: load balancers probe it
    assert httpx.get(f"{server}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


@pytest.mark.slow
def test_cors_lets_the_named_origin_in(server):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    r = httpx.options(f"{server}/v1/embeddings", headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = httpx.get(f"{server}/v1/models", headers={"Origin": ORIGIN})  # no key: the page can read the 401
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.options(f"{server}/v1/embeddings", headers={**preflight, "Origin": "http://elsewhere.example"})
    assert "access-control-allow-origin" not in r.headers


@pytest.mark.slow
def test_random_bodies_to_the_new_routes_never_crash_the_server(server):
    scalars = st.none() | st.booleans() | st.integers(-5, 70000) | st.floats(-3, 3) | st.text(max_size=20)
    values = scalars | st.lists(scalars, max_size=4) | st.lists(st.lists(st.integers(-1, 60000), max_size=3),
                                                                 max_size=3)
    fields = st.sampled_from(["model", "input", "encoding_format", "dimensions", "user", "extra"])
    bodies = st.dictionaries(fields, values, max_size=4)
    paths = st.sampled_from(["/v1/embeddings", "/classify", "/v1/classify"])

    @hypothesis.settings(max_examples=60, deadline=None, database=None)
    @hypothesis.given(paths, bodies)
    def check(path, body):
        r = post(server, path, body)
        assert r.status_code in (200, 400, 404), (path, body, r.status_code, r.text)
        if r.status_code != 200:
            assert r.json()["error"]["type"] == "invalid_request_error"

    check()
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


# --------------------------------------------------------------------------- a classifier

@pytest.mark.slow
def test_a_finetuned_classifier_serves_classify_as_gptforge_classify(tiny_config, tmp_path, capsys):
    torch.manual_seed(0)
    base = save(GPTModel(tiny_config(vocab_size=50257, context_length=32)), tmp_path / "base")
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": t, "label": ["personal", "junk"][y]}) + "\n"
                             for t, y in messages(24)))
    out = tmp_path / "run"
    assert main(["finetune", "classify", "--data", str(train), "--model", str(base), "--out", str(out),
                 "--epochs", "1", "--no-progress", "--device", "cpu"]) == 0
    capsys.readouterr()
    texts = ["WIN a free prize now! Call 80082", "See you at the park around six?", "ok"]
    assert main(["classify", "--json", "--model", str(out / "checkpoint"), *texts]) == 0
    expected = [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    port = free_port()
    proc = launch([sys.executable, "-m", "gptforge", "serve", "--model", str(out / "checkpoint"),
                   "--served-model-name", "clf", "--port", str(port), "--dtype", "float32"], tmp_path / "clf.log")
    server = f"http://127.0.0.1:{port}"
    try:
        r = post(server, "/classify", {"model": "clf", "input": texts}, key=None)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list" and body["id"].startswith("classify-") and body["model"] == "clf"
        assert [d["index"] for d in body["data"]] == [0, 1, 2]
        for got, want in zip(body["data"], expected):
            assert got["label"] == want["label"] and got["num_classes"] == 2
            assert got["probs"] == pytest.approx([want["probabilities"][k] for k in ("junk", "personal")], abs=1e-5)
        assert body["usage"]["prompt_tokens"] == sum(len(ids) for ids in get_tokenizer().encode_batch(texts))
        one = post(server, "/v1/classify", {"input": texts[0]}, key=None).json()  # the served model by default
        assert one["data"][0]["probs"] == pytest.approx(body["data"][0]["probs"], abs=1e-6)
        for path, request in [("/v1/completions", {"model": "clf", "prompt": "Hi"}),
                              ("/v1/chat/completions",
                               {"model": "clf", "messages": [{"role": "user", "content": "Hi"}]})]:
            r = post(server, path, request, key=None)
            assert r.status_code == 400 and r.json()["error"]["code"] == "model_is_classifier", r.text
            assert "classifier" in r.json()["error"]["message"] and "/classify" in r.json()["error"]["message"]
        for bad in [{"input": []}, {"input": ""}, {"input": ["a", 3]}, {"input": "a", "top_k": 2}]:
            r = post(server, "/classify", bad, key=None)
            assert r.status_code == 400 and r.json()["error"]["param"] in ("input", "top_k"), (bad, r.text)
        r = post(server, "/v1/embeddings", {"input": "hello"}, key=None)
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 32  # the trunk embeds
        assert httpx.get(f"{server}/health").json()["status"] == "ok"
    finally:
        stop_server(proc)


def test_cli_takes_the_key_from_the_environment_and_repeats_cors_origins(monkeypatch, tmp_path, tiny_config):
    import gptforge.serve

    save(GPTModel(tiny_config(vocab_size=50257)), tmp_path / "ckpt")
    served = {}
    monkeypatch.setattr(gptforge.serve, "run_server", lambda model, settings, **kw: served.update(settings=settings))
    monkeypatch.setenv("GPTFORGE_API_KEY", "sk-env")
    assert main(["serve", "--model", str(tmp_path / "ckpt"), "--cors-origin", "http://a", "--cors-origin", "*"]) == 0
    assert served["settings"].api_key == "sk-env" and served["settings"].cors_origins == ("http://a", "*")
    assert "sk-env" not in repr(served["settings"])  # never in a log line
    assert main(["serve", "--model", str(tmp_path / "ckpt"), "--api-key", "sk-flag"]) == 0
    assert served["settings"].api_key == "sk-flag"
    monkeypatch.delenv("GPTFORGE_API_KEY")
    assert main(["serve", "--model", str(tmp_path / "ckpt")]) == 0
    assert served["settings"].api_key is None and served["settings"].cors_origins == ()
