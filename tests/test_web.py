"""The playground page at `/`, in a real browser: Playwright driving the system's Chromium (Debian's
`chromium`; Playwright's own browser download is not used) against `gptforge serve` subprocesses.
What the page shows is read from its data (data attributes and JSON islands), never from pixels,
and checked against the API and the library. Every test also checks that no request left
127.0.0.1 and that the page raised no error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import openai
import pytest
import torch

from gptforge import GPTModel, save
from gptforge.cli import main
from gptforge.config import ClassifierSpec, GPTConfig
from gptforge.instruct import ALPACA
from gptforge.tokenizer import get_tokenizer
from test_serve import free_port, launch, stop_server

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the test extra)")
CHROMIUM = os.environ.get("GPTFORGE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no system Chromium (apt-get install chromium; or set GPTFORGE_CHROMIUM)", allow_module_level=True)

pytestmark = pytest.mark.slow
PROMPT = "Every effort moves you"
# Chromium logs every 4xx/5xx answer to fetch() as a console error; the page shows its own message.
NETWORK_NOISE = "Failed to load resource"


@pytest.fixture(scope="module")
def lm(tiny_config) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(tiny_config(vocab_size=50257, context_length=128, emb_dim=64)).eval()


def serve(path: Path, *options: str) -> tuple[subprocess.Popen, str]:
    """`gptforge serve` on `path` as model "tiny"; its address. Start-up may take minutes on a busy machine."""
    port = free_port()
    cmd = [sys.executable, "-m", "gptforge", "serve", "--model", str(path), "--served-model-name", "tiny",
           "--port", str(port), "--shutdown-grace", "1", *options]
    return launch(cmd, path.parent / f"server-{port}.log", timeout=300), f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def lm_server(lm, tmp_path_factory):
    proc, url = serve(save(lm, tmp_path_factory.mktemp("web") / "tiny"))
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def chat_model() -> GPTModel:
    """A random instruct model, wide enough that a long answer takes seconds (so Stop lands mid-stream)."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50257, context_length=1024, emb_dim=128, n_heads=4, n_layers=4, drop_rate=0.0,
                    prompt_template=ALPACA)
    return GPTModel(cfg).eval()


@pytest.fixture(scope="module")
def chat_server(chat_model, tmp_path_factory):
    proc, url = serve(save(chat_model, tmp_path_factory.mktemp("web-chat") / "instruct"))
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def open_page(browser):
    """open_page(url, **context options) -> a page at `url` whose model card has loaded. At the end:
    every request went to 127.0.0.1 (or data:), and the page logged no error of its own."""
    contexts, requests, errors = [], [], []

    def opener(url: str, wait_ready: bool = True, **options):
        context = browser.new_context(**options)
        context.set_default_timeout(120_000)  # a busy machine
        contexts.append(context)
        context.on("request", lambda r: requests.append(r.url))
        page = context.new_page()
        page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
        page.on("console", lambda m: errors.append(f"console: {m.text}")
                if m.type == "error" and NETWORK_NOISE not in m.text else None)
        page.goto(url)
        if wait_ready:
            page.wait_for_selector("body[data-ready=true]")
        return page

    yield opener
    for context in contexts:
        context.close()
    if not contexts:
        return  # the test ended (skipped) before opening a page
    assert requests, "no request was recorded"
    outside = [u for u in requests if not u.startswith("data:") and urlsplit(u).hostname != "127.0.0.1"]
    assert not outside, f"requests left 127.0.0.1: {outside}"
    assert not errors, errors


def island(page, name: str):
    return json.loads(page.locator(f"#{name}-data").text_content())


def set_sampling(page, temperature="0", max_tokens="12", top_k="0", top_p="1", seed="123"):
    page.get_by_role("spinbutton", name="Temperature").fill(temperature)
    page.get_by_role("spinbutton", name="Max tokens").fill(max_tokens)
    page.get_by_role("spinbutton", name="Top-k").fill(top_k)
    page.get_by_role("spinbutton", name="Top-p").fill(top_p)
    page.get_by_role("spinbutton", name="Seed").fill(seed)


def generated(page) -> dict:
    page.wait_for_function("JSON.parse(document.getElementById('generate-data').textContent).finish_reason")
    return island(page, "generate")


