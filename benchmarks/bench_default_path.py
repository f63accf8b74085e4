"""What `gptforge.generate(model, idx, 128)` gives a Python user on a plain GPTModel: decode tokens/s
before (the model's own layout) and now (the cached float32 inference view that generate() uses by
default), as ratios against transformers' GPT2LMHeadModel float32 in the same run, on the same random
GPT-2 124M weights, batch 1. Greedy outputs are checked equal first.

    python benchmarks/bench_default_path.py --clock cpu --threads 1   # robust on a busy machine
"""

from __future__ import annotations

import argparse
import time

import torch

import bench_generate as bg
from gptforge import GPTModel, generate, preset
from gptforge.cpu import cpu_summary
from gptforge.fast import inference_view


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per run (default 128)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure, best kept (default 3)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.clock == "cpu":
        bg.CLOCK = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(123)
    base = GPTModel(preset("gpt2-124m")).eval()
    idx = torch.randint(0, 50257, (1, 8), generator=torch.Generator().manual_seed(1))
    start = bg.CLOCK()
    inference_view(base)  # built once per model (and again after its weights change)
    build_s = bg.CLOCK() - start
    engines = [bg.Engine("generate(), plain model, before", "ours", base),
               bg.Engine("generate(), plain model, now (inference view)", "ours", inference_view(base)),
               bg.Engine("transformers fp32", "hf", bg.hf_model(base, torch.float32))]
    outputs = [e.run(idx, args.tokens) for e in engines]
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2]), "greedy outputs differ"
    assert torch.equal(generate(base, idx, args.tokens, stop_token_ids=()), outputs[0])
    print(f"{cpu_summary()}; torch {torch.__version__}, {torch.get_num_threads()} threads, clock {args.clock}")
    rates = {e.name: 1 / bg.timings(e, idx, args.tokens, args.repeats)[1] for e in engines}
    peer = rates["transformers fp32"]
    for name, rate in rates.items():
        print(f"{name:<48} {rate:8.1f} tok/s  {rate / peer:5.2f}x transformers fp32")
    print(f"now / before: {rates[engines[1].name] / rates[engines[0].name]:.2f}x; building the view "
          f"once per model: {build_s:.2f} s (the first call pays it; about "
          f"{build_s / (1 / rates[engines[0].name] - 1 / rates[engines[1].name]):.0f} tokens to earn it back)")


if __name__ == "__main__":
    main()
