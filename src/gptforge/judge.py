"""Scoring responses with a judge model, the book's way (llms-from-scratch, chapter 7): each record's
response is scored 0-100 by a larger model, asked with the book's prompt, through any
OpenAI-compatible chat endpoint (Ollama, vLLM, OpenAI, or `gptforge serve` itself).

Scores are written as they arrive, one JSON line per record, beside the scores file (OUT.partial),
which they replace when the run ends: a run that stops (an unreachable endpoint, a timeout, a reply
that is not a number) keeps the scores it has and never destroys an earlier run's complete file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import GptforgeError
from .io import ensure_dir
from .instruct import RESPONSE_KEY, format_input
from .metrics import progress_bar

BOOK_SEED = 123  # the book's query_model options: seed 123, temperature 0


def judge_prompt(entry: Mapping[str, str], key: str = RESPONSE_KEY) -> str:
    """The book's `generate_model_scores` prompt for one record."""
    return (
        f"Given the input `{format_input(entry)}` "
        f"and correct output `{entry['output']}`, "
        f"score the model response `{entry[key]}`"
        f" on a scale from 0 to 100, where 100 is the best score. "
        f"Respond with the integer number only."
    )


def parse_score(reply: str) -> int | None:
    """The integer a judge replied (surrounding whitespace and a final period allowed, as in
    "85."), or None when the reply is not one integer in [0, 100]."""
    match = re.fullmatch(r"\s*(\d{1,3})\.?\s*", reply or "")
    if match is None or int(match.group(1)) > 100:
        return None
    return int(match.group(1))


@dataclasses.dataclass
class JudgeResult:
    """scores: one per record judged (None where a reply was skipped as not a number)."""

    scores: list[int | None]
    path: Path

    @property
    def mean(self) -> float | None:
        valid = [s for s in self.scores if s is not None]
        return sum(valid) / len(valid) if valid else None


def default_scores_path(data: str | Path) -> Path:
    """Where scores go by default: beside the data, `responses.json` -> `responses-scores.jsonl`."""
    data = Path(data)
    return data.with_name(f"{data.stem}-scores.jsonl")


def _check_keys(records: Sequence[Mapping[str, Any]], key: str, source: str) -> None:
    for n, rec in enumerate(records, 1):
        missing = [k for k in ("instruction", "output", key) if not isinstance(rec.get(k), str)]
        if missing:
            raise GptforgeError(f"{source} record {n} has no {missing[0]!r} string; judge needs records with "
                                f"'instruction', 'output' and the response under {key!r} (--key)")


def _check_url(url: str) -> None:
    from urllib.parse import urlparse

    parts = urlparse(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise GptforgeError(f"--url {url!r} is not an http:// or https:// URL; give the endpoint's base URL, "
                            "e.g. http://127.0.0.1:11434/v1")


def _check_out(out: Path) -> None:
    """The scores file may replace an earlier scores file, never anything else the user has."""
    if out.is_dir():
        raise GptforgeError(f"--out {out} is a folder; give a file name, e.g. {out / 'scores.jsonl'}")
    if out.is_file() and out.stat().st_size > 0:
        with open(out, "rb") as f:
            first = f.readline()
        try:
            record = json.loads(first)
        except ValueError:
            record = None
        if not (isinstance(record, dict) and {"index", "score"} <= set(record)):
            raise GptforgeError(f"{out} exists and is not a judge scores file; refusing to overwrite it: "
                                "choose another --out")
    ensure_dir(out.parent)


def _client(url: str, timeout: float, api_key: str | None) -> Any:
    import openai

    # Local servers ignore the key; OpenAI itself reads it from the environment as usual.
    key = api_key or os.environ.get("OPENAI_API_KEY") or "unused"
    return openai.OpenAI(base_url=url, api_key=key, timeout=timeout, max_retries=0)


def _ask(client: Any, model: str, prompt: str, max_tokens: int | None, url: str) -> str:
    """One chat request; the endpoint's failures become one-line GptforgeErrors."""
    import openai

    options: dict[str, Any] = {"temperature": 0, "seed": BOOK_SEED}
    if max_tokens is not None:
        options["max_tokens"] = max_tokens
    try:
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                               **options)
    except openai.APITimeoutError:
        raise GptforgeError(f"the judge at {url} did not answer in time (raise --timeout)") from None
    except openai.APIConnectionError:
        raise GptforgeError(f"cannot reach the judge at {url} (is the server running? the URL ends "
                            f"in /v1)") from None
    except openai.APIStatusError as err:
        raise GptforgeError(f"the judge at {url} answered HTTP {err.status_code}: {_message(err)}") from None
    return reply_text(reply)


class MalformedReply(ValueError):
    """A 200 answer that is not a chat completion with one text message (the reason is the message)."""