def api(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


# --------------------------------------------------------------------------- Generate

def test_greedy_generate_equals_the_api_and_chips_show_its_top_logprobs(lm_server, open_page):
    page = open_page(lm_server)
    assert page.get_by_role("tab", name="Chat").is_hidden()  # a base model: no chat template
    assert page.get_by_role("tab", name="Classify").is_hidden()
    page.get_by_role("textbox", name="Prompt").fill(PROMPT)
    set_sampling(page, max_tokens="12")
    page.get_by_role("button", name="Generate").click()
    data = generated(page)
    ref = api(lm_server).completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=5)
    choice = ref.choices[0]
    assert data["text"] == choice.text
    assert page.locator("#gen-output").get_attribute("data-text") == choice.text
    chips = page.locator("#gen-output .chip")
    assert chips.count() == len(choice.logprobs.tokens) == 12
    for i in (0, 5, 11):
        chip = chips.nth(i)
        assert chip.get_attribute("data-token") == choice.logprobs.tokens[i]
        assert float(chip.get_attribute("data-logprob")) == pytest.approx(choice.logprobs.token_logprobs[i], abs=1e-6)
        shown = {a["token"]: a["logprob"] for a in json.loads(chip.get_attribute("data-alternatives"))}
        assert shown == pytest.approx(choice.logprobs.top_logprobs[i], abs=1e-6)
    chips.nth(5).hover()
    tooltip = page.get_by_role("tooltip")
    assert tooltip.is_visible()
    items = tooltip.locator("li")
    assert items.count() == len(choice.logprobs.top_logprobs[5])
    best = max(choice.logprobs.top_logprobs[5].items(), key=lambda kv: kv[1])
    assert items.first.get_attribute("data-token") == best[0]


def test_step_shows_the_distribution_whose_argmax_is_the_next_token(lm, lm_server, open_page):
    page = open_page(lm_server)
    page.get_by_role("textbox", name="Prompt").fill(PROMPT)
    set_sampling(page)
    ids = get_tokenizer().encode(PROMPT)
    for step in range(3):
        page.get_by_role("button", name="Step").click()
        page.wait_for_function(f"(JSON.parse(document.getElementById('generate-data').textContent).tokens || []).length == {step + 1}")
        data = island(page, "generate")
        with torch.no_grad():
            probs = lm(torch.tensor([ids]))[0, -1].softmax(-1)  # the library's next-token distribution
        top = probs.topk(20)
        bars = page.locator("#step-chart .bar")
        assert bars.count() == 20
        shown_ids = [int(bars.nth(i).get_attribute("data-token-id")) for i in range(20)]
        shown_probs = [float(bars.nth(i).get_attribute("data-prob")) for i in range(20)]
        assert shown_ids == top.indices.tolist()
        assert shown_probs == pytest.approx(top.values.tolist(), abs=1e-5)
        chosen = page.locator("#step-chart .bar[data-chosen=true]")
        assert int(chosen.get_attribute("data-token-id")) == shown_ids[0] == data["step"]["chosen"]["id"]
        ids.append(shown_ids[0])
    # Three greedy steps are the first three tokens of the greedy completion.
    ref = api(lm_server).completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0)
    assert island(page, "generate")["text"] == ref.choices[0].text


def test_bad_input_shows_a_message(lm_server, open_page):
    page = open_page(lm_server)
    alert = page.get_by_role("alert")
    page.get_by_role("textbox", name="Prompt").fill("")
    page.get_by_role("button", name="Generate").click()
    assert "Prompt box is empty" in alert.text_content() and alert.is_visible()
    page.get_by_role("textbox", name="Prompt").fill("word " * 200)  # the model has 128 positions
    set_sampling(page)
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function("document.getElementById('message').textContent.includes('maximum context length')")
    page.get_by_role("spinbutton", name="Temperature").fill("9")
    page.get_by_role("textbox", name="Prompt").fill(PROMPT)
    page.get_by_role("button", name="Generate").click()
    assert "Temperature must be a number between 0 and 2" in alert.text_content()
    page.get_by_role("tab", name="Inspect").click()
    page.get_by_role("textbox", name="Text to inspect").fill("word " * 300)
    page.get_by_role("button", name="Inspect").click()
    page.wait_for_function("document.getElementById('message').textContent.includes('inspection takes at most')")


# --------------------------------------------------------------------------- Inspect

