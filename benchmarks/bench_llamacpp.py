"""Decode and prefill speed: gptforge against llama.cpp (through llama-cpp-python), in one run on
the same weights: a GPT-2 124M-shaped model with GPT-2's initialisation (random, seeded), which
gptforge exports to GGUF (`gptforge.save(..., format="gguf")`) for llama.cpp to run.

Modes side by side: gptforge fp32 / llama.cpp F32, gptforge int8 (weight-only) / Q8_0, gptforge
4-bit (when gptforge has one) / Q4_0. Both sides use the same number of threads (2 by default).
- decode: batch 1, a 16-token prompt, then 128 new tokens greedily; tokens/s over the new tokens
  (prefill excluded), best of --repeats, the two sides taking turns;
- prefill: one 1024-token prompt into an empty KV cache, logits of its last position only (what
  generation does, and llama.cpp's `eval`), tokens/s, best of --repeats, taking turns too;
- greedy agreement: the 128 tokens of each gptforge mode against llama.cpp's in the same mode
  (fraction equal, first difference).
With --serve, each gptforge mode's decode is also timed through `gptforge serve` (started on a
loopback port on the same weights, `--quantize` as the mode): one client streaming the same
greedy completion, tokens/s after the first streamed token, best of --repeats, in turns with the
other two.
Top-1 agreement and KL of each gptforge mode against gptforge fp32 are printed too. The CPU model
and its SIMD flags are printed with the figures; the output is also written to
benchmarks/results/bench_llamacpp.txt.

With --llama-bench PATH (llama.cpp's own `llama-bench`, built from the vendored llama.cpp of the
llama-cpp-python source package), llama.cpp's figures come from it instead, at any --size
(124m, 355m, 774m, 1558m): decode tg64 and prefill pp512 as llama-bench measures them (64 new tokens
from an empty context; a 512-token prompt), gptforge's the same way (64 new tokens after a 16-token
prompt; a 512-token prefill), the two sides in turns. Each decode figure comes with the bytes of
weights it reads per token (gptforge: its prepared layers' stored bytes; llama.cpp: the GGUF's
matrices, the token-embedding table excepted, of which a step reads one row) and the read bandwidth
that implies, as a fraction of this machine's, measured in the same run (the best of several
sums over 1 GiB of floats on the same threads, before and after). gptforge's batch-8 decode
(8 sequences at once, tokens/s of all of them) is given against its batch 1 too.

On a machine shared with other busy processes, llama.cpp's threads spin at each barrier while a
sibling waits for a core, so its 2-thread figures suffer more from the noise than PyTorch's; a
--threads 1 run is the steadier comparison there.

    python benchmarks/bench_llamacpp.py             # ~3-5 min on 2 quiet cores
    python benchmarks/bench_llamacpp.py --quick     # 32 new tokens, 256-token prefill
    python benchmarks/bench_llamacpp.py --llama-bench /path/to/llama-bench --size 1558m
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, redirect_stdout
from pathlib import Path

import numpy as np
import torch

from gptforge import GPTModel, preset, save
from gptforge.cpu import cpu_summary
from gptforge.generation import GenerationConfig, _decode_steps
from gptforge.fast import QUANTIZATIONS, prepare_for_inference

RESULTS = Path(__file__).resolve().parent / "results"
# gptforge mode -> (prepare_for_inference arguments, llama.cpp GGUF type); None: gptforge has no such mode.
MODES = {
    "fp32": (("float32", "none"), "f32"),
    "bf16": (("bfloat16", "none"), "bf16"),
    "int8": (("float32", "int8"), "q8_0"),
    "int4": (("float32", "int4") if "int4" in QUANTIZATIONS else None, "q4_0"),
}


@torch.no_grad()
def ours_decode(model: GPTModel, prompt: list[int], n: int) -> tuple[float, list[int]]:
    """(seconds for the n - 1 decode steps after the first token, the n greedy tokens)."""
    config = GenerationConfig(max_new_tokens=n, stop_token_ids=())
    tokens, stamps = [], []
    for step in _decode_steps(model, torch.tensor([prompt]), None, config, None, None):
        stamps.append(time.perf_counter())
        tokens.append(int(step.tokens[0]))
    return stamps[-1] - stamps[0], tokens


@torch.no_grad()
def ours_prefill(model: GPTModel, ids: list[int]) -> float:
    """Seconds for the prefill of a prompt as generation does it, and as llama.cpp's `eval` does:
    every position's keys and values into a KV cache, logits of the last position only."""
    x = torch.tensor([ids])
    cache = model.new_cache(1, len(ids))
    start = time.perf_counter()
    model(x, cache=cache, last_only=True)
    return time.perf_counter() - start


