"""Structured output, chat logprobs, forced tool calls and vLLM's sampling fields, end to end: `gptforge
serve` in a real process, driven by the official `openai` client (LangChain and LiteLLM as smoke
tests). JSON outputs are checked by `json.loads` and `jsonschema`, logprobs against the model's own
log-softmax, plain requests batched beside constrained ones against the library's `generate`."""

from __future__ import annotations

import json
import math
import re
import sys
import threading
from typing import Literal

import httpx
import hypothesis
import jsonschema
import openai
import pydantic
import pytest
import torch
from hypothesis import strategies as st

import gptforge
from gptforge import GPTModel, save
from gptforge.instruct import ALPACA, chat_prompt
from gptforge.structured import (
    GrammarError, allowed_tokens, choice_grammar, json_object_grammar, json_schema_grammar, new_bitmask, regex_grammar,
)
from gptforge.tokenizer import get_tokenizer
from test_serve import alone, free_port, launch, stop_server

BUDGET = 200  # every constrained answer must be complete within this many tokens

SCHEMAS = {
    "nested": {"type": "object", "additionalProperties": False, "required": ["user", "active"], "properties": {
        "user": {"type": "object", "additionalProperties": False, "required": ["name", "age"], "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 150}}},
        "active": {"type": "boolean"}}},
    "enums": {"type": "object", "additionalProperties": False, "required": ["color", "size"], "properties": {
        "color": {"enum": ["red", "green", "blue"]}, "size": {"type": "string", "enum": ["S", "M", "L"]}}},
    "arrays": {"type": "object", "additionalProperties": False, "required": ["tags", "counts"], "properties": {
        "tags": {"type": "array", "minItems": 1, "maxItems": 4, "items": {"type": "string", "maxLength": 8}},
        "counts": {"type": "array", "maxItems": 3, "items": {"type": "integer", "minimum": -5, "maximum": 99}}}},
    "optional": {"type": "object", "additionalProperties": False, "required": ["id", "kind"], "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 9999}, "kind": {"const": "item"},
        "note": {"type": "string", "maxLength": 20}, "ok": {"type": ["boolean", "null"]}}},
}

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
           "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                          "properties": {"city": {"type": "string", "maxLength": 10},
                                         "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
