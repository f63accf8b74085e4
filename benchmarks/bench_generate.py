"""Generation speed: gptforge (float32, bfloat16, weight-only int8) against transformers'
GPT2LMHeadModel.generate (sdpa, float32 and bfloat16) and the seed's generate_text_simple, in one
run on the same random GPT-2 124M weights.

It first checks that greedy outputs agree (float32 exactly; bf16/int8 report their agreement and
perplexity cost), then measures prefill (1x1024, 8x128), time to first token, decode tokens/s
(batch 1 with 128 and 512 new tokens, batch 8), the per-token cost at position ~900 versus ~10, and
the memory-bandwidth floor (weight bytes per token / measured copy bandwidth). Every figure is the
best of `--repeats` runs; ratios are against transformers float32 in the same run.

    python benchmarks/bench_generate.py            # the full run (~10 min on 2 quiet cores)
    python benchmarks/bench_generate.py --quick    # fewer tokens, for a smoke test
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from gptforge import GenerationConfig, GPTModel, generate, generate_text_simple, get_tokenizer, preset
from gptforge.checkpoint import config_to_hf, state_to_hf
from gptforge.cpu import cpu_summary
from gptforge.generation import _decode_steps
from gptforge.fast import prepare_for_inference

# Wall-clock by default; `--clock cpu` counts this process's CPU seconds instead (with --threads 1,
# the cost on one core, robust to other processes sharing the machine).
CLOCK = time.perf_counter

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "the-verdict.txt"


def hf_model(model: GPTModel, dtype: torch.dtype):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    cfg = config_to_hf(model.cfg)
    cfg.update(bos_token_id=None, eos_token_id=None)
    hf = GPT2LMHeadModel(GPT2Config(**cfg, attn_implementation="sdpa"))
    hf.load_state_dict(state_to_hf(model), strict=False)
    return hf.to(dtype).eval()


class Engine:
    """A uniform interface over the three implementations: `run(idx, n)` -> (B, T + n) ids, and
    `token_times(idx, n)` -> seconds from the call to each new token (the first is the time to
    first token; the gaps after it are the decode steps)."""

    def __init__(self, name: str, kind: str, model):
        self.name, self.kind, self.model = name, kind, model

    @torch.no_grad()
    def run(self, idx: torch.Tensor, n: int) -> torch.Tensor:
        if self.kind == "ours":
            return generate(self.model, idx, n, stop_token_ids=())
        if self.kind == "hf":
            return self._hf_generate(idx, n)
        return generate_text_simple(self.model, idx, n, self.model.cfg.context_length)

    def _hf_generate(self, idx: torch.Tensor, n: int, streamer=None) -> torch.Tensor:
        return self.model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, pad_token_id=0, eos_token_id=None, streamer=streamer)

    @torch.no_grad()
    def token_times(self, idx: torch.Tensor, n: int) -> list[float]:
        start = CLOCK()
        stamps: list[float] = []
        if self.kind == "ours":  # generate() is exactly this loop, collecting step.tokens
            config = GenerationConfig(max_new_tokens=n, stop_token_ids=())
            for _ in _decode_steps(self.model, idx, None, config, None, None):
                stamps.append(CLOCK() - start)
        elif self.kind == "hf":
            class Stamps:  # transformers calls put() with the prompt first, then each new token
                def put(self, value):
                    stamps.append(CLOCK() - start)

                def end(self):
                    pass

            self._hf_generate(idx, n, Stamps())
            stamps.pop(0)
        else:  # the seed's loop has no hook: each token's time is one more step of the loop
            ids = idx
            for _ in range(n):
                ids = generate_text_simple(self.model, ids, 1, self.model.cfg.context_length)
                stamps.append(CLOCK() - start)
        return stamps


def timings(engine: Engine, idx: torch.Tensor, n: int, repeats: int) -> tuple[float, float]:
    """(time to first token, mean seconds per decoded token after it), each the best of `repeats`."""
    runs = [engine.token_times(idx, n) for _ in range(repeats)]
    ttft = min(r[0] for r in runs)
    step = min((r[-1] - r[0]) / (len(r) - 1) for r in runs) if n > 1 else float("nan")
    return ttft, step


def best_time(fn, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = CLOCK()
        fn()
        times.append(CLOCK() - start)
    return min(times)


def copy_bandwidth() -> float:
    """Bytes per second of a large tensor copy (read + write), best of 5."""
    src = torch.ones(64 * 2**20)  # 256 MiB
    dst = torch.empty_like(src)
    seconds = best_time(lambda: dst.copy_(src), 5)
    return 2 * src.numel() * src.element_size() / seconds


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes a batch-1 decode step must read: every linear weight (the head included) once."""
    total = 0
    for module in model.modules():
        if hasattr(module, "weight_data"):  # int8, 4-bit and bf16 weight-only layers (gptforge/fast/linears.py)
            scale = module.scale
            total += module.weight_data.numel() * module.weight_data.element_size()
            total += 0 if scale is None else scale.numel() * scale.element_size()
        elif isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
        elif hasattr(module, "packed"):
            total += module.in_features * module.out_features * 2
    return total


