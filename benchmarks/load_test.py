"""Load test for `gptforge serve`, on loopback only, bounded in requests and time.

1. Batching: the same 8 requests one after another, then all 8 at once; prints total tokens/s of
   each and the ratio (the scheduler should make concurrent >= 4x sequential). With
   `--constrained K`, K of the 8 ask for JSON under a schema (`response_format`), decoded under
   its grammar beside the plain ones.
2. Load: a fixed number of requests at 1, 4 and 16 concurrent clients; prints requests/s,
   tokens/s and latency percentiles, and counts failures (any non-200 or transport error).

By default it starts its own server (`python -m gptforge serve`) on a free loopback port and stops
it at the end; `--url` targets a running one instead (loopback addresses only).

    python benchmarks/load_test.py --model gpt2-124m --max-tokens 32 --requests 32 --time-limit 120
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Hello, I am", "The meaning of life is", "Once upon a time", "In the beginning",
           "The quick brown fox", "import torch\n", "Dear Sir or Madam,", "It was a dark and stormy night"]
# What --constrained requests ask for: records that never end before max_tokens, as a plain request.
RECORDS = {"type": "json_schema", "json_schema": {"name": "records", "schema": {
    "type": "array", "minItems": 1000, "items": {
        "type": "object", "additionalProperties": False, "required": ["name", "age"], "properties": {
            "name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0, "maximum": 120}}}}}}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def one_request(client: httpx.AsyncClient, model: str, prompt: str,
                      max_tokens: int, constrained: bool = False) -> tuple[float, int, str]:
    """(latency in s, completion tokens, text) of one greedy completion (JSON under RECORDS' schema
    when `constrained`); raises on any failure."""
    start = time.perf_counter()
    r = await client.post("/v1/completions", json={
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        **({"response_format": RECORDS} if constrained else {})})
    r.raise_for_status()
    body = r.json()
    return time.perf_counter() - start, body["usage"]["completion_tokens"], body["choices"][0]["text"]


async def run_level(url: str, model: str, concurrency: int, requests: int, max_tokens: int,
                    time_limit: float) -> dict[str, float]:
    """`requests` requests from `concurrency` clients; none starts after `time_limit` seconds."""
    latencies: list[float] = []
    tokens = failures = 0
    next_index = 0
    deadline = time.perf_counter() + time_limit

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal next_index, tokens, failures
        while next_index < requests and time.perf_counter() < deadline:
            prompt = PROMPTS[next_index % len(PROMPTS)]
            next_index += 1
            try:
                latency, n, _ = await one_request(client, model, prompt, max_tokens)
            except (httpx.HTTPError, KeyError, ValueError):
                failures += 1
                continue
            latencies.append(latency)
            tokens += n

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=max(60.0, time_limit), limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    done = len(latencies)
    return {
        "concurrency": concurrency, "requests": done, "failures": failures, "seconds": elapsed,
        "req_per_s": done / elapsed, "tok_per_s": tokens / elapsed,
        "p50": percentile(latencies, 50) if done else float("nan"),
        "p90": percentile(latencies, 90) if done else float("nan"),
        "p99": percentile(latencies, 99) if done else float("nan"),
    }


async def batching_ratio(url: str, model: str, max_tokens: int, constrained: int = 0) -> tuple[float, float, bool]:
    """Tokens/s of 8 requests one after another, and of the same 8 at once (the first `constrained`
    of them under a JSON schema); and whether each request's (greedy) text came out the same both ways."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        start = time.perf_counter()
        alone = [await one_request(client, model, prompt, max_tokens, i < constrained)
                 for i, prompt in enumerate(PROMPTS)]
        sequential = sum(n for _, n, _ in alone) / (time.perf_counter() - start)
        start = time.perf_counter()
        together = await asyncio.gather(*(one_request(client, model, p, max_tokens, i < constrained)
                                          for i, p in enumerate(PROMPTS)))
        concurrent = sum(n for _, n, _ in together) / (time.perf_counter() - start)
    same = [a[2] for a in alone] == [t[2] for t in together]
    return sequential, concurrent, same


