"""Where a decode step's time goes: matrix products, attention and the rest, per step, at batch 1 and
batch 8 on the GPT-2 124M shape (random GPT-2-init weights), for each inference mode.

The step is timed plainly (best of `--repeats` runs of `--tokens` steps after a 64-token prompt,
batch 1 and batch 8 interleaved: the machine's memory bandwidth drifts, and batch 1 is
memory-bound where batch 8 is compute-bound); a second run of each splits it into matrix products, attention and the rest (embedding, layer
norms, GELU, the argmax, Python and dispatch): by gptforge's kernels' own timers
(`kernels.profile`) where the model runs on them, else by torch.profiler (PyTorch operators' own
time). Machine load makes the absolute figures noisy; compare modes within one run.

    python benchmarks/profile_decode.py                   # fp32 and int8 (and auto)
    python benchmarks/profile_decode.py --modes fp32 --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from gptforge import GPTModel
from gptforge.fast import kernels
from gptforge.cpu import cpu_summary
from gptforge.generation import GenerationConfig, next_tokens
from gptforge.fast import inference_view, prepare_for_inference

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::_weight_int8pack_mm",
              "aten::_weight_int4pack_mm_for_cpu", "mkldnn::_linear_pointwise", "aten::mkldnn_linear",
              "aten::linear", "gptforge::linear")
ATTENTION_OPS = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::scaled_dot_product_attention",
                 "aten::_scaled_dot_product_attention_math", "aten::_softmax")
# Wall clock by default; `--clock cpu` counts this process's CPU seconds (with --threads 1, the cost
# on one core, far less disturbed by other processes sharing the machine).
CLOCK = time.perf_counter
MODES = {"fp32": ("float32", "none"), "bf16": ("bfloat16", "none"), "int8": ("auto", "int8"),
         "int4": ("auto", "int4"), "auto": ("auto", "auto")}


GREEDY = GenerationConfig()


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """(B, 1) next tokens from (B, 1, V) logits, as `generate` picks them greedily."""
    return next_tokens(logits[:, -1], None, GREEDY)[:, None]


def build(mode: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = GPTModel("gpt2-124m").eval()
    dtype, quantize = MODES[mode]
    if mode == "fp32":
        return inference_view(model)  # what generate decodes a float32 model with
    return prepare_for_inference(model, dtype, quantize)


@torch.no_grad()
def prefill(model: torch.nn.Module, tokens: int, prompt: int = 64, batch: int = 1) -> tuple:
    """A KV cache holding `batch` random prompts, room for `tokens` more, and the greedy next tokens."""
    ids = torch.randint(0, 50257, (batch, prompt), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(batch, prompt + tokens)
    return cache, greedy(model(ids, cache=cache, last_only=True))


@torch.no_grad()
def decode(model: torch.nn.Module, tokens: int, batch: int = 1) -> float:
    """Seconds per decode step (greedy, KV cache) after a 64-token prefill (not timed)."""
    cache, tok = prefill(model, tokens, batch=batch)
    start = CLOCK()
    for _ in range(tokens):
        tok = greedy(model(tok, cache=cache, last_only=True))  # (B, 1)
    return (CLOCK() - start) / tokens


def breakdown(model: torch.nn.Module, tokens: int, batch: int = 1) -> dict[str, float]:
    """Shares of one decode (the prefill not timed) in matrix products, attention and the rest
    (fractions of its wall time, so that machine load cancels out). A model on gptforge's
    kernels is split by their own timers (`kernels.profile`); one on PyTorch's operators, by
    torch.profiler (the operators' own time), whose bookkeeping then joins the rest."""
    cache, tok = prefill(model, tokens, batch=batch)
    kernels.profile(True)
    start = CLOCK()
    with torch.no_grad():
        for _ in range(tokens):
            tok = greedy(model(tok, cache=cache, last_only=True))
    total = CLOCK() - start
    split = {part: seconds / total for part, seconds in kernels.profile(False).items() if part != "block rest"}
    if split["products"] == 0:  # PyTorch's operators
        cache, tok = prefill(model, tokens, batch=batch)
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            start = CLOCK()
            for _ in range(tokens):
                tok = greedy(model(tok, cache=cache, last_only=True))
            total = CLOCK() - start
        for event in prof.key_averages():
            kind = "products" if event.key in MATMUL_OPS else "attention" if event.key in ATTENTION_OPS else None
            if kind:
                split[kind] += event.self_cpu_time_total / 1e6 / total
    split["rest"] = 1 - split["products"] - split["attention"]
    return split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", default=["fp32", "int8", "auto"], choices=tuple(MODES))
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    print(cpu_summary())
    print(f"torch {torch.__version__}, {args.threads} threads, {args.clock} clock, "
          f"{args.tokens} tokens after a 64-token prompt")
    print(f"{'mode':<6} {'batch':>5} {'ms/step':>8} {'tok/s':>7}   shares of a step: {'products':>8} {'attention':>9} "
          f"{'rest':>6}   tok/s / batch 1's")
    for mode in args.modes:
        model = build(mode)
        decode(model, 4)  # warm-up (and a float32 model's panels, for the batch)
        decode(model, 4, batch=8)
        one, eight = [], []
        for _ in range(args.repeats):  # interleaved: the machine's memory bandwidth drifts, and batch 1
            one.append(decode(model, args.tokens))  # is memory-bound where batch 8 is compute-bound
            eight.append(decode(model, args.tokens, batch=8))
        for batch, best in ((1, min(one)), (8, min(eight))):
            split = breakdown(model, args.tokens, batch)
            ratio = f"{batch * min(one) / best:.2f}x" if batch > 1 else ""
            print(f"{mode:<6} {batch:>5} {best * 1e3:>8.2f} {batch / best:>7.1f}   {'':>17} {split['products']:>8.0%} "
                  f"{split['attention']:>9.0%} {split['rest']:>6.0%} ({split['rest'] * best * 1e3:3.1f} ms)   {ratio}")


if __name__ == "__main__":
    main()
