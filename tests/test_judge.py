"""`gptforge judge` against a fake OpenAI-compatible chat server: the book's prompt exactly (taken
from the book's own `generate_model_scores`), the mean, the scores file, and the failures (a reply
that is not a number, an unreachable endpoint, a timeout) as one line and exit 2, scores kept."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gptforge.cli import main
from gptforge.judge import parse_score

ch07 = pytest.importorskip("llms_from_scratch.ch07")

RECORDS = [
    {"instruction": "Name the capital of France.", "input": "", "output": "Paris.", "model_response": "Paris."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "model_response": "6"},
    {"instruction": "Give a synonym for 'fast'.", "input": "", "output": "Quick.", "model_response": "Rapid."},
]


class FakeJudge:
    """An OpenAI-compatible /v1/chat/completions answering `replies` in turn (after `delay` s). A reply
    is the message's content (a string), or a raw body as (bytes, content type). At request
    `interrupt_at` it interrupts the main thread as Ctrl-C does, and holds that reply until closed,
    so the judge cannot finish first however loaded the machine is."""

    def __init__(self, replies, delay=0.0, interrupt_at=None):
        self.replies, self.delay, self.requests = list(replies), delay, []
        self.released = threading.Event()
        judge, main_thread = self, threading.main_thread().ident

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                judge.requests.append((self.path, body))
                if len(judge.requests) == interrupt_at:  # the user presses Ctrl-C while this request waits
                    signal.pthread_kill(main_thread, signal.SIGINT)
                    judge.released.wait(60)
                    return
                time.sleep(judge.delay)
                reply = judge.replies[min(len(judge.requests), len(judge.replies)) - 1]
                data, kind = reply if isinstance(reply, tuple) else (json.dumps(
                    {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": reply}}]}).encode(), "application/json")
                try:
                    self.send_response(200)
                    self.send_header("content-type", kind)
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except BrokenPipeError:
                    pass  # the client gave up (the timeout test)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "responses.json"
    path.write_text(json.dumps(RECORDS))
    return path


def book_prompts():
    prompts = []
    original = ch07.query_model
    ch07.query_model = lambda prompt, model="llama3", url=None: prompts.append(prompt) or "0"
    try:
        ch07.generate_model_scores(RECORDS, "model_response")
    finally:
        ch07.query_model = original
    return prompts


def test_scores_with_the_books_prompt(data, capsys):
    fake = FakeJudge(["90", " 20\n", "70."])
    try:
        assert main(["judge", "--data", str(data), "--url", fake.url, "--model", "llama3"]) == 0
    finally:
        fake.close()
    assert [r[0] for r in fake.requests] == ["/v1/chat/completions"] * 3
    assert [r[1]["messages"] for r in fake.requests] == [[{"role": "user", "content": p}] for p in book_prompts()]
    assert all(r[1]["temperature"] == 0 and r[1]["seed"] == 123 and r[1]["model"] == "llama3" for r in fake.requests)
    assert "mean score 60.00 over 3 responses" in capsys.readouterr().out
    lines = [json.loads(l) for l in (data.parent / "responses-scores.jsonl").read_text().splitlines()]
    assert [l["score"] for l in lines] == [90, 20, 70]


def test_a_reply_that_is_not_a_number_stops_and_keeps_the_scores(data, tmp_path, capsys):
    fake = FakeJudge(["80", "I would say eighty", "50"])
    out = tmp_path / "s.jsonl"
    try:
        assert main(["judge", "--data", str(data), "--url", fake.url, "--model", "m", "--out", str(out)]) == 2
    finally:
        fake.close()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "record 2 is not an integer 0-100" in err
    assert [json.loads(l)["score"] for l in out.read_text().splitlines()] == [80]


def test_skip_invalid_goes_on_as_the_book_does(data, tmp_path, capsys):
    fake = FakeJudge(["80", "eighty", "50"])
    try:
        assert main(["judge", "--data", str(data), "--url", fake.url, "--model", "m", "--skip-invalid",
                     "--out", str(tmp_path / "s.jsonl")]) == 0
    finally:
        fake.close()
    assert "mean score 65.00 over 2 responses (1 replies were not numbers)" in capsys.readouterr().out


def test_unreachable_endpoint_is_one_line(data, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    assert main(["judge", "--data", str(data), "--url", f"http://127.0.0.1:{port}/v1", "--model", "m"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot reach the judge" in err and "0 scores so far" in err


def test_timeout_is_one_line(data, capsys):
    fake = FakeJudge(["80"], delay=3.0)
    try:
        assert main(["judge", "--data", str(data), "--url", fake.url, "--model", "m", "--timeout", "0.5"]) == 2
    finally:
        fake.close()
    assert "did not answer in time" in capsys.readouterr().err


def test_a_bad_url_or_out_is_one_line_and_keeps_the_users_files(data, tmp_path, capsys):
    """A URL that is not http(s), an --out that is a folder or a file other than scores: refused
    before any request, the file untouched. A rerun that fails before its first reply leaves the
    last run's scores file as it was (it used to be emptied at once)."""
    run = ["judge", "--data", str(data), "--model", "m"]
    for url in ("notaurl", "ftp://host/v1"):
        assert main(run + ["--url", url]) == 2
        assert "is not an http:// or https:// URL" in capsys.readouterr().err
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    for out, message in ((notes, "notes.txt exists and is not a judge scores file"), (data, "not a judge scores"),
                         (tmp_path, "is a folder"), (notes / "s.jsonl", "notes.txt is a file, not a folder")):
        assert main(run + ["--url", "http://127.0.0.1:9/v1", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert notes.read_text() == "mine\n" and json.loads(data.read_text()) == RECORDS
    scores = tmp_path / "s.jsonl"
    fake = FakeJudge(["80"])
    try:
        assert main(run + ["--url", fake.url, "--out", str(scores)]) == 0
    finally:
        fake.close()
    before = scores.read_text()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there
    assert main(run + ["--url", f"http://127.0.0.1:{port}/v1", "--out", str(scores)]) == 2
    assert "left as it was" in capsys.readouterr().err
    assert scores.read_text() == before


def test_records_without_responses_are_refused(tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}]))
    assert main(["judge", "--data", str(path), "--url", "http://127.0.0.1:9/v1", "--model", "m"]) == 2
    assert "no 'model_response'" in capsys.readouterr().err