def reply_text(reply: Any) -> str:
    """The text of a chat completion's first choice; MalformedReply saying what is missing when
    the endpoint answered something else (no choices, no message, content that is not text, an HTML
    page: the OpenAI client hands such a body back as a string)."""
    if isinstance(reply, (str, bytes)):
        text = reply.decode(errors="replace") if isinstance(reply, bytes) else reply
        raise MalformedReply(f"the reply is not a chat completion but {_snippet(text)}")
    choices = getattr(reply, "choices", None)
    if not isinstance(choices, list) or not choices:
        raise MalformedReply(f"the reply has no choices (choices: {_snippet(choices)})")
    message = getattr(choices[0], "message", None)
    if isinstance(message, dict):  # the client builds models without validating what the server sent
        content = message.get("content")
    elif message is None:
        raise MalformedReply("the reply's first choice has no message")
    else:
        content = getattr(message, "content", None)
    if content is None:
        return ""  # an empty message: not a number, as the book counts it
    if not isinstance(content, str):
        raise MalformedReply(f"the reply's message content is not text but {type(content).__name__} "
                             f"{_snippet(content)}")
    return content


def _snippet(value: Any) -> str:
    """A short one-line view of what the judge sent: a string quoted, anything else as JSON."""
    text = " ".join((value if isinstance(value, str) else json.dumps(value, default=repr)).split())
    text = text[:60] + ("..." if len(text) > 60 else "")
    return repr(text) if isinstance(value, str) else text


def _message(err: Any) -> str:
    body = err.body if isinstance(getattr(err, "body", None), dict) else {}
    inner = body.get("error", body) if isinstance(body.get("error", body), dict) else body
    return str(inner.get("message") or err.message)


def partial_path(out: str | Path) -> Path:
    """Where a run writes its scores until it ends: OUT.partial beside OUT."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def judge(records: Sequence[Mapping[str, Any]], *, url: str, model: str, out: str | Path,
          key: str = RESPONSE_KEY, timeout: float = 60.0, max_tokens: int | None = None,
          skip_invalid: bool = False, api_key: str | None = None, source: str = "data",
          on_score: Callable[[int, int | None, str], None] | None = None, progress: bool = False) -> JudgeResult:
    """Score each record's response (`key`) 0-100 with `model` behind the OpenAI-compatible `url`
    (e.g. http://127.0.0.1:8000/v1), asking with the book's prompt, temperature 0 and seed 123.

    out: a JSONL file, one `{"index", "score", "reply"}` line per record (and `"error"` where the
        reply was malformed). Scores are written as they arrive to OUT.partial, which replaces `out`
        when the run ends; a run that ends early moves them into `out` unless `out` holds an
        earlier run's scores, which are then left as they were (the new ones stay in OUT.partial).
    skip_invalid: a reply that is not an integer 0-100 (or not a chat completion at all) gets score
        None and the run goes on (the book prints it and continues); otherwise it stops the run with
        a GptforgeError saying why.
    progress: a bar over the records on stderr.
    Raises GptforgeError on an unreachable endpoint, a timeout or an HTTP error; the scores
    written before it are kept (see `out`), as on Ctrl-C (a KeyboardInterrupt saying where they are).
    """
    _check_keys(records, key, source)
    _check_url(url)
    out = Path(out)
    _check_out(out)
    partial = partial_path(out)
    client = _client(url, timeout, api_key)
    scores: list[int | None] = []
    f = None  # opened at the first reply: a run that fails at once leaves no file behind
    bar = progress_bar(progress, len(records), 0, unit="record")

    def kept() -> str:
        """Ends the run early: where its scores so far are, and what became of `out`."""
        if f is not None:
            f.close()
        if not scores or f is None:
            partial.unlink(missing_ok=True)
            return f"{len(scores)} scores so far written ({out} is left as it was)"
        if out.is_file() and out.stat().st_size > 0:  # an earlier run's scores: never replaced by fewer
            return f"{len(scores)} scores so far are in {partial} ({out}, an earlier run's, is left as it was)"
        os.replace(partial, out)
        return f"{len(scores)} scores so far are in {out}"

    try:
        for index, rec in enumerate(records):
            error = None
            try:
                reply = _ask(client, model, judge_prompt(rec, key), max_tokens, url)
            except GptforgeError as err:
                raise GptforgeError(f"{err}; {kept()}") from None
            except MalformedReply as err:
                reply, error = None, str(err)
            if f is None:
                try:
                    f = open(partial, "w", encoding="utf-8")
                except OSError as err:
                    raise GptforgeError(f"cannot write the scores to {partial} ({err.strerror}); choose another "
                                        "--out") from None
            score = None if error else parse_score(reply)
            if score is None and not skip_invalid:
                why = (f"is malformed: {error}" if error else
                       f"is not an integer 0-100: {reply[:80]!r}")
                raise GptforgeError(f"the judge's reply to record {index + 1} {why}; {kept()} "
                                    f"(--skip-invalid goes on, as the book does)")
            scores.append(score)
            line = {"index": index, "score": score, "reply": reply}
            f.write(json.dumps({**line, "error": error} if error else line) + "\n")
            f.flush()
            bar.update(1)
            if on_score is not None:
                on_score(index, score, reply if reply is not None else "")
    except KeyboardInterrupt:
        raise KeyboardInterrupt(kept()) from None
    finally:
        bar.close()
    if f is not None:
        os.fsync(f.fileno())  # the complete file, on disk before it replaces the earlier one
        f.close()
        os.replace(partial, out)
    return JudgeResult(scores, out)
