"""Where a decode step's time goes: matrix products, attention and the rest, per step, at batch 1 and
batch 8 on a GPT-2 shape (`--size`, default 124M; random GPT-2-init weights), for each inference
mode: fp32, bf16, int8, int4 and auto as `prepare_for_inference` lays them out (what the command
line and the server decode with), and `view`, the float32 inference view `generate` decodes a plain
model with (a batch's steps from the row-major weights, no second copy of them).

The step is timed plainly (best of `--repeats` runs of `--tokens` steps after a 64-token prompt,
batch 1 and batch 8 interleaved: the machine's memory bandwidth drifts, and batch 1 is
memory-bound where batch 8 is compute-bound); a second run of each splits it into matrix products, attention and the rest (embedding, layer
norms, GELU, the argmax, Python and dispatch): by gptforge's kernels' own timers
(`kernels.profile`) where the model runs on them, else by torch.profiler (PyTorch operators' own
time). Machine load makes the absolute figures noisy; compare modes within one run.

The last column bounds batch 8 by the products' own speed: one layer's product of 8 rows timed
with its weights in the caches (the feed-forward's first, d x 4d, in the mode's layout), and the
most batch 8 could then reach over batch 1, min(8, batch 1's step x that speed / multiply-adds per
token): batch 8 can be no faster than its products at full compute speed. Where it is near the
measured ratio, the 8-row step is bound by this CPU's multiply-adds (without AVX-512 VNNI, an int8
product spends vpsignb + vpmaddubsw + vpmaddwd + vpaddd per 32 byte pairs of each row).

    python benchmarks/profile_decode.py                   # fp32 and int8 (and auto)
    python benchmarks/profile_decode.py --size 1558m --modes fp32 int8
    python benchmarks/profile_decode.py --modes fp32 --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from gptforge import GPTModel, preset
from gptforge.fast import kernels
from gptforge.cpu import cpu_summary
from gptforge.generation import GenerationConfig, next_tokens
from gptforge.fast import inference_view, prepare_for_inference
from gptforge.fast.blocks import f32_panels

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::_weight_int8pack_mm",
              "aten::_weight_int4pack_mm_for_cpu", "mkldnn::_linear_pointwise", "aten::mkldnn_linear",
              "aten::linear", "gptforge::linear")
ATTENTION_OPS = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::scaled_dot_product_attention",
                 "aten::_scaled_dot_product_attention_math", "aten::_softmax")
# Wall clock by default; `--clock cpu` counts this process's CPU seconds (with --threads 1, the cost
# on one core, far less disturbed by other processes sharing the machine).
CLOCK = time.perf_counter
MODES = {"fp32": ("float32", "none"), "view": ("float32", "none"), "bf16": ("bfloat16", "none"), "int8": ("auto", "int8"),
         "int4": ("auto", "int4"), "auto": ("auto", "auto")}


GREEDY = GenerationConfig()


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """(B, 1) next tokens from (B, 1, V) logits, as `generate` picks them greedily."""
    return next_tokens(logits[:, -1], None, GREEDY)[:, None]


def build(mode: str, size: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = GPTModel(preset(f"gpt2-{size}").replace(init="gpt2")).eval()
    dtype, quantize = MODES[mode]
    if mode == "view":
        return inference_view(model)  # what generate decodes a plain float32 model with
    return prepare_for_inference(model, dtype, quantize)


def multiply_adds(model: torch.nn.Module) -> int:
    """Multiply-adds of a decode step's products per token: every linear layer's weights, the head's."""
    return sum(m.in_features * m.out_features for m in model.modules() if hasattr(m, "in_features"))


def cached_product_speed(model: torch.nn.Module, panels: bool, rows: int = 8, repeats: int = 30) -> float | None:
    """Multiply-adds per second of the first block's d x 4d layer on `rows` rows, its weights in the
    caches (timed right after a first call), in the layout a batch's steps use (float32: in panels,
    or row-major where not `panels`). None where the layer does not run on gptforge's kernels."""
    fc1 = model.trf_blocks[0].ff.layers[0]
    if not kernels.available() or not hasattr(fc1, "in_features"):
        return None
    if hasattr(fc1, "spec"):  # bf16, int8, 4-bit: stored in panels
        if not fc1.panels:
            return None
        spec = fc1.spec()
    else:  # float32: the panels a batch's steps made (f32_panels keeps them on the layer)
        weight = fc1.weight.detach().contiguous()
        spec = kernels.layer("f32", weight.shape[0], weight.shape[1], weight, None, None,
                             f32_panels(fc1, weight) if panels else None)
    x = torch.randn(rows, spec.k)
    kernels.linear(x, spec)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            kernels.linear(x, spec)
        best = min(best, (time.perf_counter() - start) / repeats)
    return rows * fc1.out_features * fc1.in_features / best


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
    parser.add_argument("--size", choices=("124m", "355m", "774m", "1558m"), default="124m")
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
          f"{args.tokens} tokens after a 64-token prompt, GPT-2 {args.size.upper()} shape")
    print(f"{'mode':<6} {'batch':>5} {'ms/step':>8} {'tok/s':>7}   shares of a step: {'products':>8} {'attention':>9} "
          f"{'rest':>6}   tok/s / batch 1's   bound: 8-row products from cache, GMAC/s, x batch 1")
    for mode in args.modes:
        model = build(mode, args.size)
        decode(model, 4)  # warm-up (and a float32 model's panels, for the batch)
        decode(model, 4, batch=8)
        one, eight, speeds = [], [], []
        for _ in range(args.repeats):  # interleaved: the machine's memory bandwidth drifts, and batch 1
            one.append(decode(model, args.tokens))  # is memory-bound where batch 8 is compute-bound
            eight.append(decode(model, args.tokens, batch=8))
            speeds.append(cached_product_speed(model, panels=mode != "view"))
        for batch, best in ((1, min(one)), (8, min(eight))):
            split = breakdown(model, args.tokens, batch)
            ratio = f"{batch * min(one) / best:.2f}x" if batch > 1 else ""
            speed = max(speeds) if batch > 1 and None not in speeds else None
            bound = f"{speed / 1e9:.1f}, {min(8.0, min(one) * speed / multiply_adds(model)):.2f}x" if speed else ""
            print(f"{mode:<6} {batch:>5} {best * 1e3:>8.2f} {batch / best:>7.1f}   {'':>17} {split['products']:>8.0%} "
                  f"{split['attention']:>9.0%} {split['rest']:>6.0%} ({split['rest'] * best * 1e3:3.1f} ms)   {ratio:>6}   {bound}")


if __name__ == "__main__":
    main()