def test_inspect_heatmap_and_lens_are_the_endpoints_numbers(lm_server, open_page):
    text = "The quick brown fox jumps"
    page = open_page(lm_server)
    page.get_by_role("tab", name="Inspect").click()
    page.get_by_role("textbox", name="Text to inspect").fill(text)
    page.get_by_role("combobox", name="Layer").select_option("0")
    page.get_by_role("button", name="Inspect").click()
    page.wait_for_function("JSON.parse(document.getElementById('inspect-data').textContent).tokens")
    page.get_by_role("combobox", name="Head").select_option("2")
    data = island(page, "inspect")
    ref = httpx.post(f"{lm_server}/v1/inspect", json={"prompt": text, "attention_layers": [0]}).json()
    assert [t["id"] for t in data["tokens"]] == get_tokenizer().encode(text)
    assert [int(x) for x in page.locator("#inspect-tokens li").evaluate_all("els => els.map(e => e.dataset.tokenId)")] \
        == get_tokenizer().encode(text)
    assert (data["layer"], data["head"], data["attention"]["layer"]) == (0, 2, 0)
    assert data["attention"]["heads"][2] == ref["attention"][0]["heads"][2]
    heatmap = page.get_by_role("img", name="Attention weights of layer 0, head 2")
    assert heatmap.get_attribute("data-head") == "2"
    assert page.locator("#heads-grid button").count() == 4  # all heads of the layer
    lens = page.locator("#lens td[data-layer='1'][data-position='3']")
    top = ref["logit_lens"][1]["positions"][3][0]
    assert (int(lens.get_attribute("data-token-id")), float(lens.get_attribute("data-prob"))) == (top["id"], top["prob"])
    # Another layer comes from the endpoint too.
    page.get_by_role("combobox", name="Layer").select_option("1")
    page.wait_for_function("JSON.parse(document.getElementById('inspect-data').textContent).attention.layer == 1")
    ref1 = httpx.post(f"{lm_server}/v1/inspect", json={"prompt": text, "attention_layers": [1]}).json()
    assert island(page, "inspect")["attention"]["heads"] == ref1["attention"][0]["heads"]
    card = page.locator("#card")
    assert "[1, 4] → [1, 4, 64]" in card.text_content() and "[1, 4, 50257]" in card.text_content()