@torch.no_grad()
def ours_logprobs(model: GPTModel, ids: list[int]) -> torch.Tensor:
    """Log-probabilities at every position of `ids` (T, vocab), for the quality comparison."""
    return model(torch.tensor([ids]))[0].float().log_softmax(-1)


def quality(reference: torch.Tensor, logprobs: torch.Tensor) -> str:
    """Top-1 agreement and mean KL(reference || model), teacher-forced, against gptforge fp32."""
    top1 = (reference.argmax(-1) == logprobs.argmax(-1)).float().mean().item()
    kl = (reference.exp() * (reference - logprobs)).sum(-1).mean().item()
    return f"top-1 {100 * top1:.1f}%, KL {kl:.2e}"


def llama_decode(llm, prompt: list[int], n: int) -> tuple[float, list[int]]:
    """The same measurement in llama.cpp: argmax over its last logits after each single-token eval."""
    import llama_cpp

    llm.reset()
    llm.eval(prompt)
    tokens, stamps = [], []
    for _ in range(n):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        tokens.append(int(np.argmax(logits)))
        stamps.append(time.perf_counter())
        if len(tokens) < n:
            llm.eval(tokens[-1:])
    return stamps[-1] - stamps[0], tokens


def llama_prefill(llm, ids: list[int]) -> float:
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    return time.perf_counter() - start