async def warm_up(url: str, model: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await one_request(client, model, PROMPTS[0], 2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, threads: int, options: tuple[str, ...] = ()) -> subprocess.Popen:
    """`gptforge serve --model model` (and `options`) on loopback `port`, once it answers /health."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "gptforge", "serve", "--model", model, "--port", str(port),
           "--max-batch-size", "16", "--shutdown-grace", "0", *options]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    sys.exit("the server did not start within 300 s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (loopback only); default: start one")
    parser.add_argument("--model", default="gpt2-124m", help="model to serve / to ask for (default: gpt2-124m)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per request (default: 32)")
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level (default: 32)")
    parser.add_argument("--time-limit", type=float, default=120.0, help="seconds per level at most (default: 120)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in the server it starts (default: 1, best on a shared 2-core box)")
    parser.add_argument("--levels", default="1,4,16", help="concurrency levels (default: 1,4,16; none: skip)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the batching comparison (default: 3)")
    parser.add_argument("--constrained", type=int, default=0, choices=range(9), metavar="K",
                        help="of the 8 batching requests, how many ask for JSON under a schema (default: 0)")
    parser.add_argument("--quantize", choices=("none", "int8", "int4"), default="none",
                        help="the started server's weights (its --quantize; default: none, float32)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the started server's --dtype (default: float32)")
    args = parser.parse_args()
    if (not 0 < args.requests <= 10_000 or not 0 < args.max_tokens <= 1024 or not 0 < args.time_limit <= 3600
            or not 0 < args.rounds <= 20):
        parser.error("--requests in 1..10000, --max-tokens in 1..1024, --time-limit in (0, 3600], --rounds in 1..20")

    from gptforge.cpu import cpu_summary  # this machine, printed with the figures

    print(cpu_summary())
    proc = None
    if args.url:
        host = urlparse(args.url).hostname or ""
        if host not in ("127.0.0.1", "localhost", "::1"):
            parser.error(f"--url must be a loopback address, got host {host!r}")
        url = args.url.rstrip("/")
    else:
        port = free_port()
        options = (("--quantize", args.quantize) if args.quantize != "none" else ()) + (
            ("--dtype", args.dtype) if args.dtype != "float32" else ())
        print(f"starting gptforge serve --model {args.model} {' '.join(options)} on 127.0.0.1:{port} ...", flush=True)
        proc = start_server(args.model, port, args.threads, options)
        url = f"http://127.0.0.1:{port}"
    failures = 0
    try:
        asyncio.run(warm_up(url, args.model))
        print(f"\nbatching, 8 requests x {args.max_tokens} tokens ({args.constrained} of them under a JSON schema), "
              f"model {args.model}, {args.rounds} rounds (a shared machine is noisy: the median ratio counts):")
        ratios = []
        for round_ in range(1, args.rounds + 1):
            sequential, concurrent, same = asyncio.run(batching_ratio(url, args.model, args.max_tokens,
                                                                      args.constrained))
            ratios.append(concurrent / sequential)
            failures += 0 if same else 1
            print(f"  round {round_}: one after another {sequential:7.1f} tok/s, all 8 at once {concurrent:7.1f} "
                  f"tok/s, ratio {ratios[-1]:.2f}x, each text the same both ways: {'yes' if same else 'NO'}")
        print(f"  median ratio {statistics.median(ratios):.2f}x")
        print(f"\nload, {args.requests} requests per level, {args.max_tokens} tokens each:")
        print(f"{'clients':>8} {'done':>5} {'failed':>6} {'req/s':>7} {'tok/s':>8} {'p50 s':>7} {'p90 s':>7} {'p99 s':>7}")
        for level in ([] if args.levels == "none" else [int(x) for x in args.levels.split(",")]):
            r = asyncio.run(run_level(url, args.model, level, args.requests, args.max_tokens, args.time_limit))
            failures += r["failures"]
            print(f"{level:>8} {r['requests']:>5} {r['failures']:>6} {r['req_per_s']:>7.2f} {r['tok_per_s']:>8.1f} "
                  f"{r['p50']:>7.2f} {r['p90']:>7.2f} {r['p99']:>7.2f}", flush=True)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
