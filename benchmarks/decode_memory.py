"""Peak resident memory of loading and decoding a GPT-2-shaped model in each mode, against the
weights' own bytes: gptforge (`gptforge generate --model DIR [--dtype/--quantize]` on a float32
checkpoint, the usual way a trained model is run) and llama.cpp (`llama-bench` on the GGUF of the
same weights in the matching type, which llama.cpp maps from the file).

Each figure is one fresh process run through `/usr/bin/time` (its maximum resident set: anonymous
memory and the mapped file's pages it touched, both). gptforge's run also reports the peaks of
each apart: anonymous memory (its own copies) and file pages (the mapped checkpoint, which the
kernel can drop and read again). The weights' bytes are those a mode
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
# mode -> (gptforge generate flags, llama.cpp GGUF type)
MODES = {
    "fp32": ((), "f32"),
    "bf16": (("--dtype", "bfloat16"), "bf16"),
    "int8": (("--quantize", "int8"), "q8_0"),
    "int4": (("--quantize", "int4"), "q4_0"),
}
# Run in the gptforge process: a thread samples its resident memory every 10 ms, anonymous (its own
# copies) and file pages (the mapped checkpoint, which the kernel may drop and read again) apart,
# and their peaks are printed at exit.
SAMPLER = """
import atexit, threading, time, sys
_peak = {"RssAnon": 0, "RssFile": 0}
def _sample():
    while True:
        for line in open("/proc/self/status"):
            key = line.split(":")[0]
            if key in _peak:
                _peak[key] = max(_peak[key], int(line.split()[1]))
        time.sleep(0.01)
threading.Thread(target=_sample, daemon=True).start()
atexit.register(lambda: print("MEMORY", *(f"{k}={v}" for k, v in _peak.items()), file=sys.stderr))
"""


def weight_bytes(model: GPTModel, mode: str) -> int:
    """Bytes the weights take in `mode`: see the module docstring."""
    total = 0
    linears = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    for p in model.parameters():
        n = p.numel()
        if mode == "bf16":
            total += 2 * n
        elif mode in ("int8", "int4") and id(p) in linears:
            total += n + 4 * p.shape[0] if mode == "int8" else n // 2 + 4 * (n // 32)
        else:
            total += 4 * n
    return total


def max_rss(command: list[str], env: dict | None = None) -> tuple[int, str]:
    """(maximum resident set in bytes, stderr) of `command`, through /usr/bin/time."""
    result = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M", *command], capture_output=True, text=True,
                            env=env, timeout=3600)
    if result.returncode:
        raise SystemExit(f"{command[0]} failed: {result.stderr[-2000:]}")
    line = next(line for line in result.stderr.splitlines() if line.startswith("MAXRSS"))
    return int(line.split()[1]) * 1024, result.stderr


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
        say(f"GPT-2 {args.size.upper()} shape, a float32 gptforge checkpoint; 16 tokens decoded; {args.threads} threads")
        say(f"{'mode':6s} {'weights GB':>10s}   {'gptforge peak GB':>16s} {'x weights':>9s}   {'peak anon':>9s} "
            f"{'file':>5s}   {'llama.cpp peak GB':>17s} {'x weights':>9s}")
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        for mode, (flags, _) in MODES.items():
            command = [sys.executable, "-c",
                       SAMPLER + "import sys; sys.argv = ['gptforge'] + sys.argv[1:]; "
                       "from gptforge.cli import main; main()",
                       "generate", "Hello", "--model", str(checkpoint), "--max-new-tokens", "16", "--seed", "0", *flags]
            peak, stderr = max_rss(command, env)
            fields = dict(item.split("=") for item in next(
                line for line in stderr.splitlines() if line.startswith("MEMORY")).split()[1:])
            theirs = ""
            if args.llama_bench:
                their_peak, _ = max_rss([args.llama_bench, "-m", str(ggufs[mode]), "-t", str(args.threads),
                                         "-p", "0", "-n", "16", "-r", "1"])
                file_size = ggufs[mode].stat().st_size
                theirs = f"{their_peak / 1e9:17.2f} {their_peak / file_size:8.2f}x"
            say(f"{mode:6s} {sizes[mode] / 1e9:10.2f}   {peak / 1e9:16.2f} {peak / sizes[mode]:8.2f}x   "
                f"{int(fields['RssAnon']) * 1024 / 1e9:9.2f} {int(fields['RssFile']) * 1024 / 1e9:5.2f}   {theirs}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"decode_memory_{args.size}.txt"
    out.write_text("\n".join(lines) + "\n")
    print(f"(written to {out})")


if __name__ == "__main__":
    main()
