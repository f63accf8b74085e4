"""DPO training speed and memory: `gptforge finetune dpo` against TRL's DPOTrainer on the same
model (a random GPT-2-shaped model, saved as a gptforge checkpoint and exported to Hugging Face),
the same records (examples/preference-sample.json), batch size, beta and learning rate, full
finetuning and LoRA (rank 16 on the attention and feed-forward layers, alpha/rank scaling, as
peft), fp32 on the CPU.

Each configuration runs in its own process. Printed per configuration: tokens/s (the prompt +
response tokens of the chosen and rejected sequences, padding not counted, per second of training
step, the first step left out as warm-up) and peak resident memory (the process's maximum RSS, and
its growth from just before the model is loaded). gptforge computes the frozen reference's
log-probabilities once before the first step; TRL by default runs the reference model at every
step (a second copy of the weights when training fully; the adapters switched off with LoRA):
the `trl-full-precomputed` row is TRL with `precompute_ref_log_probs=True`, the same approach as ours.

    python benchmarks/bench_dpo.py                 # all rows (needs trl, datasets and peft)
    python benchmarks/bench_dpo.py --emb-dim 768 --layers 12 --heads 12   # GPT-2 124M's shape
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "preference-sample.json"
CONFIGS = ("gptforge-full", "trl-full", "trl-full-precomputed", "gptforge-lora", "trl-lora")


def rss_mib() -> float:
    """The current resident set size."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def real_tokens(records, tokenizer=None) -> int:
    """Prompt + response tokens of every record's chosen and rejected sequence, with the end token."""
    from gptforge.dpo import PreferenceData

    data = PreferenceData(records, 1024)
    return sum(len(s) + 1 for s in data.chosen + data.rejected)


def run_gptforge(work: Path, args, lora: bool) -> dict:
    from gptforge.dpo import finetune_dpo

    base = rss_mib()
    out = work / ("ours-lora" if lora else "ours")
    lora_opts = {"lora_rank": 16, "lora_alpha": 16.0, "lora_scaling": "peft", "lora_targets": "att,ff"} if lora else {}
    finetune_dpo(data=str(SAMPLE), model=str(work / "base"), out=str(out), batch_size=args.batch_size, epochs=1,
                 lr=args.lr, weight_decay=0.0, beta=0.1, eval_every=0, device="cpu", progress=False, **lora_opts)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["kind"] == "train"]
    seconds, seen = [], 0
    for r in steps:
        counted = r["tokens_seen"] - seen  # the step's padded tokens, what tokens_per_s divides
        seen = r["tokens_seen"]
        seconds.append(counted / r["tokens_per_s"])
    return {"step_seconds": seconds, "peak_mib": peak_rss_mib(), "growth_mib": peak_rss_mib() - base}


def run_trl(work: Path, args, lora: bool, precompute: bool) -> dict:
    import datasets
    import transformers
    import trl

    from gptforge.dpo import read_preferences
    from gptforge.instruct import ALPACA

    records = read_preferences(SAMPLE)
    dataset = datasets.Dataset.from_list([{"prompt": ALPACA.prompt(r["instruction"], r["input"]),
                                           "chosen": r["chosen"], "rejected": r["rejected"]} for r in records])
    base = rss_mib()
    model = transformers.GPT2LMHeadModel.from_pretrained(work / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(work / "hf")
    peft_config = None
    if lora:
        import peft

        peft_config = peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, fan_in_fan_out=True,
                                      target_modules=["c_attn", "c_proj", "c_fc"], task_type="CAUSAL_LM")
    seconds = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            seconds.append(time.perf_counter() - self.t)

    config = trl.DPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=args.batch_size,
                           num_train_epochs=1, learning_rate=args.lr, lr_scheduler_type="constant", weight_decay=0.0,
                           max_grad_norm=0.0, beta=0.1, logging_steps=1, save_strategy="no", report_to=[],
                           use_cpu=True, max_length=None, disable_tqdm=True, bf16=False,
                           gradient_checkpointing=False, precompute_ref_log_probs=precompute,
                           dataloader_drop_last=True)
    trainer = trl.DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config, callbacks=[Timer()])
    trainer.train()
    return {"step_seconds": seconds, "peak_mib": peak_rss_mib(), "growth_mib": peak_rss_mib() - base}


def one(name: str, work: Path, args) -> dict:
    if name.startswith("gptforge"):
        result = run_gptforge(work, args, lora=name.endswith("lora"))
    else:
        result = run_trl(work, args, lora=name.endswith("lora"), precompute=name.endswith("precomputed"))
    from gptforge.dpo import read_preferences

    records = read_preferences(SAMPLE)
    steps = len(records) // args.batch_size
    per_step = real_tokens(records[:steps * args.batch_size]) / steps  # drop_last: the records that train
    timed = result["step_seconds"][1:]  # the first step warms up
    result["tokens_per_s"] = per_step * len(timed) / sum(timed)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--emb-dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=6)
    parser.add_argument("--lr", type=float, default=5e-6)
    parser.add_argument("--only", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated rows to run")
    args = parser.parse_args()
    if args.only:
        print(json.dumps(one(args.only, Path(args.work), args)))
        return

    import torch

    from gptforge import GPTModel, save
    from gptforge.cpu import cpu_summary

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        torch.manual_seed(0)
        cfg = {"vocab_size": 50257, "context_length": 256, "emb_dim": args.emb_dim, "n_heads": args.heads,
               "n_layers": args.layers, "drop_rate": 0.0, "qkv_bias": True}
        model = GPTModel(cfg)
        save(model, work / "base")
        save(model, work / "hf", format="hf")
        params = sum(p.numel() for p in model.parameters())
        print(f"{cpu_summary()}; {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}, "
              f"torch {torch.__version__}")
        print(f"model: {params / 1e6:.1f}M parameters (emb {args.emb_dim}, {args.layers} layers, vocab 50257), "
              f"{SAMPLE.name}, batch {args.batch_size} pairs, fp32")
        rows = {}
        for name in args.configs.split(","):
            flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                     if k in ("emb_dim", "layers", "heads", "batch_size", "lr")]
            proc = subprocess.run([sys.executable, __file__, "--only", name, "--work", str(work), *flags],
                                  capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
            if proc.returncode != 0:
                print(f"{name}: failed\n{proc.stderr[-2000:]}")
                continue
            rows[name] = r = json.loads(proc.stdout.strip().splitlines()[-1])
            if len(rows) == 1:
                print(f"{'':22} {'tokens/s':>9} {'peak RSS MiB':>13} {'growth MiB':>11}")
            print(f"{name:22} {r['tokens_per_s']:9.0f} {r['peak_mib']:13.0f} {r['growth_mib']:11.0f}", flush=True)
        for kind in ("full", "lora"):
            ours, theirs = rows.get(f"gptforge-{kind}"), rows.get(f"trl-{kind}")
            if ours and theirs:
                print(f"{kind}: gptforge / TRL tokens/s x{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}, "
                      f"memory growth x{ours['growth_mib'] / theirs['growth_mib']:.2f}")


if __name__ == "__main__":
    main()
