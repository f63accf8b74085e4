"""Activation checkpointing: the memory a forward pass keeps for backward, the peak, and the time
of forward + backward of GPT-2 355M at context 1024, with and without `grad_checkpointing`, on
this CPU.

    python benchmarks/bench_grad_checkpointing.py [--preset gpt2-355m] [--batch-size 1]

Each setting runs in a fresh process. "Kept for backward" is the resident memory after the
forward pass (the loss and its graph alive) minus before it: the activations. The peak (ru_maxrss)
also holds the weights and the gradients. Prints the CPU, each figure and the ratios. (On a GPU,
benchmarks/gpu_check.sh measures the same with torch.cuda.max_memory_allocated.)
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
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
name, batch, checkpointing = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
torch.manual_seed(0)
model = GPTModel(preset(name).replace(drop_rate=0.0)).train()
model.grad_checkpointing = checkpointing
x = torch.randint(0, 50257, (batch, model.cfg.context_length))
before = rss_mib()
start = time.perf_counter()
loss = model(x, targets=x)
held = rss_mib() - before  # what the autograd graph keeps from forward for backward
forward = time.perf_counter() - start
loss.backward()
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"held_mib": held, "peak_mib": peak, "model_mib": before, "forward_s": forward, "seconds": seconds}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-355m")
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args()
    import torch

    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"{args.preset}, batch {args.batch_size} x context 1024, fp32, forward + backward")
    results = {}
    for checkpointing in (False, True):
        out = subprocess.run([sys.executable, "-c", STEP, args.preset, str(args.batch_size), str(int(checkpointing))],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results[checkpointing] = r
        print(f"  grad_checkpointing={checkpointing!s:5}: kept from forward for backward {r['held_mib']:,.0f} MiB; "
              f"peak {r['peak_mib']:,.0f} MiB (weights {r['model_mib']:,.0f} MiB); forward + backward "
              f"{r['seconds']:.1f} s")
    off, on = results[False], results[True]
    print(f"with checkpointing: activation memory {on['held_mib'] / off['held_mib']:.2f}x, "
          f"peak {on['peak_mib'] / off['peak_mib']:.2f}x, time {on['seconds'] / off['seconds']:.2f}x")


if __name__ == "__main__":
    main()