def test_keyboard_alone_and_phone_width(lm_server, open_page):
    page = open_page(lm_server, viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
    page.get_by_role("tab", name="Generate").focus()
    page.keyboard.press("ArrowRight")  # the tabs are one stop; arrows move between them
    assert page.get_by_role("tab", name="Inspect").get_attribute("aria-selected") == "true"
    page.keyboard.press("Tab")
    page.keyboard.press("Control+End")  # into "Text to inspect", at its end
    page.keyboard.type(" again")
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")  # the Inspect button
    page.wait_for_function("JSON.parse(document.getElementById('inspect-data').textContent).tokens")
    assert island(page, "inspect")["prompt"] == "Hello, I am again"
    assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    page.get_by_role("tab", name="Inspect").focus()
    page.keyboard.press("ArrowLeft")
    assert page.get_by_role("textbox", name="Prompt").is_visible()
    page.get_by_role("textbox", name="Prompt").focus()
    page.keyboard.press("Control+Enter")
    generated(page)
    page.locator("#gen-output .chip").first.focus()
    assert page.get_by_role("tooltip").is_visible()  # alternatives on focus, not only on hover
    page.keyboard.press("Escape")
    assert page.get_by_role("tooltip").is_hidden()
    assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")


# --------------------------------------------------------------------------- Chat

def test_chat_streams_and_stop_frees_the_row(chat_server, open_page):
    page = open_page(chat_server)
    page.get_by_role("tab", name="Chat").click()
    set_sampling(page, max_tokens="6")
    page.get_by_role("textbox", name="System prompt").fill("Be brief.")
    page.get_by_role("textbox", name="Message").fill("Name a colour.")
    page.get_by_role("button", name="Send").click()
    page.wait_for_selector(".msg.assistant[data-finish-reason]")
    ref = api(chat_server).chat.completions.create(
        model="tiny", temperature=0, max_tokens=6, seed=123,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}])
    reply = page.locator(".msg.assistant").first
    assert reply.get_attribute("data-text") == ref.choices[0].message.content
    # Its chips carry the chat API's logprobs and top alternatives.
    lp = api(chat_server).chat.completions.create(
        model="tiny", temperature=0, max_tokens=6, seed=123, logprobs=True, top_logprobs=5,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    ).choices[0].logprobs.content
    chips = reply.locator(".chip")
    assert chips.count() == len(lp)
    for chip, ref_token in zip(chips.all(), lp):
        assert chip.get_attribute("data-token") == ref_token.token
        assert float(chip.get_attribute("data-logprob")) == pytest.approx(ref_token.logprob, abs=1e-6)
        shown = [(a["token"], a["logprob"]) for a in json.loads(chip.get_attribute("data-alternatives"))]
        assert shown == [(t.token, pytest.approx(t.logprob, abs=1e-6)) for t in ref_token.top_logprobs]
    # A long answer, stopped after its first tokens: the server frees its row.
    set_sampling(page, max_tokens="900")
    page.get_by_role("textbox", name="Message").fill("Tell me everything.")
    page.get_by_role("button", name="Send").click()
    page.wait_for_function("(document.querySelectorAll('.msg.assistant')[1]?.dataset.text || '').length > 0")
    page.get_by_role("button", name="Stop").click()
    page.wait_for_selector(".msg.assistant[data-finish-reason=stopped]")
    deadline = time.monotonic() + 10
    while (state := httpx.get(f"{chat_server}/health").json())["active"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert state["active"] == 0 and state["waiting"] == 0 and state["cancelled"] >= 1


# --------------------------------------------------------------------------- the server going away

def test_a_server_gone_mid_stream_is_a_message(chat_model, tmp_path, open_page):
    proc, url = serve(save(chat_model, tmp_path / "instruct"))
    try:
        page = open_page(url)
        set_sampling(page, max_tokens="900")
        page.get_by_role("textbox", name="Prompt").fill(PROMPT)
        page.get_by_role("button", name="Generate").click()
        page.wait_for_selector("#gen-output .chip")
        proc.kill()
        page.wait_for_function("document.getElementById('message').textContent.includes('stopped answering')")
        assert page.get_by_role("button", name="Generate").is_enabled()  # ready for another try
    finally:
        stop_server(proc)


# --------------------------------------------------------------------------- Classify, API key

@pytest.fixture(scope="module")
def classifier_path(tiny_config, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = GPTConfig.from_dict(tiny_config(vocab_size=50257, context_length=64)).replace(
        classifier=ClassifierSpec(labels=("ham", "spam")))
    return save(GPTModel(cfg).eval(), tmp_path_factory.mktemp("web-clf") / "clf")


def test_classify_shows_the_labels_of_gptforge_classify(classifier_path, open_page, capsys):
    proc, url = serve(classifier_path)
    try:
        texts = ["Free entry to win 1000 pounds", "See you at lunch?", "URGENT! Call now"]
        page = open_page(url)
        assert page.get_by_role("tab", name="Generate").is_hidden() and page.get_by_role("tab", name="Inspect").is_hidden()
        page.get_by_role("tab", name="Classify").click()
        page.get_by_role("textbox", name="Texts, one per line").fill("\n".join(texts))
        page.get_by_role("button", name="Classify").click()
        page.wait_for_selector(".classified")
        shown = island(page, "classify")
        assert main(["classify", "--json", "--model", str(classifier_path), *texts]) in (None, 0)
        cli = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [r["label"] for r in shown] == [c["label"] for c in cli]
        for row, ref in zip(shown, cli):
            assert row["probs"] == pytest.approx(ref["probabilities"], abs=1e-5)
    finally:
        stop_server(proc)


def test_with_an_api_key_the_page_asks_once_per_tab(lm, tmp_path, open_page):
    proc, url = serve(save(lm, tmp_path / "tiny"), "--api-key", "sesame")
    try:
        page = open_page(url, wait_ready=False)
        key = page.get_by_role("textbox", name="API key")
        key.wait_for()
        assert "API key" in page.get_by_role("alert").text_content()
        key.fill("wrong")
        page.get_by_role("button", name="Use key").click()
        key.wait_for()  # asked again
        key.fill("sesame")
        page.get_by_role("button", name="Use key").click()
        page.wait_for_selector("body[data-ready=true]")
        page.get_by_role("textbox", name="Prompt").fill(PROMPT)
        set_sampling(page)
        page.get_by_role("button", name="Generate").click()
        ref = openai.OpenAI(base_url=f"{url}/v1", api_key="sesame", max_retries=0).completions.create(
            model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
        assert generated(page)["text"] == ref.choices[0].text
        assert page.evaluate("sessionStorage.getItem('gptforge-api-key')") == "sesame"  # this tab only
        assert page.evaluate("localStorage.length") == 0
    finally:
        stop_server(proc)
