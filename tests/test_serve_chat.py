"""Chat completions: `gptforge serve` on a model saved with a prompt template, driven by the
official `openai` client; results are checked against the library's `generate_text` on the
rendered prompt. `gptforge judge` is run against it too (the server as the judge endpoint)."""

from __future__ import annotations

import json

import openai
import pytest
import torch
from fastapi.testclient import TestClient

from gen_helpers import positional_model
from gptforge import GPTModel, generate_text, save
from gptforge.cli import main
from gptforge.instruct import ALPACA, chat_prompt
from gptforge.judge import judge_prompt
from gptforge.scheduler import BatchScheduler
from gptforge.serve import ServeSettings, create_app
from gptforge.tokenizer import get_tokenizer
from test_serve import client, free_port, start_server, stop_server  # noqa: F401 (client: a fixture on our server)

INSTRUCTION = "Name the capital of France."
ANSWER = "Paris is the capital.\n\n### Instruction:\nMore"
RECORD = {"instruction": INSTRUCTION, "input": "", "output": "Paris.", "model_response": "Paris is the capital."}


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def model() -> GPTModel:
    """Answers INSTRUCTION with ANSWER, and the judge prompt for RECORD with "85" (then stops)."""
    enc = get_tokenizer()
    chat_start = len(enc.encode(chat_prompt(user(INSTRUCTION))))
    judge_start = len(enc.encode(chat_prompt(user(judge_prompt(RECORD)))))
    model = positional_model({chat_start: enc.encode(ANSWER), judge_start: enc.encode("85") + [50256]})
    model.cfg = model.cfg.replace(prompt_template=ALPACA)
    return model


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    port = free_port()
    proc = start_server(save(model, tmp_path_factory.mktemp("chat") / "instruct"), port)
    yield f"http://127.0.0.1:{port}"
    stop_server(proc)


def library(model, messages, max_tokens, **options) -> str:
    prompt = chat_prompt(messages)
    return generate_text(model, prompt, max_tokens, stop_strings=ALPACA.stop, **options)[len(prompt):]


@pytest.mark.slow
def test_chat_answers_with_the_template_and_stops_at_the_next_section(client, model):
    r = client.chat.completions.create(model="tiny", messages=user(INSTRUCTION), temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "Paris is the capital." == library(model, user(INSTRUCTION), 50)
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == len(get_tokenizer().encode(chat_prompt(user(INSTRUCTION))))


@pytest.mark.slow
def test_streamed_chat_equals_the_plain_one(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=user(INSTRUCTION), temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    with_choices = [c for c in chunks if c.choices]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == "Paris is the capital."
    assert with_choices[-1].choices[0].finish_reason == "stop" and len(with_choices) > 2
    assert chunks[-1].usage.completion_tokens > 0


@pytest.mark.slow
def test_chat_sampling_n_seed_stop_and_max_tokens_as_the_library(client, model):
    messages = [{"role": "system", "content": "Answer briefly."}, *user("Say something.")]
    options = dict(temperature=0.9, seed=7)
    r = client.chat.completions.create(model="tiny", messages=messages, n=2, max_tokens=6, **options)
    assert [c.message.content for c in r.choices] == [library(model, messages, 6, temperature=0.9, seed=s)
                                                      for s in (7, 8)]
    assert r.choices[0].finish_reason in ("length", "stop")
    cut = client.chat.completions.create(model="tiny", messages=user(INSTRUCTION), temperature=0, stop=["capital"])
    assert cut.choices[0].message.content == "Paris is the "
    short = client.chat.completions.create(model="tiny", messages=user(INSTRUCTION), temperature=0,
                                           max_completion_tokens=2)
    assert short.choices[0].message.content == "Paris is" and short.choices[0].finish_reason == "length"


@pytest.mark.slow
def test_chat_errors_are_openai_shaped(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "assistant", "content": "hi"}])
    assert err.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        client.chat.completions.create(model="tiny", messages=user("x"), top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="context_length_exceeded|maximum context"):
        client.chat.completions.create(model="tiny", messages=user("word " * 300))
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=user("x"))


@pytest.mark.slow
def test_judge_through_gptforge_serve(server, tmp_path, capsys):
    data = tmp_path / "responses.json"
    data.write_text(json.dumps([RECORD]))
    assert main(["judge", "--data", str(data), "--url", f"{server}/v1", "--model", "tiny"]) == 0
    assert "mean score 85.00 over 1 responses" in capsys.readouterr().out
    assert json.loads((tmp_path / "responses-scores.jsonl").read_text())["score"] == 85


def test_a_base_model_answers_chat_with_400(tiny_config):
    torch.manual_seed(0)
    model = GPTModel(tiny_config(vocab_size=50257, context_length=64))
    app = create_app(BatchScheduler(model, max_batch_size=2), ServeSettings(model_name="base"))
    with TestClient(app) as http:
        r = http.post("/v1/chat/completions", json={"model": "base", "messages": user("hi")})
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["code"] == "no_chat_template" and "has no prompt template" in error["message"]
        assert http.post("/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 2}).status_code == 200
