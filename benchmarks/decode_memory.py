"""Peak resident memory of loading and decoding a GPT-2-shaped model in each mode, against the
weights' own bytes: gptforge (what `gptforge generate --model DIR [--dtype/--quantize]` does, on a
float32 checkpoint, the usual way a trained model is run) and llama.cpp (`llama-bench` on the GGUF of the
same weights in the matching type, which llama.cpp maps from the file).

Each figure is one fresh process run through `/usr/bin/time` (its maximum resident set: anonymous
memory and the mapped file's pages it touched, both). gptforge's run also reports the peaks of
each apart, anonymous memory (its own copies) and file pages (a mapped file's, which the kernel
can drop and read again), and the anonymous memory it holds after decoding. The weights' bytes are those a mode
keeps: every parameter in float32 or bf16, or the linear layers in int8 (+ per-row scales) or Q4_0
(+ per-group scales) and the rest in float32; llama.cpp's, the GGUF file's size.

    python benchmarks/decode_memory.py --size 1558m --llama-bench /path/to/llama-bench
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gptforge import GPTModel, preset, save
from gptforge.cpu import cpu_summary

RESULTS = Path(__file__).resolve().parent / "results"
# mode -> (prepare_for_inference's dtype and quantize: the CLI's --dtype and --quantize, llama.cpp GGUF type)
MODES = {
    "fp32": (("auto", "none"), "f32"),
    "bf16": (("bfloat16", "none"), "bf16"),
    "int8": (("auto", "int8"), "q8_0"),
    "int4": (("auto", "int4"), "q4_0"),
}
# The gptforge process: what `gptforge generate --model DIR [--dtype/--quantize]` does (load,
# prepare_for_inference, generate), while a thread samples its resident memory every 10 ms,
# anonymous (its own copies) and file pages (a mapped file, which the kernel may drop and read
# again) apart; it prints their peaks and, after decoding, the anonymous memory it then holds.
GPTFORGE = """
import sys, threading, time
import torch, gptforge
peak = {"RssAnon": 0, "RssFile": 0}
def rss():
    return {line.split(":")[0]: int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("Rss")}
def sample():
    while True:
        for key, value in rss().items():
            if key in peak:
                peak[key] = max(peak[key], value)
        time.sleep(0.01)
threading.Thread(target=sample, daemon=True).start()
path, dtype, quantize = sys.argv[1:4]
model = gptforge.prepare_for_inference(gptforge.load(path), dtype, quantize)
gptforge.generate(model, torch.tensor([[15496, 11, 314, 716]]), 16)
time.sleep(0.05)
print("MEMORY", *(f"{k}={v}" for k, v in peak.items()), f"after={rss()['RssAnon']}")
"""


def weight_bytes(model: GPTModel, mode: str) -> int:
    """Bytes of the weights as gptforge keeps them in `mode`: the linear layers (the output head
    included, tied or not) in float32, bf16, int8 (+ a float32 scale per row) or Q4_0 codes (+ a
    float32 scale per 32), everything else (embeddings, norms, biases) in float32."""
    linear = {"fp32": lambda n, rows: 4 * n, "bf16": lambda n, rows: 2 * n,
              "int8": lambda n, rows: n + 4 * rows, "int4": lambda n, rows: n // 2 + 4 * (n // 32)}[mode]
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    others = [p for p in model.parameters() if all(p is not w for w in weights)]
    if mode != "fp32":  # a tied head is both a float32 table and a converted linear
        others += [w for w in weights if any(w is p for p in (model.tok_emb.weight,))]
    return sum(linear(w.numel(), w.shape[0]) for w in weights) + sum(4 * p.numel() for p in others)


def max_rss(command: list[str], env: dict | None = None) -> tuple[int, str]:
    """(maximum resident set in bytes, stdout) of `command`, through /usr/bin/time."""
    result = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M", *command], capture_output=True, text=True,
                            env=env, timeout=3600)
    if result.returncode:
        raise SystemExit(f"{command[0]} failed: {result.stderr[-2000:]}")
    line = next(line for line in result.stderr.splitlines() if line.startswith("MAXRSS"))
    return int(line.split()[1]) * 1024, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("124m", "355m", "774m", "1558m"), default="1558m")
    parser.add_argument("--llama-bench", metavar="PATH", help="llama.cpp's llama-bench binary (else gptforge only)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    lines = [f"decode_memory.py {' '.join(sys.argv[1:])}  ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
             cpu_summary()]

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    print("\n".join(lines), flush=True)
    torch.manual_seed(0)
    model = GPTModel(preset(f"gpt2-{args.size}").replace(init="gpt2")).eval()
    sizes = {mode: weight_bytes(model, mode) for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = save(model, Path(tmp) / "model")
        ggufs = {mode: save(model, Path(tmp) / f"model-{t}.gguf", format="gguf", gguf_type=t)
                 for mode, (_, t) in MODES.items()} if args.llama_bench else {}
        del model
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        baseline, _ = max_rss([sys.executable, "-c", "import torch, gptforge"], env)
        say(f"GPT-2 {args.size.upper()} shape, a float32 gptforge checkpoint; 16 tokens decoded; {args.threads} threads")
        say(f"(a Python process that imports torch and gptforge, nothing else, peaks at {baseline / 1e9:.2f} GB: included below)")
        say(f"{'mode':6s} {'weights GB':>10s}   {'gptforge peak GB':>16s} {'x weights':>9s}   {'peak anon':>9s} "
            f"{'file':>5s} {'after anon':>10s}   {'llama.cpp peak GB':>17s} {'x weights':>9s}")
        for mode, (flags, _) in MODES.items():
            command = [sys.executable, "-c", GPTFORGE, str(checkpoint), *flags]
            peak, stdout = max_rss(command, env)
            fields = dict(item.split("=") for item in next(
                line for line in stdout.splitlines() if line.startswith("MEMORY")).split()[1:])
            theirs = ""
            if args.llama_bench:
                their_peak, _ = max_rss([args.llama_bench, "-m", str(ggufs[mode]), "-t", str(args.threads),
                                         "-p", "0", "-n", "16", "-r", "1"])
                file_size = ggufs[mode].stat().st_size
                theirs = f"{their_peak / 1e9:17.2f} {their_peak / file_size:8.2f}x"
            say(f"{mode:6s} {sizes[mode] / 1e9:10.2f}   {peak / 1e9:16.2f} {peak / sizes[mode]:8.2f}x   "
                f"{int(fields['RssAnon']) * 1024 / 1e9:9.2f} {int(fields['RssFile']) * 1024 / 1e9:5.2f} "
                f"{int(fields['after']) * 1024 / 1e9:10.2f}   {theirs}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"decode_memory_{args.size}.txt"
    out.write_text("\n".join(lines) + "\n")
    print(f"(written to {out})")


if __name__ == "__main__":
    main()