@torch.no_grad()
def quality_against(reference: GPTModel, model: GPTModel, ids: torch.Tensor) -> tuple[float, float, float]:
    """Teacher-forced on `ids` (1, T): (top-1 agreement with the reference, mean KL(ref || model) in
    nats, the model's cross-entropy in nats/token)."""
    ref = reference(ids[:, :-1]).float().log_softmax(-1)
    out = model(ids[:, :-1]).float().log_softmax(-1)
    top1 = (ref.argmax(-1) == out.argmax(-1)).float().mean().item()
    kl = (ref.exp() * (ref - out)).sum(-1).mean().item()
    ce = torch.nn.functional.nll_loss(out.flatten(0, 1), ids[:, 1:].flatten()).item()
    return top1, kl, ce


def agreement(a: torch.Tensor, b: torch.Tensor, start: int) -> tuple[float, int]:
    """Fraction of equal generated tokens, and the first position where they differ (or length)."""
    a, b = a[:, start:], b[:, start:]
    same = a == b
    first = [int((~row).nonzero()[0]) if (~row).any() else row.numel() for row in same]
    return same.float().mean().item(), min(first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens (smoke test)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per figure, best kept (default 2)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall-clock time (default) or this process's CPU time (use with --threads 1 on a busy machine)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--simple-long", action="store_true", help="also time generate_text_simple for 512 tokens")
    args = parser.parse_args()
    global CLOCK
    if args.clock == "cpu":
        CLOCK = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    short, long, batch8_new = (32, 64, 32) if args.quick else (128, 512, 128)
    prefill_long = 256 if args.quick else 1024

    torch.manual_seed(123)
    base = GPTModel(preset("gpt2-124m")).eval()
    engines = [
        Engine("gptforge fp32", "ours", prepare_for_inference(copy.deepcopy(base), "float32")),
        Engine("gptforge bf16", "ours", prepare_for_inference(copy.deepcopy(base), "bfloat16")),
        Engine("gptforge int8", "ours", prepare_for_inference(copy.deepcopy(base), quantize="int8")),
        Engine("transformers fp32", "hf", hf_model(base, torch.float32)),
        Engine("transformers bf16", "hf", hf_model(base, torch.bfloat16)),
        Engine("seed generate_text_simple", "simple", base),
    ]
    by_name = {e.name: e for e in engines}
    print(cpu_summary())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock}-clock time; GPT-2 124M "
          f"random weights (gpt2-124m preset, torch.manual_seed(123)); best of {args.repeats} runs")

    # ---- greedy agreement before timing
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 50257, (4, 16), generator=gen)
    check_new = 32 if args.quick else 64
    reference = generate_text_simple(base, prompts, check_new, 1024)
    print(f"\nGreedy agreement with generate_text_simple (fp32), 4 prompts x {check_new} new tokens:")
    for e in engines[:-1]:
        out = e.run(prompts, check_new)
        frac, first = agreement(out, reference, 16)
        print(f"  {e.name:26s} {frac * 100:6.1f}% of tokens equal, first difference at token {first}")
        if e.name.endswith("fp32") and frac < 1:
            raise SystemExit(f"{e.name} disagrees with the seed's greedy loop: timing would be meaningless")

    if DATA.exists():
        ids = torch.tensor([get_tokenizer().encode(DATA.read_text())[:1025]])
        print("\nQuality against fp32, teacher-forced on the first 1024 tokens of the-verdict.txt")
        print("(random weights, so the cross-entropy itself is meaningless; the gaps are the cost):")
        for e in engines[:3]:
            top1, kl, ce = quality_against(base, e.model, ids)
            print(f"  {e.name:26s} top-1 agreement {top1 * 100:6.2f}%  KL {kl:8.4f} nats  cross-entropy {ce:9.3f} nats")
        # PyTorch's default init gives very peaked logits; GPT-2's init (std 0.02) nearly flat ones,
        # where any rounding can flip the argmax: a pessimistic case.
        torch.manual_seed(123)
        flat = GPTModel(preset("gpt2-124m").replace(init="gpt2")).eval()
        print("  the same with GPT-2's initialisation (std 0.02: nearly flat logits, a pessimistic case):")
        for dtype, quantize in (("bfloat16", "none"), ("float32", "int8")):
            top1, kl, ce = quality_against(flat, prepare_for_inference(copy.deepcopy(flat), dtype, quantize), ids)
            label = "gptforge " + ("int8" if quantize == "int8" else "bf16")
            print(f"  {label:26s} top-1 agreement {top1 * 100:6.2f}%  KL {kl:8.4f} nats  cross-entropy {ce:9.3f} nats")
        del flat

    # ---- prefill / time to first token
    rows: dict[str, dict[str, float]] = {e.name: {} for e in engines}
    for b, t in ((1, prefill_long), (8, 128)):
        idx = torch.randint(0, 50257, (b, t), generator=gen)
        for e in engines:
            if e.kind == "simple" and b == 8:
                continue
            ttft, _ = timings(e, idx, 1, args.repeats)
            rows[e.name][f"prefill {b}x{t} tok/s"] = b * t / ttft
            rows[e.name][f"TTFT {b}x{t} ms"] = ttft * 1e3

    # ---- decode
    for b, n in ((1, short), (1, long), (8, batch8_new)):
        idx = torch.randint(0, 50257, (b, 16), generator=gen)
        for e in engines:
            if e.kind == "simple" and (b == 8 or (n == long and not args.simple_long)):
                continue
            _, step = timings(e, idx, n, args.repeats)
            rows[e.name][f"decode b{b} {n} tok/s"] = b / step

    # ---- per-token cost at position ~900 vs ~10
    for e in engines[:5]:
        costs = []
        for t in (8, 888):
            idx = torch.randint(0, 50257, (1, t), generator=gen)
            costs.append(timings(e, idx, 24, args.repeats)[1])
        rows[e.name]["ms/token @~10"] = costs[0] * 1e3
        rows[e.name]["ms/token @~900"] = costs[1] * 1e3
        rows[e.name]["cost 900 / 10"] = costs[1] / costs[0]

    # ---- report
    metrics = list(dict.fromkeys(k for r in rows.values() for k in r))
    peer = rows["transformers fp32"]
    width = max(len(m) for m in metrics)
    print("\n" + " " * width + "".join(f"{e.name[:20]:>22s}" for e in engines))
    for m in metrics:
        print(f"{m:<{width}}" + "".join(
            f"{rows[e.name][m]:>22.2f}" if m in rows[e.name] else f"{'-':>22s}" for e in engines))
    print("\nRatios against transformers fp32 (higher is better; TTFT as a speed-up):")
    for m in metrics:
        if "tok/s" not in m and not m.startswith("TTFT"):
            continue
        cells = []
        for e in engines:
            if m not in rows[e.name]:
                cells.append(f"{'-':>22s}")
                continue
            ratio = peer[m] / rows[e.name][m] if m.startswith("TTFT") else rows[e.name][m] / peer[m]
            cells.append(f"{ratio:>21.2f}x")
        print(f"{m:<{width}}" + "".join(cells))

    bandwidth = copy_bandwidth()
    print(f"\nMemory-bandwidth floor: copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    for name in ("gptforge fp32", "gptforge bf16", "gptforge int8"):
        nbytes = weight_bytes_per_token(by_name[name].model)
        measured = rows[name][f"decode b1 {short} tok/s"]
        print(f"  {name:14s} {nbytes / 2**20:7.1f} MiB of weights per token -> floor {bandwidth / nbytes:6.1f} tok/s; "
              f"measured {measured:6.1f} ({measured / (bandwidth / nbytes) * 100:.0f}% of the floor)")
    hf_names = ("transformers fp32", "transformers bf16")
    for name in ("gptforge fp32", "gptforge bf16", "gptforge int8"):
        r = rows[name]
        print(f"{name}: decode b1 {short} {r[f'decode b1 {short} tok/s'] / peer[f'decode b1 {short} tok/s']:.2f}x "
              f"transformers fp32; batch 8 / batch 1 = "
              f"{r[f'decode b8 {batch8_new} tok/s'] / r[f'decode b1 {short} tok/s']:.2f}x; "
              f"900th/10th token cost {r['cost 900 / 10']:.2f}")
    print(f"TTFT 1x{prefill_long} bf16: gptforge {rows['gptforge bf16'][f'TTFT 1x{prefill_long} ms']:.0f} ms, "
          f"transformers {rows[hf_names[1]][f'TTFT 1x{prefill_long} ms']:.0f} ms -> "
          f"{rows[hf_names[1]][f'TTFT 1x{prefill_long} ms'] / rows['gptforge bf16'][f'TTFT 1x{prefill_long} ms']:.2f}x")


if __name__ == "__main__":
    main()
