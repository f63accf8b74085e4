"""Start-up: seconds from "the libraries are imported" to the first logits of a GPT-2 124M
checkpoint (random GPT-2-init weights), gptforge against transformers, side by side.

Each figure is a fresh Python process (best of `--repeats`), the checkpoint already in the page
cache (one untimed run first), so that it measures the loaders rather than the disk:

- gptforge, Hugging Face directory: `gptforge.load(dir)` + `generate(model, ids, 1)` (the first
  generate also builds the fast float32 view);
- gptforge, native directory: the same, the sha256 of the weights verified on load;
- gptforge int8 / int4, Hugging Face directory: the same, the weights quantized before the first
  logits (what `--quantize` does);
- transformers: `GPT2LMHeadModel.from_pretrained(dir)` + one forward (safetensors memory-mapped).

    python benchmarks/bench_startup.py [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from gptforge import GPTModel, save
from gptforge.cpu import cpu_summary

ROOT = Path(__file__).resolve().parents[1]

TIMED = {
    "gptforge": """
import gptforge
t0 = time.perf_counter()
model = gptforge.load(path)
t1 = time.perf_counter()
gptforge.generate(model, torch.tensor([[464, 3290, 318]]), 1)
""",
    "gptforge int8": """
import gptforge
t0 = time.perf_counter()
model = gptforge.load(path)
t1 = time.perf_counter()
gptforge.generate(gptforge.prepare_for_inference(model, "auto", "int8"), torch.tensor([[464, 3290, 318]]), 1)
""",
    "gptforge int4": """
import gptforge
t0 = time.perf_counter()
model = gptforge.load(path)
t1 = time.perf_counter()
gptforge.generate(gptforge.prepare_for_inference(model, "auto", "int4"), torch.tensor([[464, 3290, 318]]), 1)
""",
    "transformers": """
from transformers import GPT2LMHeadModel
from transformers.utils import logging
logging.set_verbosity_error(); logging.disable_progress_bar()
t0 = time.perf_counter()
model = GPT2LMHeadModel.from_pretrained(path)
t1 = time.perf_counter()
with torch.no_grad():
    model(torch.tensor([[464, 3290, 318]]))
""",
}


def run(loader: str, path: Path, threads: int) -> tuple[float, float]:
    """(load seconds, load + first logits seconds) in a fresh process."""
    code = "import sys, time, torch\npath = sys.argv[1]\n" + TIMED[loader] + \
        "print(t1 - t0, time.perf_counter() - t0)\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True, check=True)
    load_s, total_s = (float(v) for v in out.stdout.split()[-2:])
    return load_s, total_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    print(cpu_summary())
    print(f"torch {torch.__version__}, {args.threads} thread(s), best of {args.repeats} fresh processes")
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = GPTModel("gpt2-124m")
        hf_dir, native_dir = save(model, Path(tmp) / "hf", format="hf"), save(model, Path(tmp) / "native")
        del model
        cases = [("transformers, HF directory", "transformers", hf_dir),
                 ("gptforge, HF directory", "gptforge", hf_dir),
                 ("gptforge, native (sha256 checked)", "gptforge", native_dir),
                 ("gptforge --quantize int8, HF directory", "gptforge int8", hf_dir),
                 ("gptforge --quantize int4, HF directory", "gptforge int4", hf_dir)]
        results = {}
        for name, loader, path in cases:
            run(loader, path, args.threads)  # into the page cache
            results[name] = min((run(loader, path, args.threads) for _ in range(args.repeats)), key=lambda r: r[1])
    reference = results["transformers, HF directory"][1]
    print(f"{'loader':<40} {'load s':>7} {'+ first logits s':>17} {'vs transformers':>16}")
    for name, (load_s, total_s) in results.items():
        print(f"{name:<40} {load_s:>7.2f} {total_s:>17.2f} {total_s / reference:>15.2f}x")


if __name__ == "__main__":
    main()