@pytest.mark.parametrize("reply, score", [("85", 85), (" 100\n", 100), ("7.", 7), ("101", None), ("85 points", None),
                                          ("", None), ("-3", None)])
def test_parse_score(reply, score):
    assert parse_score(reply) == score


def test_ctrl_c_keeps_the_scores_so_far_and_says_where(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # a terminal: the bar over the records
    fake = FakeJudge(["80", "60", "50"], interrupt_at=2)
    out = tmp_path / "s.jsonl"
    try:  # --timeout: were the interrupt lost, the held request fails the test instead of hanging it
        assert main(["judge", "--data", str(data), "--url", fake.url, "--model", "m", "--out", str(out),
                     "--timeout", "30"]) == 130
    finally:
        fake.close()
    err = capsys.readouterr().err
    assert "1/3" in err and "Traceback" not in err
    assert err.splitlines()[-1] == f"gptforge: interrupted; 1 scores so far are in {out}"
    assert [json.loads(l)["score"] for l in out.read_text().splitlines()] == [80]
    assert not (tmp_path / "s.jsonl.partial").exists()


def test_a_rerun_that_ends_early_keeps_the_earlier_complete_scores(data, tmp_path, capsys):
    """A complete scores file is replaced only by another complete one: a rerun stopped at record 2
    leaves it whole and says where its own scores are."""
    out = tmp_path / "s.jsonl"
    run = ["judge", "--data", str(data), "--model", "m", "--out", str(out)]
    fake = FakeJudge(["90", "20", "70"])
    try:
        assert main(run + ["--url", fake.url]) == 0
    finally:
        fake.close()
    complete = out.read_text()
    fake = FakeJudge(["40", "not a number"])
    try:
        assert main(run + ["--url", fake.url]) == 2
    finally:
        fake.close()
    err = capsys.readouterr().err
    assert out.read_text() == complete
    partial = tmp_path / "s.jsonl.partial"
    assert f"1 scores so far are in {partial} ({out}, an earlier run's, is left as it was)" in err
    assert [json.loads(l)["score"] for l in partial.read_text().splitlines()] == [40]
    fake = FakeJudge(["10", "20", "30"])  # a rerun that ends replaces both
    try:
        assert main(run + ["--url", fake.url]) == 0
    finally:
        fake.close()
    assert [json.loads(l)["score"] for l in out.read_text().splitlines()] == [10, 20, 30]
    assert not partial.exists()


def _body(value):
    return json.dumps(value).encode(), "application/json"


MALFORMED = {
    "no choices": (_body({"id": "x", "object": "chat.completion", "choices": []}), "has no choices"),
    "null choices": (_body({"id": "x", "object": "chat.completion", "choices": None}), "has no choices"),
    "no message": (_body({"id": "x", "choices": [{"index": 0, "finish_reason": "stop"}]}), "has no message"),
    "null message": (_body({"id": "x", "choices": [{"index": 0, "message": None}]}), "has no message"),
    "number content": (_body({"id": "x", "choices": [{"index": 0, "message": {"role": "assistant", "content": 85}}]}),
                       "content is not text but int 85"),
    "html page": ((b"<html><body>Welcome to nginx!</body></html>", "text/html"),
                  "not a chat completion but '<html><body>Welcome to nginx!</body></html>'"),
    "a JSON list": (_body([1, 2]), "has no choices"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_reply_is_a_failure_of_its_record_with_the_reason(case, data, tmp_path, capsys):
    """A 200 answer that is not a chat completion with a text message stops the run at that record
    in one line saying what was wrong, scores kept; with --skip-invalid it is that record's null
    score (its reason in the file) and the run goes on."""
    body, reason = MALFORMED[case]
    out = tmp_path / "s.jsonl"
    run = ["judge", "--data", str(data), "--model", "m", "--out", str(out)]
    fake = FakeJudge(["80", body, "50"])
    try:
        assert main(run + ["--url", fake.url]) == 2
    finally:
        fake.close()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "record 2 is malformed" in err and reason in err and "Traceback" not in err, err
    assert [json.loads(l)["score"] for l in out.read_text().splitlines()] == [80]
    fake = FakeJudge(["80", body, "50"])
    try:
        assert main(run + ["--url", fake.url, "--skip-invalid"]) == 0
    finally:
        fake.close()
    assert "mean score 65.00 over 2 responses (1 replies were not numbers)" in capsys.readouterr().out
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert [l["score"] for l in lines] == [80, None, 50] and reason in lines[1]["error"]
