"""Screenshots of the playground page's views for docs/ui.md and the README, taken in the system's
Chromium through Playwright against real `gptforge serve` processes, and the page's weight (bytes
transferred on first load). Writes docs/img/ui-*.png.

    python docs/screenshots.py            # needs `pip install playwright` and Debian's chromium

Models: the built-in Shakespeare model for Generate, Step and Inspect; the same weights given the
Alpaca chat template (not trained for chat: the answer is Shakespeare-like) for Chat; the same
weights with a two-label head (untrained) for Classify.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMG = ROOT / "docs" / "img"
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

import gptforge  # noqa: E402
from gptforge.config import ClassifierSpec  # noqa: E402
from gptforge.instruct import ALPACA  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model: str, name: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gptforge", "serve", "--model", model, "--served-model-name", name,
                             "--port", str(port), "--shutdown-grace", "1"],
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.25)
    proc.kill()
    raise RuntimeError(f"server for {model} did not start")


def has_classify(url: str) -> bool:
    request = urllib.request.Request(url + "/classify", data=b"{}", headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(request, timeout=10)
    except urllib.error.HTTPError as err:
        return err.code != 404
    return True


def main() -> None:
    IMG.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp())
    base = gptforge.load("gptforge-shakespeare")
    torch.manual_seed(0)
    clf = gptforge.GPTModel(base.cfg.replace(classifier=ClassifierSpec(labels=("comedy", "tragedy")), tie_weights=False))
    clf.load_state_dict({k: v for k, v in base.state_dict().items() if not k.startswith("out_head")}, strict=False)
    clf_path = gptforge.save(clf, tmp / "clf")
    base.cfg = base.cfg.replace(prompt_template=ALPACA)
    chat = gptforge.save(base, tmp / "chat")
    servers = [serve("gptforge-shakespeare", "gptforge-shakespeare"), serve(str(chat), "shakespeare-chat")]
    try:
        clf_server = serve(str(clf_path), "shakespeare-classifier")
        servers.append(clf_server)
    except RuntimeError:
        clf_server = None
    try:
        shoot(servers, clf_server)
    finally:  # also when a step fails: no server left running
        for proc, _ in servers:
            proc.terminate()
            proc.wait()
        shutil.rmtree(tmp)
    print("wrote", ", ".join(sorted(str(p.relative_to(ROOT)) for p in IMG.glob("ui-*.png"))))


def shoot(servers: list[tuple[subprocess.Popen, str]], clf_server: tuple[subprocess.Popen, str] | None) -> None:
    chromium = os.environ.get("GPTFORGE_CHROMIUM") or shutil.which("chromium")
    (_, lm_url), (_, chat_url) = servers[:2]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1000, "height": 760})
        page.set_default_timeout(180_000)  # a busy machine
        page.on("console", lambda m: print("console:", m.text) if m.type == "error" else None)
        responses = []
        page.on("requestfinished", lambda r: responses.append(r))
        page.goto(lm_url)
        page.wait_for_selector("body[data-ready=true]")
        sizes = [(r.url, r.sizes()) for r in responses]
        static = sum(s["responseBodySize"] + s["responseHeadersSize"] for u, s in sizes if "/v1/" not in u)
        total = sum(s["responseBodySize"] + s["responseHeadersSize"] for _, s in sizes)
        print(f"page weight on first load: {static:,} bytes in {sum('/v1/' not in u for u, _ in sizes)} files "
              f"(HTML, CSS, JS with headers); {total:,} bytes with the model list and model card")

        page.get_by_role("textbox", name="Prompt").fill("ROMEO:\nBut soft, what light")
        page.get_by_role("spinbutton", name="Temperature").fill("0.8")
        page.get_by_role("spinbutton", name="Max tokens").fill("40")
        page.get_by_role("button", name="Generate").click()
        page.wait_for_function("JSON.parse(document.getElementById('generate-data').textContent).finish_reason")
        page.locator("#gen-output .chip").nth(6).hover()
        page.screenshot(path=IMG / "ui-generate.png")

        page.get_by_role("textbox", name="Prompt").fill("JULIET:\nO Romeo, Romeo")
        for step in range(4):
            page.get_by_role("button", name="Step").click()
            page.wait_for_function(f"JSON.parse(document.getElementById('generate-data').textContent).tokens.length == {step + 1}")
        page.locator("#step-figure").scroll_into_view_if_needed()
        page.screenshot(path=IMG / "ui-step.png", full_page=True)

        page.get_by_role("tab", name="Inspect").click()
        page.get_by_role("textbox", name="Text to inspect").fill("ROMEO:\nWhat light through yonder window breaks?")
        page.get_by_role("button", name="Inspect").click()
        page.wait_for_function("JSON.parse(document.getElementById('inspect-data').textContent).tokens")
        page.get_by_role("button", name="Head 1").click()
        page.screenshot(path=IMG / "ui-inspect.png", full_page=True)

        page.goto(chat_url)
        page.wait_for_selector("body[data-ready=true]")
        page.get_by_role("tab", name="Chat").click()
        page.get_by_role("spinbutton", name="Temperature").fill("0.7")
        page.get_by_role("spinbutton", name="Max tokens").fill("40")
        page.get_by_role("textbox", name="System prompt").fill("Answer as a player would.")
        page.get_by_role("textbox", name="Message").fill("Who are you?")
        page.get_by_role("button", name="Send").click()
        page.wait_for_selector(".msg.assistant[data-finish-reason]")
        page.screenshot(path=IMG / "ui-chat.png")

        if clf_server is not None and has_classify(clf_server[1]):
            page.goto(clf_server[1])
            page.wait_for_selector("body[data-ready=true]")
            page.get_by_role("textbox", name="Texts, one per line").fill(
                "Come, let us laugh and dance till dawn.\nThe king is dead; the kingdom weeps.")
            page.get_by_role("button", name="Classify").click()
            page.wait_for_selector(".classified")
            page.screenshot(path=IMG / "ui-classify.png")
        else:
            print("no Classify screenshot: this server has no POST /classify")

        page = browser.new_page(viewport={"width": 390, "height": 760}, is_mobile=True)
        page.set_default_timeout(180_000)
        page.goto(lm_url)
        page.wait_for_selector("body[data-ready=true]")
        page.get_by_role("button", name="Generate").click()
        page.wait_for_function("JSON.parse(document.getElementById('generate-data').textContent).finish_reason")
        page.screenshot(path=IMG / "ui-phone.png")
        browser.close()


if __name__ == "__main__":
    main()