def served_decode(port: int, prompt: list[int], n: int) -> tuple[float, int]:
    """(seconds from the first streamed token to the last, tokens) of one greedy completion of
    `prompt` (token ids) streamed by the server on `port` (it stops early at <|endoftext|>)."""
    import httpx

    body = {"model": "bench", "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    first = last = None
    tokens = 0
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk["choices"]:
                last = time.perf_counter()
                first = first or last
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return last - first, tokens


@contextmanager
def server_for(path: Path, mode: str, prompt: list[int], args: argparse.Namespace) -> Iterator[int | None]:
    """`gptforge serve` on `path` in `mode` (`--quantize` as the mode), warmed up: yields its
    port, and stops it at the end; yields None without --serve."""
    if not args.serve:
        yield None
        return
    from load_test import free_port, start_server

    port = free_port()
    dtype, quantize = MODES[mode][0]
    server = start_server(str(path), port, args.threads, ("--served-model-name", "bench", "--dtype", dtype,
                                                          "--quantize", quantize))
    try:
        served_decode(port, prompt, 4)  # warm-up
        yield port
    finally:
        server.terminate()
        server.wait(timeout=60)


def read_bandwidth(threads: int, repeats: int = 7) -> float:
    """This machine's read bandwidth in GB/s: the best of `repeats` sums of 1 GiB of float32 on
    `threads` threads (a sum does 1 add per 4 bytes read: memory-bound on any vector CPU)."""
    torch.set_num_threads(threads)
    data = torch.ones(2**28)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best / 1e9


def ours_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights a decode step of a prepared model reads: every linear layer's stored
    weights and scales (float32 query/key/value are views of one matrix: counted once), not the
    embedding tables (one row each)."""
    storages = {}
    for module in model.modules():
        if hasattr(module, "weight_data"):  # Int8Linear / Int4Linear / Bf16Linear
            tensors = (module.weight_data, module.scale)
        elif isinstance(module, torch.nn.Linear):  # Float32Linear
            tensors = (module.weight,)
        else:
            continue
        for t in tensors:
            if t is not None:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def gguf_weight_bytes(path: Path) -> int:
    """Bytes of the GGUF's tensors a decode step reads: all but the embedding tables (the token
    table counts where the file has no output.weight: llama.cpp's head is then that table)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    skipped = {"position_embd.weight"} | ({"token_embd.weight"} if "output.weight" in tensors else set())
    return sum(size for name, size in tensors.items() if name not in skipped)


def llama_bench(binary: str, path: Path, threads: int, decode: int, prefill: int) -> tuple[float, float]:
    """(decode tokens/s, prefill tokens/s) of llama.cpp's llama-bench on `path`: tg`decode` and
    pp`prefill`, one repetition each (the caller takes turns and keeps the best)."""
    out = subprocess.run([binary, "-m", str(path), "-t", str(threads), "-n", str(decode), "-p", str(prefill),
                          "-r", "1", "-o", "json"], capture_output=True, text=True, check=True, timeout=1800).stdout
    runs = json.loads(out[out.index("["):])
    tg = next(r["avg_ts"] for r in runs if r["n_gen"] > 0)
    pp = next(r["avg_ts"] for r in runs if r["n_prompt"] > 0)
    return tg, pp


def run_llama_bench(args: argparse.Namespace) -> None:
    """The --llama-bench comparison at one --size: see the module docstring."""
    torch.set_num_threads(args.threads)
    new, prefill_len = (16, 128) if args.quick else (64, 512)
    version = subprocess.run([args.llama_bench, "--version"], capture_output=True, text=True).stderr.strip()
    version = re.sub(r"\s+", " ", version)[:120]
    torch.manual_seed(0)
    base = GPTModel(preset(f"gpt2-{args.size}").replace(init="gpt2")).eval()
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 50257, (16,), generator=gen).tolist()
    long_ids = torch.randint(0, 50257, (prefill_len,), generator=gen).tolist()
    bandwidth = [read_bandwidth(args.threads)]
    print(cpu_summary())
    print(f"torch {torch.__version__}, llama-bench ({version}), {args.threads} threads both sides; GPT-2 "
          f"{args.size.upper()} shape, GPT-2 init (torch.manual_seed(0)); best of {args.repeats}, in turns")
    print(f"decode: batch 1, {new} new tokens (llama-bench tg{new}); prefill: {prefill_len} tokens "
          f"(llama-bench pp{prefill_len}); batch 8: gptforge's 8 sequences at once, all their tokens/s\n")
    print(f"{'mode':14s} {'decode ours':>11s} {'llama.cpp':>9s} {'ratio':>6s}   {'MB/token ours':>13s} "
          f"{'llama.cpp':>9s}   {'GB/s ours':>9s} {'llama.cpp':>9s}   {'prefill ours':>12s} {'llama.cpp':>9s} "
          f"{'ratio':>6s}   {'batch 8':>7s} {'x batch 1':>9s}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode, (prep, gguf_type) in MODES.items():
            if prep is None or mode not in args.modes:
                continue
            path = save(base, Path(tmp) / f"m-{gguf_type}.gguf", format="gguf", gguf_type=gguf_type)
            model = prepare_for_inference(copy.deepcopy(base), *prep)
            ours_bytes, their_bytes = ours_weight_bytes(model), gguf_weight_bytes(path)
            ours_decode(model, prompt, 4)  # warm-up (and the C step's first-use costs)
            their_dec = their_pre = our_dec = our_pre = our_b8 = float("inf")
            for _ in range(args.repeats):
                tg, pp = llama_bench(args.llama_bench, path, args.threads, new, prefill_len)
                their_dec, their_pre = min(their_dec, 1 / tg), min(their_pre, 1 / pp)
                our_dec = min(our_dec, ours_decode(model, prompt, new + 1)[0] / new)
                our_pre = min(our_pre, ours_prefill(model, long_ids) / prefill_len)
            batch = [prompt] * 8
            ours_decode_batch(model, batch, 4)  # warm-up: a batch's first step makes the float32 panels
            for _ in range(args.repeats):
                seconds = ours_decode_batch(model, batch, new + 1)
                our_b8 = min(our_b8, seconds / (8 * new))
            del model
            path.unlink()
            ratio = their_dec / our_dec
            print(f"{mode + ' / ' + gguf_type.upper():14s} {1 / our_dec:11.1f} {1 / their_dec:9.1f} {ratio:6.2f}   "
                  f"{ours_bytes / 1e6:13.1f} {their_bytes / 1e6:9.1f}   {ours_bytes / our_dec / 1e9:9.1f} "
                  f"{their_bytes / their_dec / 1e9:9.1f}   {1 / our_pre:12.1f} {1 / their_pre:9.1f} "
                  f"{their_pre / our_pre:6.2f}   {1 / our_b8:7.1f} {our_dec / our_b8:8.2f}x")
            rows.append((mode, ours_bytes / our_dec / 1e9, their_bytes / their_dec / 1e9))
    bandwidth.append(read_bandwidth(args.threads))
    peak = max(bandwidth)
    print(f"\nread bandwidth of this machine ({args.threads} threads, sum of 1 GiB float32): "
          f"{bandwidth[0]:.1f} GB/s before, {bandwidth[1]:.1f} after")
    print("fraction of it the decode figures imply (weights read per token x tokens/s / bandwidth): "
          + "; ".join(f"{mode} ours {100 * o / peak:.0f}%, llama.cpp {100 * t / peak:.0f}%" for mode, o, t in rows))
    print("ratio = gptforge tokens/s / llama.cpp tokens/s (> 1: gptforge faster)")


@torch.no_grad()
def ours_decode_batch(model: GPTModel, prompts: list[list[int]], n: int) -> float:
    """Seconds for the n - 1 decode steps after the first token of len(prompts) sequences at once."""
    config = GenerationConfig(max_new_tokens=n, stop_token_ids=())
    stamps = [time.perf_counter() for _ in _decode_steps(model, torch.tensor(prompts), None, config, None, None)]
    return stamps[-1] - stamps[0]


def agreement(a: list[int], b: list[int]) -> str:
    same = [x == y for x, y in zip(a, b)]
    first = same.index(False) if False in same else len(same)
    return f"{100 * sum(same) / len(same):.0f}% equal, first difference at {first}"


def run(args: argparse.Namespace) -> None:
    import llama_cpp

    torch.set_num_threads(args.threads)
    new, prefill_len = (32, 256) if args.quick else (128, 1024)
    torch.manual_seed(0)
    base = GPTModel(preset("gpt2-124m").replace(init="gpt2")).eval()
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 50257, (16,), generator=gen).tolist()
    long_ids = torch.randint(0, 50257, (prefill_len,), generator=gen).tolist()
    print(cpu_summary())
    print(f"torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__}, {args.threads} threads both sides; "
          f"GPT-2 124M shape, GPT-2 init (torch.manual_seed(0)); best of {args.repeats}")
    print(f"decode: batch 1, 16-token prompt, {new} new tokens (tokens/s after the first); prefill: {prefill_len} tokens\n")
    header = (f"{'mode (gptforge / llama.cpp)':28s} {'decode ours':>11s} {'llama.cpp':>9s} {'ratio':>6s}   "
              f"{'prefill ours':>12s} {'llama.cpp':>9s} {'ratio':>6s}   greedy agreement ({new} tokens)"
              + (f"   {'serve':>6s} {'ratio':>6s}" if args.serve else ""))
    print(header)
    quality_lines, logprobs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        f32_path = save(base, Path(tmp) / "serve-f32.gguf", format="gguf", gguf_type="f32") if args.serve else None
        for mode, (prep, gguf_type) in MODES.items():
            path = save(base, Path(tmp) / f"m-{gguf_type}.gguf", format="gguf", gguf_type=gguf_type)
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(prefill_len, 256), n_batch=prefill_len,
                                  n_ubatch=min(prefill_len, 512), n_threads=args.threads,
                                  n_threads_batch=args.threads, verbose=False)
            model = None if prep is None else prepare_for_inference(copy.deepcopy(base), *prep)
            # The sides take turns (llama.cpp, gptforge in process, gptforge serve), each keeping
            # its best: the memory bandwidth every decode depends on drifts over minutes here (one
            # side timed after the other read 0.90x where taking turns read 1.16-1.25x).
            their_dec = their_pre = our_dec = our_pre = float("inf")
            served = (float("inf"), 0)  # (seconds, tokens) of the fastest streamed completion
            with server_for(f32_path, mode, prompt, args) if model is not None else nullcontext() as port:
                for _ in range(args.repeats):
                    their_dec = min(their_dec, llama_decode(llm, prompt, new)[0])
                    if model is not None:
                        our_dec = min(our_dec, ours_decode(model, prompt, new)[0])
                    if port is not None:
                        served = min(served, served_decode(port, prompt, new))
            for _ in range(args.repeats):
                their_pre = min(their_pre, llama_prefill(llm, long_ids))
                if model is not None:
                    our_pre = min(our_pre, ours_prefill(model, long_ids))
            their_tokens = llama_decode(llm, prompt, new)[1]
            llm.close()
            theirs = f"{(new - 1) / their_dec:9.1f}"
            label = f"{mode} / {gguf_type.upper()}"
            if model is None:
                print(f"{label:28s} {'-':>11s} {theirs} {'-':>6s}   {'-':>12s} {prefill_len / their_pre:9.1f} "
                      f"{'-':>6s}   - (gptforge has no 4-bit mode)")
                continue
            our_tokens = ours_decode(model, prompt, new)[1]
            logprobs.append(ours_logprobs(model, long_ids))
            quality_lines.append(f"  gptforge {mode}: {quality(logprobs[0], logprobs[-1])}")
            del model
            serve_column = ""
            if args.serve:
                seconds, tokens = served
                if tokens < new:
                    print(f"  (serve {mode}: {tokens} of {new} tokens, stopped at <|endoftext|>)")
                rate = (tokens - 1) / seconds
                serve_column = f"   {rate:6.1f} {rate * their_dec / (new - 1):6.2f}"
            print(f"{label:28s} {(new - 1) / our_dec:11.1f} {theirs} {their_dec / our_dec:6.2f}   "
                  f"{prefill_len / our_pre:12.1f} {prefill_len / their_pre:9.1f} {their_pre / our_pre:6.2f}   "
                  f"{agreement(our_tokens, their_tokens):36s}{serve_column}")
    print("\nratio = gptforge tokens/s / llama.cpp tokens/s (> 1: gptforge faster)")
    print(f"quality against gptforge fp32, teacher-forced on the {prefill_len}-token prompt (random weights):")
    print("\n".join(quality_lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 new tokens and a 256-token prefill (smoke test)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per figure, best kept (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="threads on both sides (default 2)")
    parser.add_argument("--llama-bench", metavar="PATH",
                        help="llama.cpp's llama-bench binary: its tg/pp figures at --size, with bandwidth fractions")
    parser.add_argument("--size", choices=("124m", "355m", "774m", "1558m"), default="124m",
                        help="GPT-2 size for --llama-bench (default 124m)")
    parser.add_argument("--modes", default="fp32,bf16,int8,int4",
                        help="modes for --llama-bench, comma-separated (default fp32,bf16,int8,int4)")
    parser.add_argument("--serve", action="store_true",
                        help="also time each gptforge mode's decode through `gptforge serve` (one streaming client)")
    args = parser.parse_args()
    args.modes = args.modes.split(",")
    out = io.StringIO()

    class Tee(io.TextIOBase):
        def write(self, text: str) -> int:
            sys.__stdout__.write(text)
            sys.__stdout__.flush()
            return out.write(text)

    with redirect_stdout(Tee()):
        print(f"bench_llamacpp.py {' '.join(sys.argv[1:])}  ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})")
        run_llama_bench(args) if args.llama_bench else run(args)
    if not args.quick:
        name = "bench_llamacpp.txt" if args.threads == 2 else f"bench_llamacpp_{args.threads}thread.txt"
        if args.llama_bench:
            subset = "" if set(MODES) <= set(args.modes) else "_" + "-".join(args.modes)
            name = f"bench_llamacpp_{args.size}{subset}.txt"
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / name).write_text(out.getvalue())
        print(f"(written to {RESULTS / name})")


if __name__ == "__main__":
    main()
