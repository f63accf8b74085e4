"""Scoring responses with a judge model, the book's way (llms-from-scratch, chapter 7): each record's
response is scored 0-100 by a larger model, asked with the book's prompt, through any
OpenAI-compatible chat endpoint (Ollama, vLLM, OpenAI, or `gptforge serve` itself).

Scores are written as they arrive, one JSON line per record, so a run that stops (an unreachable
endpoint, a timeout, a reply that is not a number) keeps the scores it has.
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
    return reply.choices[0].message.content or ""


def _message(err: Any) -> str:
    body = err.body if isinstance(getattr(err, "body", None), dict) else {}
    inner = body.get("error", body) if isinstance(body.get("error", body), dict) else body
    return str(inner.get("message") or err.message)


def judge(records: Sequence[Mapping[str, Any]], *, url: str, model: str, out: str | Path,
          key: str = RESPONSE_KEY, timeout: float = 60.0, max_tokens: int | None = None,
          skip_invalid: bool = False, api_key: str | None = None, source: str = "data",
          on_score: Callable[[int, int | None, str], None] | None = None, progress: bool = False) -> JudgeResult:
    """Score each record's response (`key`) 0-100 with `model` behind the OpenAI-compatible `url`
    (e.g. http://127.0.0.1:8000/v1), asking with the book's prompt, temperature 0 and seed 123.

    out: a JSONL file, one `{"index", "score", "reply"}` line per record, written as scores arrive.
    skip_invalid: a reply that is not an integer 0-100 gets score None and the run goes on (the
        book prints it and continues); otherwise it stops the run with a GptforgeError.
    progress: a bar over the records on stderr.
    Raises GptforgeError on an unreachable endpoint, a timeout or an HTTP error; the scores
    written before it stay in `out`, as on Ctrl-C (a KeyboardInterrupt saying where they are).
    """
    _check_keys(records, key, source)
    _check_url(url)
    out = Path(out)
    _check_out(out)
    client = _client(url, timeout, api_key)
    scores: list[int | None] = []
    f = None  # opened at the first reply: a run that fails at once leaves an earlier scores file as it was
    bar = progress_bar(progress, len(records), 0, unit="record")

    def kept() -> str:  # where the scores so far are, for a run that ends early
        return f"{len(scores)} scores so far " + (f"are in {out}" if f is not None else
                                                  f"written ({out} is left as it was)")

    try:
        for index, rec in enumerate(records):
            try:
                reply = _ask(client, model, judge_prompt(rec, key), max_tokens, url)
            except GptforgeError as err:
                raise GptforgeError(f"{err}; {kept()}") from None
            if f is None:
                try:
                    f = open(out, "w", encoding="utf-8")
                except OSError as err:
                    raise GptforgeError(f"cannot write the scores to {out} ({err.strerror}); choose another "
                                        "--out") from None
            score = parse_score(reply)
            if score is None and not skip_invalid:
                raise GptforgeError(f"the judge's reply to record {index + 1} is not an integer 0-100: "
                                    f"{reply[:80]!r}; {kept()} "
                                    f"(--skip-invalid goes on, as the book does)")
            scores.append(score)
            f.write(json.dumps({"index": index, "score": score, "reply": reply}) + "\n")
            f.flush()
            bar.update(1)
            if on_score is not None:
                on_score(index, score, reply)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(kept()) from None
    finally:
        bar.close()
        if f is not None:
            f.close()
    return JudgeResult(scores, out)
