"""Looking inside a forward pass: attention weights against transformers' GPT-2
(`output_attentions=True` on gptforge's Hugging Face export), the logit lens against the model's own
next-token distribution and transformers' hidden states, the model card's counts, and the
`POST /v1/inspect` endpoint's answers and refusals."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from gen_helpers import hf_twin
from gptforge import GPTModel, generate
from gptforge.config import ClassifierSpec, GPTConfig
from gptforge.inspection import logit_lens, model_card, parameter_counts, trace
from gptforge.model import count_parameters
from gptforge.playground import MAX_INSPECT_TOKENS
from gptforge.fast import prepare_for_inference
from gptforge.scheduler import BatchScheduler
from gptforge.serve import ServeSettings, create_app
from gptforge.tokenizer import get_tokenizer

TEXT = "The quick brown fox jumps over the lazy dog, and then"


@pytest.fixture(scope="module")
def model(tiny_config) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(tiny_config(vocab_size=50257, context_length=300, emb_dim=64, n_layers=3)).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.tensor([get_tokenizer().encode(TEXT)])


@pytest.fixture(scope="module")
def http(model):
    app = create_app(BatchScheduler(model, get_tokenizer()), ServeSettings(model_name="tiny"))
    with TestClient(app) as client:
        yield client


def test_attention_equals_transformers_output_attentions(model, ids):
    hf = hf_twin(model, attn_implementation="eager")
    with torch.no_grad():
        ref = hf(ids, output_attentions=True).attentions  # n_layers x (1, nh, T, T)
    got = trace(model, ids).attention
    assert sorted(got) == list(range(model.cfg.n_layers))
    for layer, weights in got.items():
        torch.testing.assert_close(weights, ref[layer][0], atol=1e-4, rtol=0)


def test_logit_lens_last_layer_is_the_models_next_token_distribution(model, ids):
    run = trace(model, ids, attention_layers=())
    assert run.attention == {}
    with torch.no_grad():
        probs = model(ids)[0].softmax(-1)  # (T, V), the model's own forward
    lens_probs, lens_ids = logit_lens(model, run.hidden, 5)
    assert lens_probs.shape == (model.cfg.n_layers, ids.shape[1], 5)
    ref = probs.topk(5, dim=-1)
    torch.testing.assert_close(lens_probs[-1], ref.values, atol=1e-5, rtol=0)
    assert torch.equal(lens_ids[-1], ref.indices)


def test_logit_lens_middle_layers_read_transformers_hidden_states(model, ids):
    hf = hf_twin(model)
    with torch.no_grad():
        hidden = hf(ids, output_hidden_states=True).hidden_states  # embeddings, then after each block
        run = trace(model, ids)
        probs, top = logit_lens(model, run.hidden, 3)
        for layer in range(model.cfg.n_layers - 1):  # the last of hidden_states has ln_f applied already
            ref = hf.lm_head(hf.transformer.ln_f(hidden[layer + 1]))[0].softmax(-1).topk(3, dim=-1)
            torch.testing.assert_close(probs[layer], ref.values, atol=1e-5, rtol=0)
            assert torch.equal(top[layer], ref.indices)


def test_trace_of_a_model_prepared_for_inference_equals_its_forward(tiny_config, ids):
    torch.manual_seed(1)
    model = prepare_for_inference(GPTModel(tiny_config(vocab_size=50257, context_length=64, emb_dim=64)), "auto", "int8")
    assert model.trf_blocks[0].att.fused_qkv is not None  # query, key and value from one projection
    with torch.no_grad():
        ref = model(ids)[0]
    torch.testing.assert_close(trace(model, ids, ()).logits, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("qkv_bias", "tied", "untied"), [
    (False, 124_412_160, 163_009_536),  # the book's GPT_CONFIG_124M: its two printed totals
    (True, 124_439_808, 163_037_184),  # GPT-2 124M as OpenAI shipped it (tied, with qkv biases)
])
def test_parameter_counts_tied_and_untied_are_the_known_gpt2_figures(qkv_bias, tied, untied):
    cfg = GPTConfig(vocab_size=50257, context_length=1024, emb_dim=768, n_heads=12, n_layers=12, qkv_bias=qkv_bias)
    counts = parameter_counts(cfg)
    assert (counts["tied"]["total"], counts["untied"]["total"]) == (tied, untied)
    assert counts["untied"]["output_head"] == 50257 * 768 and counts["tied"]["output_head"] == 0
    parts = ("token_embedding", "position_embedding", "attention", "feed_forward", "layer_norms", "output_head")
    for kind in ("tied", "untied"):
        assert sum(counts[kind][p] for p in parts) == counts[kind]["total"]


def test_model_card_counts_and_shapes_follow_the_model(model):
    card = model_card(model, "tiny", get_tokenizer())
    assert card["parameters"] == sum(p.numel() for p in model.parameters())
    untied = model.cfg.tie_weights is False
    assert card["parameter_counts"]["untied" if untied else "tied"]["total"] == card["parameters"]
    assert card["kind"] == "language_model" and card["chat"] is False and card["config"]["n_layers"] == 3
    shapes = [s["shape"] for s in card["shapes"]]
    assert shapes[0] == [1, 4] and shapes[-1] == [1, 4, 50257]  # "Hello, I am" is 4 tokens
    assert [1, 4, 64] in shapes and [1, 4, 4, 4] in shapes  # width 64; 4 heads attending over 4 positions


def test_model_card_of_a_classifier_names_its_labels(tiny_config):
    torch.manual_seed(0)
    cfg = GPTConfig.from_dict(tiny_config(vocab_size=50257)).replace(classifier=ClassifierSpec(labels=("ham", "spam")))
    card = model_card(GPTModel(cfg).eval(), "clf", get_tokenizer())
    assert card["kind"] == "classifier" and card["labels"] == ["ham", "spam"]
    assert card["shapes"][-1]["shape"] == [1, 4, 2]
    assert card["parameter_counts"]["tied"]["output_head"] == count_parameters(cfg).head == 2 * (32 + 1)


# --------------------------------------------------------------------------- the endpoint

def test_inspect_endpoint_answers_tokens_attention_and_lens(http, model, ids):
    r = http.post("/v1/inspect", json={"model": "tiny", "prompt": TEXT, "attention_layers": [1], "logit_lens_top_k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [t["id"] for t in body["tokens"]] == ids[0].tolist()
    assert "".join(t["text"] for t in body["tokens"]) == TEXT
    hf = hf_twin(model, attn_implementation="eager")
    with torch.no_grad():
        ref = hf(ids, output_attentions=True).attentions[1][0]
        probs = model(ids)[0].softmax(-1).topk(3, dim=-1)
    assert [a["layer"] for a in body["attention"]] == [1]
    torch.testing.assert_close(torch.tensor(body["attention"][0]["heads"]), ref, atol=1e-4, rtol=0)
    last = body["logit_lens"][-1]
    assert last["layer"] == model.cfg.n_layers - 1
    assert [[e["id"] for e in pos] for pos in last["positions"]] == probs.indices.tolist()
    torch.testing.assert_close(torch.tensor([[e["prob"] for e in pos] for pos in last["positions"]]),
                               probs.values, atol=1e-5, rtol=0)


def test_next_token_is_what_generation_picks(http, model, ids):
    greedy = http.post("/v1/inspect", json={"prompt": ids[0].tolist(), "attention_layers": [], "logit_lens_top_k": 0,
                                            "next_token": {"temperature": 0}}).json()["next_token"]
    expected = generate(model, ids, 1)[0, -1].item()
    assert greedy["chosen"]["id"] == expected == greedy["top"][0]["id"] and len(greedy["top"]) == 20
    # Sampling with a seed: the first token of a completion with that seed, after top-k 5.
    options = {"temperature": 1.5, "top_k": 5, "seed": 7}
    sampled = http.post("/v1/inspect", json={"prompt": TEXT, "attention_layers": [], "logit_lens_top_k": 0,
                                             "next_token": options}).json()["next_token"]
    completion = http.post("/v1/completions", json={"model": "tiny", "prompt": TEXT, "max_tokens": 1, **options,
                                                    "logprobs": 1}).json()
    assert len(sampled["top"]) == 5  # top-k leaves five candidates
    assert completion["choices"][0]["logprobs"]["tokens"][0] == sampled["chosen"]["text"]
    assert sampled["chosen"]["id"] in [t["id"] for t in sampled["top"]]
    assert abs(sum(t["prob"] for t in sampled["top"]) - 1) < 1e-5


def test_model_card_endpoint(http):
    card = http.get("/v1/model_card").json()
    assert card["id"] == "tiny" and card["inspect_max_tokens"] == min(MAX_INSPECT_TOKENS, 300)


@pytest.mark.parametrize(("body", "status", "words"), [
    ({"prompt": ""}, 400, "the prompt is empty"),
    ({"prompt": "word " * (MAX_INSPECT_TOKENS + 1)}, 400, f"inspection takes at most {MAX_INSPECT_TOKENS}"),
    ({"prompt": "hi", "attention_layers": [3]}, 400, "attention_layers [3] are not layers of this model (0 to 2)"),
    ({"prompt": [50257]}, 400, "outside the vocabulary"),
    ({"prompt": "hi", "logit_lens_top_k": 21}, 400, "logit_lens_top_k"),
    ({"prompt": "hi", "model": "other"}, 404, "does not exist"),
    ({"prompt": "hi", "colour": 1}, 400, "unrecognized request argument supplied: colour"),
])
def test_inspect_refuses_bad_requests_in_openais_shape(http, body, status, words):
    r = http.post("/v1/inspect", json=body)
    assert r.status_code == status
    assert words in r.json()["error"]["message"]


def test_the_page_and_its_files_are_served(http):
    page = http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/static/app.js">' in page.text
    script = http.get("/static/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert http.get("/static/nothing.js").status_code == 404


def test_completions_take_vllms_top_k(http, model, ids):
    """top_k (vLLM's extension, which the page's Top-k control sends): top_k=1 samples the argmax."""
    body = {"model": "tiny", "prompt": TEXT, "max_tokens": 6, "temperature": 2.0, "seed": 3}
    greedy = generate(model, ids, 6)[0, ids.shape[1]:].tolist()
    one = http.post("/v1/completions", json={**body, "top_k": 1}).json()["choices"][0]["text"]
    assert one == get_tokenizer().decode(greedy)
    off = [http.post("/v1/completions", json={**body, "top_k": k}).json()["choices"][0]["text"] for k in (0, -1)]
    assert off[0] == off[1] == http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert http.post("/v1/completions", json={**body, "top_k": -2}).status_code == 400
