"""Peak memory of loading a 124M-shaped checkpoint, against the weights' size and against peers.

Each load runs in a fresh subprocess; the figure is the resident-set high-water mark during the
load minus the resident set just before it (the peak is reset through /proc/self/clear_refs, so
imports do not count). Usage: python benchmarks/load_memory.py [--preset gpt2-124m]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MEASURE = r"""
import sys, torch, gptforge
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
mode, path, warmup = sys.argv[1], sys.argv[2], sys.argv[3]
def load(path):
    if mode == "gptforge":
        return gptforge.load(path).state_dict()
    if mode == "safetensors.load_file":
        from safetensors.torch import load_file
        return load_file(path + "/model.safetensors")
    import transformers
    return transformers.GPT2LMHeadModel.from_pretrained(path).state_dict()
load(warmup)  # a tiny checkpoint of the same format first: lazy imports and one-off setup
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = status("VmRSS")
state = load(path)
loaded = status("VmHWM") - before
total = sum(float(t.float().sum()) for t in state.values())  # touch every weight: lazily mapped pages come in
print(loaded, status("VmHWM") - before, status("VmRSS") - before)
"""


def measure(mode: str, path: Path, warmup: Path) -> tuple[int, int, int]:
    """(peak during the load, peak once every weight was read, resident at the end), in bytes."""
    out = subprocess.run([sys.executable, "-c", MEASURE, mode, str(path), str(warmup)], capture_output=True,
                         text=True, env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}, check=True)
    return tuple(int(n) for n in out.stdout.split()[-3:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-124m")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "src"))
    import torch

    import gptforge

    torch.manual_seed(0)
    tiny = gptforge.GPTModel(gptforge.GPTConfig(vocab_size=1000, context_length=64, emb_dim=768, n_heads=12,
                                                n_layers=1, qkv_bias=True, tie_weights=True))
    model = gptforge.GPTModel(gptforge.preset(args.preset).replace(init="gpt2"))
    weights = model.num_parameters() * 4
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, m in (("", model), ("tiny-", tiny)):
            gptforge.save(m, tmp / f"{name}ours")
            gptforge.save(m, tmp / f"{name}hf", format="hf")
            torch.save(m.state_dict(), tmp / f"{name}book.pth")
        del model
        cases = [
            ("gptforge.load, gptforge format", "gptforge", "ours"),
            ("gptforge.load, Hugging Face safetensors", "gptforge", "hf"),
            ("gptforge.load, book state dict (.pth)", "gptforge", "book.pth"),
            ("peer: safetensors.torch.load_file (tensors only)", "safetensors.load_file", "hf"),
            ("peer: transformers GPT2LMHeadModel.from_pretrained", "transformers", "hf"),
        ]
        print(f"{args.preset}: {weights / 2**20:,.1f} MiB of fp32 weights "
              f"({weights // 4:,} parameters, tied head counted once)")
        print("peak: RSS high-water mark minus RSS before the load; 'read' once every weight was read")
        print(f"{'load':<52} {'peak MiB':>9} {'/weights':>9} {'read MiB':>9} {'/weights':>9}")
        for label, mode, name in cases:
            peak, read, _ = measure(mode, tmp / name, tmp / f"tiny-{name}")
            print(f"{label:<52} {peak / 2**20:>9,.1f} {peak / weights:>9.2f} {read / 2**20:>9,.1f} "
                  f"{read / weights:>9.2f}")


if __name__ == "__main__":
    main()
