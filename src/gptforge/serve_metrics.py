"""The server's Prometheus metrics (GET /metrics), through `prometheus_client`, in the spirit of
vLLM's and llama.cpp's: requests by endpoint and status, tokens read and generated, time to first
token and time per output token, running and waiting sequences, and how full the KV cache is.

Each app has a registry of its own (no process-wide state: tests run several servers in one
process). Counters are read by `prometheus_client.parser` or any Prometheus scraper.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .scheduler import BatchScheduler, Output, SequenceState

CONTENT_TYPE = CONTENT_TYPE_LATEST
# seconds; from a few ms (a tiny model's step) to a minute (a long prompt waiting behind a full batch)
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
UNMATCHED = "unmatched"  # the endpoint label of paths no route serves (their 404s), so that labels stay few


class ServerMetrics:
    """The metrics of one server. `scheduler`: the language model's (None for a classifier: no
    sequences, no cache). `track` follows a request's sequences; `middleware` counts requests."""

    def __init__(self, scheduler: BatchScheduler | None):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("gptforge_requests", "HTTP requests answered, by endpoint (route path) and status",
                                ["endpoint", "status"], registry=registry)
        self.prompt_tokens = Counter("gptforge_prompt_tokens", "Tokens read: prompts of completions and chat "
                                     "(each prompt once, whatever n), inputs of embeddings and classify",
                                     registry=registry)
        self.generation_tokens = Counter("gptforge_generation_tokens", "Tokens generated (stop tokens included)",
                                         registry=registry)
        self.time_to_first_token = Histogram(
            "gptforge_time_to_first_token_seconds", "Seconds from a sequence's submission to its first token",
            buckets=TTFT_BUCKETS, registry=registry)
        self.time_per_output_token = Histogram(
            "gptforge_time_per_output_token_seconds", "Seconds between a sequence's successive tokens",
            buckets=TPOT_BUCKETS, registry=registry)
        running = Gauge("gptforge_num_requests_running", "Sequences being decoded", registry=registry)
        waiting = Gauge("gptforge_num_requests_waiting", "Sequences waiting for a row of the batch", registry=registry)
        usage = Gauge("gptforge_kv_cache_usage_ratio", "Share of the batch KV cache's positions (batch rows x "
                      "context) holding tokens of active sequences, 0 to 1", registry=registry)
        if scheduler is not None:
            running.set_function(lambda: scheduler.stats()["active"])
            waiting.set_function(lambda: scheduler.stats()["waiting"])
            usage.set_function(lambda: scheduler.cache_usage())

    def render(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)

    def track(self, seqs: Iterable[SequenceState]) -> None:
        """Follow sequences about to be submitted: their prompts' tokens now, then (from the
        scheduler's thread) their first token's delay, the delay between tokens and, as each ends,
        its generated tokens. Prompts shared by several choices (n > 1) count once."""
        submitted = time.perf_counter()
        prompts: dict[int, int] = {}
        for seq in seqs:
            prompts[id(seq.prompt_ids)] = len(seq.prompt_ids)
            seq.on_output = self._watch(seq.on_output, submitted)
        self.prompt_tokens.inc(sum(prompts.values()))

    def _watch(self, on_output: Callable[[Output], None], submitted: float) -> Callable[[Output], None]:
        last = [submitted, 0]  # the time of the last new token, tokens so far

        def watched(out: Output) -> None:
            if out.num_tokens > last[1]:
                now = time.perf_counter()
                if last[1] == 0:
                    self.time_to_first_token.observe(now - submitted)
                else:
                    self.time_per_output_token.observe((now - last[0]) / (out.num_tokens - last[1]))
                last[:] = [now, out.num_tokens]
            if out.finish_reason is not None:
                self.generation_tokens.inc(out.num_tokens)
            on_output(out)

        return watched

    def middleware(self, app: Any) -> Any:
        """An ASGI middleware counting every HTTP request by its route's path and the status
        answered (500 where the app raised)."""

        async def counted(scope: dict, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                return await app(scope, receive, send)
            status = [500]

            async def send_status(message: dict) -> None:
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            try:
                await app(scope, receive, send_status)
            finally:
                route = scope.get("route")
                endpoint = getattr(route, "path", None) or UNMATCHED
                self.requests.labels(endpoint, str(status[0])).inc()

        return counted
