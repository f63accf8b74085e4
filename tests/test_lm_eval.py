"""lm-evaluation-harness against `gptforge serve` with nothing but the URL: the server's tokenizer
endpoints are what lm-eval's `local-completions` probes for its "auto" (remote) tokenizer, and its
scores equal lm-eval's own `hf` backend on the Hugging Face export of the same weights."""

from __future__ import annotations

import json

import pytest

import gptforge
from gptforge.scheduler import BatchScheduler
from gptforge.serve import ServeSettings, create_app
from gptforge.tokenizer import get_tokenizer
from test_serve import free_port, model, start_server, stop_server  # noqa: F401 (model: the server tests' tiny model)

LOGLIK_ATOL = 1e-4


# --------------------------------------------------------------------------- the endpoints, in-process

@pytest.fixture(scope="module")
def app_client(model):
    from fastapi.testclient import TestClient

    app = create_app(BatchScheduler(model, get_tokenizer()), ServeSettings(model_name="tiny"))
    with TestClient(app) as client:
        yield client


def test_tokenizer_endpoints_answer_in_vllms_shape(app_client):
    info = app_client.get("/tokenizer_info").json()
    assert info["eos_token"] == info["bos_token"] == "<|endoftext|>" and info["model_max_length"] == 128
    text = "Hello, world<|endoftext|> again"
    r = app_client.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert r["tokens"] == get_tokenizer().encode(text) and r["count"] == len(r["tokens"]) and 50256 in r["tokens"]
    assert r["token_strs"] is None
    strs = app_client.post("/tokenize", json={"prompt": "Hi there", "return_token_strs": True}).json()["token_strs"]
    assert strs == ["Hi", " there"]
    assert app_client.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": text}


@pytest.mark.parametrize("path,body,status,param", [
    ("/detokenize", {"tokens": [50257]}, 400, "tokens"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"prompt": "x", "extra": 1}, 400, "extra"),
    ("/tokenize", {"prompt": "x", "model": "other"}, 404, "model"),
])
def test_tokenizer_endpoints_refuse_bad_requests(app_client, path, body, status, param):
    r = app_client.post(path, json=body)
    assert r.status_code == status and r.json()["error"]["param"] == param


# --------------------------------------------------------------------------- lm-eval, end to end

def _write_tasks(folder, data_dir) -> list[str]:
    """A multiple-choice task (which line follows?) and a generate-until task (continue a line),
    built from lines of the corpora, as lm-eval task YAML files in `folder`."""
    lines = [ln.strip() for ln in (data_dir / "tinyshakespeare.txt").read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if 20 <= len(ln) <= 60][:40]
    verdict = [ln.strip() for ln in (data_dir / "the-verdict.txt").read_text(encoding="utf-8").splitlines()]
    verdict = [ln for ln in verdict if 20 <= len(ln) <= 60][:8]
    mc = [{"context": lines[i], "choices": [lines[i + 1], lines[i + 20], verdict[i % 8]], "gold": i % 3}
          for i in range(6)]
    for doc in mc:  # put the true next line at `gold`
        doc["choices"].insert(doc["gold"], doc["choices"].pop(0))
    gen = [{"prompt": ln[:25], "answer": ln[25:]} for ln in lines[10:14]]
    for name, docs in (("mc", mc), ("gen", gen)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    common = f"dataset_path: json\ntest_split: train\n"
    (folder / "gptforge_mc.yaml").write_text(
        f"task: gptforge_mc\n{common}dataset_kwargs:\n  data_files: {folder / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\n"
        "doc_to_target: gold\ntarget_delimiter: \"\\n\"\nmetric_list:\n  - metric: acc\n", encoding="utf-8")
    (folder / "gptforge_gen.yaml").write_text(
        f"task: gptforge_gen\n{common}dataset_kwargs:\n  data_files: {folder / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: prompt\ndoc_to_target: answer\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 12\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n", encoding="utf-8")
    return ["gptforge_mc", "gptforge_gen"]


def _evaluate(lm_eval, model, model_args: str | None, tasks: list[str], folder) -> dict:
    """lm-eval's simple_evaluate on our task files only; `model` is a backend name or an LM."""
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=tasks, log_samples=True, batch_size=1,
        task_manager=TaskManager(include_path=str(folder), include_defaults=False))


@pytest.mark.slow
def test_lm_eval_local_completions_with_only_the_url_equals_its_hf_backend(model, tmp_path, data_dir, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    hf_dir = gptforge.save(model, tmp_path / "hf", format="hf")  # with GPT-2's tokenizer files
    tasks = _write_tasks(tmp_path, data_dir)
    port = free_port()
    proc = start_server(hf_dir, port)
    try:
        from lm_eval.api.registry import get_model

        # exactly what `lm_eval --model local-completions --model_args model=...,base_url=...` builds
        lm = get_model("local-completions").create_from_arg_string(
            f"model=tiny,base_url=http://127.0.0.1:{port}/v1/completions", {"batch_size": 1})
        assert lm.tokenizer_backend == "remote"  # found by probing the server: no tokenizer= given
        served = _evaluate(lm_eval, lm, None, tasks, tmp_path)
    finally:
        stop_server(proc)
    reference = _evaluate(lm_eval, "hf", f"pretrained={hf_dir},dtype=float32,device=cpu", tasks, tmp_path)

    assert served["results"]["gptforge_mc"]["acc,none"] == reference["results"]["gptforge_mc"]["acc,none"]
    ours = [r[0] for s in served["samples"]["gptforge_mc"] for r in s["resps"]]
    theirs = [r[0] for s in reference["samples"]["gptforge_mc"] for r in s["resps"]]
    assert len(ours) == len(theirs) == 18
    for (ll, greedy), (ll_ref, greedy_ref) in zip(ours, theirs):
        assert ll == pytest.approx(ll_ref, abs=LOGLIK_ATOL) and greedy == greedy_ref
    texts = [s["resps"][0][0] for s in served["samples"]["gptforge_gen"]]
    assert texts == [s["resps"][0][0] for s in reference["samples"]["gptforge_gen"]]
    assert len(texts) == 4 and all(texts)
    worst = max(abs(a[0] - b[0]) for a, b in zip(ours, theirs))
    print(f"\nlm-eval local-completions vs hf: acc {served['results']['gptforge_mc']['acc,none']} both, "
          f"{len(ours)} loglikelihoods within {worst:.2e}, generations {texts}")
