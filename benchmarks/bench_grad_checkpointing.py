"""Activation checkpointing: peak memory and step time of one training step (forward, backward,
AdamW) of GPT-2 355M at context 1024, with and without `grad_checkpointing`, on this CPU.

    python benchmarks/bench_grad_checkpointing.py [--preset gpt2-355m] [--batch-size 1]

Each setting runs in a fresh process; its peak resident memory (ru_maxrss) is read after the step,
and the memory the model and optimizer state hold (measured after a step of a one-token batch,
which keeps almost no activations) is subtracted to give what the step's activations cost.
Prints the CPU, each figure, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from gptforge.cpu import cpu_name

STEP = r"""
import json, resource, sys, time, torch
from gptforge.config import preset
from gptforge.model import GPTModel
name, batch, checkpointing = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
torch.manual_seed(0)
model = GPTModel(preset(name).replace(drop_rate=0.0)).train()
model.grad_checkpointing = checkpointing
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
def step(t):
    x = torch.randint(0, 50257, (batch, t))
    start = time.perf_counter()
    model(x, targets=x).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start
step(1)  # weights, gradients and AdamW state exist; activations of one token are nothing
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
seconds = step(model.cfg.context_length)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_mib": peak / 1024, "base_mib": base / 1024, "seconds": seconds}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-355m")
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args()
    import torch

    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"{args.preset}, batch {args.batch_size} x context 1024, fp32, one step (forward, backward, AdamW)")
    results = {}
    for checkpointing in (False, True):
        out = subprocess.run([sys.executable, "-c", STEP, args.preset, str(args.batch_size), str(int(checkpointing))],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results[checkpointing] = r
        print(f"  grad_checkpointing={checkpointing!s:5}: peak {r['peak_mib']:,.0f} MiB (model + grads + AdamW "
              f"{r['base_mib']:,.0f} MiB, the step's activations {r['peak_mib'] - r['base_mib']:,.0f} MiB), "
              f"step {r['seconds']:.1f} s")
    off, on = results[False], results[True]
    print(f"peak memory with checkpointing: {on['peak_mib'] / off['peak_mib']:.2f}x; activation memory "
          f"{(on['peak_mib'] - on['base_mib']) / max(1.0, off['peak_mib'] - off['base_mib']):.2f}x; "
          f"step time {on['seconds'] / off['seconds']:.2f}x")


if __name__ == "__main__":
    main()