CLOCK = {"type": "function", "function": {"name": "get_time",
         "parameters": {"type": "object", "additionalProperties": False, "required": ["zone"],
                        "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}}}}}


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def json_format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


def serve_cmd(model: str, port: int) -> list[str]:
    return [sys.executable, "-m", "gptforge", "serve", "--model", model, "--served-model-name", "tiny",
            "--port", str(port), "--max-tokens-cap", str(BUDGET), "--max-batch-size", "8"]


@pytest.fixture(scope="module")
def chat_model(tiny_config) -> GPTModel:
    """A random tiny model with a prompt template (so it chats): it knows nothing, the grammar does it all."""
    torch.manual_seed(1)
    model = GPTModel(tiny_config(vocab_size=50257, context_length=256, emb_dim=64)).eval()
    model.cfg = model.cfg.replace(prompt_template=ALPACA)
    return model


@pytest.fixture(scope="module")
def builtin_model() -> GPTModel:
    return gptforge.load("gptforge-shakespeare", dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def chat_server(chat_model, tmp_path_factory):
    path = save(chat_model, tmp_path_factory.mktemp("structured") / "chat")
    port = free_port()
    proc = launch(serve_cmd(str(path), port), path.parent / "server.log", timeout=240)
    yield f"http://127.0.0.1:{port}"
    stop_server(proc)


@pytest.fixture(scope="module")
def builtin_server(tmp_path_factory):
    port = free_port()
    proc = launch(serve_cmd("gptforge-shakespeare", port), tmp_path_factory.mktemp("builtin") / "server.log",
                  timeout=240)
    yield f"http://127.0.0.1:{port}"
    stop_server(proc)


@pytest.fixture(scope="module")
def chat(chat_server):
    return openai.OpenAI(base_url=f"{chat_server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def builtin(builtin_server):
    return openai.OpenAI(base_url=f"{builtin_server}/v1", api_key="unused", max_retries=0, timeout=120)


def check_json(text: str, finish: str, tokens: int, schema: dict) -> None:
    assert finish == "stop" and tokens <= BUDGET, (finish, tokens, text)
    outside_strings = re.sub(r'"(?:[^"\\]|\\.)*"', "", text)
    assert not re.search(r"\s", outside_strings), text  # compact: no whitespace between tokens
    jsonschema.validate(json.loads(text), schema)


# --------------------------------------------------------------------------- structured output

def ask_json(client, chat_api: bool, name: str, sampled: bool, stream: bool, seed: int) -> tuple[str, str, int]:
    """One json_schema request; (text, finish_reason, completion tokens)."""
    options = dict(max_tokens=BUDGET, temperature=1.0 if sampled else 0,
                   seed=seed, stream=stream, **({"stream_options": {"include_usage": True}} if stream else {}))
    if chat_api:
        r = client.chat.completions.create(model="tiny", messages=user(f"Describe a {name} record."),
                                           response_format=json_format(name), **options)
        if not stream:
            return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens
        chunks = list(r)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        r = client.completions.create(model="tiny", prompt=f"A {name} record in JSON:",
                                      extra_body={"response_format": json_format(name)}, **options)
        if not stream:
            return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens
        chunks = list(r)
        text = "".join(c.choices[0].text for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    return text, finish, chunks[-1].usage.completion_tokens


@pytest.mark.slow
@pytest.mark.parametrize("which", ["builtin", "random"])
def test_json_schema_outputs_validate_batched_beside_plain_requests(which, request):
    """Every schema x greedy/sampled x streamed/not at once, with two plain requests in the same
    batches: each JSON answer validates and ends within the budget; each plain answer is exactly
    what the library gives alone (the masks are per row)."""
    if which == "builtin":
        client, model, chat_api = request.getfixturevalue("builtin"), request.getfixturevalue("builtin_model"), False
    else:
        client, model, chat_api = request.getfixturevalue("chat"), request.getfixturevalue("chat_model"), True
    jobs = [(name, sampled, stream) for name in SCHEMAS for sampled in (False, True) for stream in (False, True)]
    results, plain, errors = {}, {}, []
    barrier = threading.Barrier(len(jobs) + 2)

    def constrained(i: int, job: tuple) -> None:
        try:
            barrier.wait()
            results[job] = ask_json(client, chat_api, *job, seed=i)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    def unconstrained(prompt: str) -> None:
        barrier.wait()
        if chat_api:
            r = client.chat.completions.create(model="tiny", messages=user(prompt), max_tokens=30, temperature=0)
            plain[prompt] = r.choices[0].message.content
        else:
            plain[prompt] = client.completions.create(model="tiny", prompt=prompt, max_tokens=30,
                                                      temperature=0).choices[0].text

    threads = [threading.Thread(target=constrained, args=(i, job)) for i, job in enumerate(jobs)]
    threads += [threading.Thread(target=unconstrained, args=(p,)) for p in ("ROMEO:", "To be or not")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    for (name, _, _), (text, finish, tokens) in results.items():
        check_json(text, finish, tokens, SCHEMAS[name])
    assert len(results) == len(jobs)
    for prompt, text in plain.items():
        if chat_api:
            expected = gptforge.generate_text(model, chat_prompt(user(prompt)), 30, stop_strings=ALPACA.stop)
            assert text == expected[len(chat_prompt(user(prompt))):]
        else:
            assert text == alone(model, prompt, 30)


@pytest.mark.slow
def test_parse_json_object_guided_json_structured_outputs(chat, builtin):
    class Pet(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=10)
        kind: Literal["cat", "dog", "bird"]
        age: int = pydantic.Field(ge=0, le=30)

    r = chat.chat.completions.parse(model="tiny", messages=user("A pet?"), response_format=Pet, temperature=0,
                                    max_tokens=BUDGET)
    assert isinstance(r.choices[0].message.parsed, Pet)

    r = builtin.completions.create(model="tiny", prompt="{", max_tokens=BUDGET, temperature=0,
                                   extra_body={"guided_json": SCHEMAS["enums"]})
    check_json(r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens, SCHEMAS["enums"])
    r = builtin.completions.create(model="tiny", prompt="Size:", max_tokens=10, temperature=0,
                                   extra_body={"structured_outputs": {"choice": ["small", "large"]}})
    assert r.choices[0].text in ("small", "large") and r.choices[0].finish_reason == "stop"
    r = builtin.completions.create(model="tiny", prompt="Code:", max_tokens=20, temperature=0.8, seed=1,
                                   extra_body={"structured_outputs": {"regex": "[A-Z]{2}-[0-9]{3}"}})
    assert len(r.choices[0].text) == 6 and r.choices[0].text[2] == "-"
    # any JSON object: the built-in model would write one string forever (its keys are free text), so
    # '"' and '}' are pushed up with logit_bias; the grammar still decides where each may go
    r = builtin.completions.create(model="tiny", prompt="ROMEO:", max_tokens=BUDGET, temperature=0,
                                   logit_bias={"1": 30, "92": 30},
                                   extra_body={"response_format": {"type": "json_object"}})
    assert (r.choices[0].text, r.choices[0].finish_reason) == ('{"":""}', "stop")
    # response_format text is plain text
    r = builtin.completions.create(model="tiny", prompt="ROMEO:", max_tokens=5, temperature=0,
                                   extra_body={"response_format": {"type": "text"}})
    assert r.choices[0].text == builtin.completions.create(model="tiny", prompt="ROMEO:", max_tokens=5,
                                                           temperature=0).choices[0].text


def follows(grammar, text: str) -> bool:
    """Whether the grammar's masks allow `text` (as GPT-2 tokenizes it) and then the end of text."""
    tokens, eot = get_tokenizer().encode(text), get_tokenizer().eot_id
    matcher, mask = grammar.matcher(), new_bitmask(1, 50257)
    for token in tokens + [eot]:
        matcher.fill(mask, 0)
        if not allowed_tokens(mask, 50257)[0, token]:
            return False
        if token != eot:
            matcher.accept(token)
    return True


def test_grammars_hold_json_compact_and_objects_closed():
    point = {"type": "object", "properties": {"x": {"type": "integer"}, "tag": {"enum": ["a", "b"]}}, "required": ["x"]}
    grammar = json_schema_grammar(point)
    assert follows(grammar, '{"x":1}') and follows(grammar, '{"x":-20,"tag":"b"}')
    assert not follows(grammar, '{"x": 1}') and not follows(grammar, '{ "x":1}')  # no whitespace
    assert not follows(grammar, '{"x":1,"y":2}')  # no keys the schema does not list (vLLM's default too)
    assert not follows(grammar, '{"tag":"a"}') and not follows(grammar, '{"x":1,"tag":"c"}') and not follows(grammar, '{"x":1')
    assert follows(json_schema_grammar({**point, "additionalProperties": True}), '{"x":1,"y":2}')
    assert follows(json_object_grammar(), '{"any":[1,{"b":null}]}') and not follows(json_object_grammar(), "[1]")
    assert follows(choice_grammar(["yes", "no"]), "no") and not follows(choice_grammar(["yes", "no"]), "maybe")
    assert follows(regex_grammar("[a-c]{2}-[0-9]+"), "ab-12") and not follows(regex_grammar("[a-c]{2}"), "ad")


def test_the_scheduler_masks_each_constrained_row_alone(tiny_config):
    """In process: constrained rows (greedy and sampled, with a logit bias) decoded in the same steps
    as plain greedy rows: the plain ones equal the library alone, the constrained ones validate."""
    from test_serve_scheduler import make_seq, run_to_end
    from gptforge.generation import GenerationConfig, prompt_ids
    from gptforge.scheduler import BatchScheduler, SequenceState

    torch.manual_seed(0)
    model = GPTModel(tiny_config(vocab_size=50257, context_length=128, emb_dim=64)).eval()
    schema = {"type": "object", "required": ["n", "ok"], "properties": {
        "n": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}}}
    grammar = json_schema_grammar(schema)
    scheduler = BatchScheduler(model, max_batch_size=8)
    plain = [make_seq(prompt_ids(p), 20, []) for p in ("Hello, I am", "A", "x y z")]
    constrained = [SequenceState(prompt_ids(p), 60, GenerationConfig(temperature=t, seed=1), lambda out: None,
                                 grammar=grammar.matcher(), logit_bias={25: 3.0})
                   for p, t in (("Hello", 0.0), ("Once upon", 1.0))]
    for seq in [*plain, *constrained]:
        scheduler.submit(seq)
    steps = run_to_end(scheduler)
    assert steps < 20 + max(len(s.generated) for s in constrained)  # together, not one after another
    for seq in plain:
        assert seq.generated == gptforge.generate(model, torch.tensor([seq.prompt_ids]), 20,
                                                  stop_token_ids=())[0, len(seq.prompt_ids):].tolist()
    for seq in constrained:
        text = get_tokenizer().decode([t for t in seq.generated if t != get_tokenizer().eot_id])
        assert seq.finish_reason == "stop" and len(seq.generated) < 60
        jsonschema.validate(json.loads(text), schema)


def test_a_schema_the_grammar_cannot_compile_names_the_problem():
    with pytest.raises(GrammarError, match="Invalid type: foo"):
        json_schema_grammar({"type": "foo"})
    with pytest.raises(GrammarError, match="unclosed group"):
        json_schema_grammar({"type": "string", "pattern": "(("})


# --------------------------------------------------------------------------- logprobs

def expected_logprobs(model, prompt_ids: list[int], generated: list[int]) -> torch.Tensor:
    """The model's own log-softmax of each generated token given what came before: (n,)."""
    ids = prompt_ids + generated
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)  # (T, V)
    return logp[len(prompt_ids) - 1:-1].gather(1, torch.tensor(generated)[:, None])[:, 0]


@pytest.mark.slow
def test_chat_logprobs_are_the_models_own_streamed_or_not(chat, chat_model):
    enc = get_tokenizer().encoding
    r = chat.chat.completions.create(model="tiny", messages=user("Hi"), max_tokens=12, temperature=0,
                                     logprobs=True, top_logprobs=5)
    content = r.choices[0].logprobs.content
    assert "".join(e.token for e in content) == r.choices[0].message.content
    generated = [enc.encode_single_token(bytes(e.bytes)) for e in content]
    expected = expected_logprobs(chat_model, enc.encode(chat_prompt(user("Hi")), allowed_special="all"), generated)
    torch.testing.assert_close(torch.tensor([e.logprob for e in content]), expected, atol=1e-4, rtol=1e-4)
    for e in content:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True)
        assert sum(math.exp(v) for v in tops) <= 1 + 1e-6
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == e.logprob  # greedy
        assert all(bytes(t.bytes).decode("utf-8", "replace") == t.token for t in e.top_logprobs)
    streamed = list(chat.chat.completions.create(model="tiny", messages=user("Hi"), max_tokens=12, temperature=0,
                                                 logprobs=True, top_logprobs=5, stream=True))
    entries = [e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in entries] == [(e.token, e.logprob) for e in content]
    plain = chat.chat.completions.create(model="tiny", messages=user("Hi"), max_tokens=3, logprobs=False)
    assert plain.choices[0].logprobs is None


@pytest.mark.slow
def test_completion_logprobs_up_to_20_list_the_sampled_token_too(builtin, builtin_model):
    r = builtin.completions.create(model="tiny", prompt="ROMEO:", max_tokens=8, temperature=1.5, seed=7, logprobs=20)
    lp = r.choices[0].logprobs
    ids = get_tokenizer().encode("ROMEO:")
    generated = [get_tokenizer().encoding.encode_single_token(t.encode()) for t in lp.tokens]
    torch.testing.assert_close(torch.tensor(lp.token_logprobs), expected_logprobs(builtin_model, ids, generated),
                               atol=1e-4, rtol=1e-4)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[token] == logprob and len(top) in (20, 21)
        assert len(top) == 20 or logprob == min(top.values())  # outside the top 20: listed as the 21st


# --------------------------------------------------------------------------- tools

@pytest.mark.slow
def test_forced_tool_calls_are_well_formed(chat):
    r = chat.chat.completions.create(model="tiny", messages=user("Weather in Paris?"), tools=[WEATHER, CLOCK],
                                     tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                     temperature=0, max_tokens=BUDGET)
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "stop" and message.content is None and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])

    for stream in (False, True):
        r = chat.chat.completions.create(model="tiny", messages=user("What time is it?"), tools=[WEATHER, CLOCK],
                                         tool_choice="required", parallel_tool_calls=False, temperature=0.9,
                                         seed=3, max_tokens=BUDGET, stream=stream)
        if stream:
            chunks = list(r)
            calls = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
            finish = chunks[-1].choices[0].finish_reason
        else:
            calls, finish = r.choices[0].message.tool_calls, r.choices[0].finish_reason
        assert finish == "tool_calls" and len(calls) == 1
        tool = {"get_weather": WEATHER, "get_time": CLOCK}[calls[0].function.name]
        jsonschema.validate(json.loads(calls[0].function.arguments), tool["function"]["parameters"])

    r = chat.chat.completions.create(model="tiny", messages=user("Hi"), tools=[WEATHER], tool_choice="none",
                                     max_tokens=4, temperature=0)
    assert r.choices[0].message.tool_calls is None and isinstance(r.choices[0].message.content, str)
    with pytest.raises(openai.BadRequestError, match="not supported for GPT-2") as err:
        chat.chat.completions.create(model="tiny", messages=user("Hi"), tools=[WEATHER], tool_choice="auto")
    assert err.value.body["param"] == "tool_choice"


# --------------------------------------------------------------------------- sampling fields

@pytest.mark.slow
def test_vllm_sampling_fields_and_logit_bias(builtin, builtin_model):
    options = dict(temperature=0.9, top_k=20, min_p=0.05, repetition_penalty=1.3, seed=5)
    r = builtin.completions.create(model="tiny", prompt="ROMEO:", max_tokens=12, temperature=0.9, seed=5,
                                   extra_body={k: options[k] for k in ("top_k", "min_p", "repetition_penalty")})
    assert r.choices[0].text == alone(builtin_model, "ROMEO:", 12, **options)
    eot = str(get_tokenizer().eot_id)
    # <|endoftext|> pushed up: the text ends at once, after min_tokens when asked, never with ignore_eos
    r = builtin.completions.create(model="tiny", prompt="ROMEO:", max_tokens=8, temperature=0, logit_bias={eot: 100})
    assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == ("", "stop", 1)
    r = builtin.completions.create(model="tiny", prompt="ROMEO:", max_tokens=8, temperature=0, logit_bias={eot: 100},
                                   extra_body={"min_tokens": 3})
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("stop", 4)
    assert r.choices[0].text == alone(builtin_model, "ROMEO:", 3)
    r = builtin.completions.create(model="tiny", prompt="ROMEO:", max_tokens=3, temperature=0, logit_bias={eot: 100},
                                   extra_body={"ignore_eos": True})
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("<|endoftext|>" * 3, "length")
    # a token pushed down never appears; top_k 1 samples greedily
    first = get_tokenizer().encode(alone(builtin_model, "ROMEO:", 1))[0]
    r = builtin.completions.create(model="tiny", prompt="ROMEO:", max_tokens=1, temperature=0,
                                   logit_bias={str(first): -100})
    assert get_tokenizer().encode(r.choices[0].text)[0] != first
    r = builtin.completions.create(model="tiny", prompt="ROMEO:", max_tokens=6, temperature=1.0, seed=9,
                                   extra_body={"top_k": 1})
    assert r.choices[0].text == alone(builtin_model, "ROMEO:", 6)


# --------------------------------------------------------------------------- bad values

BAD_CHAT = [
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "pattern": "(("}}}}, "response_format"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"²": 1}}, "logit_bias"),
    ({"logit_bias": {"11": 101}}, "logit_bias"),
    ({"logit_bias": {"99999": 1}}, "logit_bias"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_tokens": 50, "max_tokens": 10}, "min_tokens"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
    ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice"),
    ({"tools": [WEATHER]}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}], "tool_choice": "required"}, "tools"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
]
BAD_COMPLETION = [
    ({"logprobs": 21}, "logprobs"),
    ({"guided_json": {"type": "foo"}}, "guided_json"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs"),
    ({"structured_outputs": {"grammar": "x"}}, "structured_outputs"),
    ({"guided_json": {}, "response_format": {"type": "json_object"}}, "guided_json"),
]


@pytest.mark.slow
def test_bad_values_of_every_new_field_are_400_in_openai_shape(chat_server):
    for path, cases, base in [("chat/completions", BAD_CHAT, {"messages": user("x")}),
                              ("completions", BAD_COMPLETION, {"prompt": "x"})]:
        for fields, param in cases:
            r = httpx.post(f"{chat_server}/v1/{path}", json={"model": "tiny", "max_tokens": 5, **base, **fields},
                           timeout=60)
            assert r.status_code == 400, (fields, r.text)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
            assert error["param"] == param, (fields, error)


@pytest.mark.slow
def test_random_chat_bodies_with_the_new_fields_never_crash_the_server(chat_server):
    scalars = st.none() | st.booleans() | st.integers(-5, 30) | st.floats(-3, 3) | st.text(max_size=8)
    formats = st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "json_schema"}, {"type": 3},
                               {"type": "json_schema", "json_schema": {"name": "e", "schema": SCHEMAS["enums"]}},
                               {"type": "json_schema", "json_schema": {"name": "e", "schema": {"type": 1}}}])
    tools = st.sampled_from([[WEATHER], [WEATHER, CLOCK], [], [{"type": "function"}], "x"])
    choices = st.sampled_from(["none", "auto", "required", {"type": "function", "function": {"name": "get_time"}}])
    values = {"response_format": formats | scalars, "tools": tools, "tool_choice": choices | scalars,
              "logprobs": scalars, "top_logprobs": scalars, "logit_bias": st.dictionaries(st.text(max_size=6), scalars,
                                                                                           max_size=2) | scalars,
              "top_k": scalars, "min_p": scalars, "repetition_penalty": scalars, "min_tokens": scalars,
              "ignore_eos": scalars, "parallel_tool_calls": scalars, "stream": st.booleans()}
    bodies = st.fixed_dictionaries({"model": st.just("tiny"), "messages": st.just(user("x")),
                                    "max_tokens": st.integers(1, 12)}, optional=values)

    @hypothesis.settings(max_examples=50, deadline=None, database=None)
    @hypothesis.given(bodies)
    def check(body):
        r = httpx.post(f"{chat_server}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code in (200, 400), (body, r.status_code, r.text)
        if r.status_code == 400:
            assert r.json()["error"]["type"] == "invalid_request_error"

    check()
    assert httpx.get(f"{chat_server}/health").json()["status"] == "ok"


# --------------------------------------------------------------------------- other clients

@pytest.mark.slow
def test_langchain_chat_openai_invoke_stream_logprobs_and_structured_output(chat_server, chat):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(base_url=f"{chat_server}/v1", api_key="unused", model="tiny", temperature=0,
                                      max_tokens=10, max_retries=0)
    expected = chat.chat.completions.create(model="tiny", messages=user("Hello"), max_tokens=10,
                                            temperature=0).choices[0].message.content
    assert llm.invoke("Hello").content == expected
    assert "".join(chunk.content for chunk in llm.stream("Hello")) == expected
    with_logprobs = llm.bind(logprobs=True).invoke("Hello")
    assert len(with_logprobs.response_metadata["logprobs"]["content"]) >= 1

    class Answer(pydantic.BaseModel):
        verdict: Literal["yes", "no"]
        confidence: int = pydantic.Field(ge=0, le=10)

    structured = langchain_openai.ChatOpenAI(base_url=f"{chat_server}/v1", api_key="unused", model="tiny",
                                             temperature=0, max_tokens=BUDGET, max_retries=0)
    assert isinstance(structured.with_structured_output(Answer, method="json_schema").invoke("Sure?"), Answer)


@pytest.mark.slow
def test_litellm_completion_with_openai_models(chat_server, chat, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network at import
    litellm = pytest.importorskip("litellm")
    expected = chat.chat.completions.create(model="tiny", messages=user("Hello"), max_tokens=8,
                                            temperature=0).choices[0].message.content
    r = litellm.completion(model="openai/tiny", api_base=f"{chat_server}/v1", api_key="unused",
                           messages=user("Hello"), max_tokens=8, temperature=0)
    assert r.choices[0].message.content == expected
    r = litellm.completion(model="openai/tiny", api_base=f"{chat_server}/v1", api_key="unused",
                           messages=user("A record"), max_tokens=BUDGET, temperature=0,
                           response_format=json_format("enums"), extra_body={"top_k": 5})
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMAS["enums"])
