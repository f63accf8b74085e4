#!/usr/bin/env bash
# GPU check, ready to run on any CUDA machine with gptforge installed (pip install -e .):
#   bash benchmarks/gpu_check.sh [STEPS]            (default 300 steps; OUT=/tmp/gpu-check)
#
# 1. trains GPT-2 124M (context 1024, batch 16, bf16 autocast, torch.compile, SDPA flash attention)
#    for STEPS steps on --device cuda, from llm.c-format token shards made here from a text file;
#    prints tokens/s and MFU against the GPU's bf16 dense peak (H100 SXM 989, H200 989, A100 312 TFLOP/s);
# 2. peak memory of a training step with and without activation checkpointing (124M and 355M);
# 3. generate, eval (perplexity) and serve (one completion) with the trained checkpoint on cuda.
# Exits non-zero at the first failure. Needs no network: the text comes from shared/data or is made up.
set -euo pipefail
STEPS="${1:-300}"
OUT="${OUT:-/tmp/gpu-check}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python}"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
rm -rf "$OUT" && mkdir -p "$OUT"

"$PY" - "$OUT" <<'EOF'
import sys, torch
assert torch.cuda.is_available(), "no CUDA device: this check needs a GPU"
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
print("flash SDPA enabled:", torch.backends.cuda.flash_sdp_enabled())
EOF

# Token shards (llm.c format) from the Shakespeare corpus, or made-up text, repeated to ~20M tokens.
"$PY" - "$OUT" "$ROOT" <<'EOF'
import random, sys
from pathlib import Path
import numpy as np
from gptforge.sources import write_shard
from gptforge.tokenizer import get_tokenizer
out, root = Path(sys.argv[1]), Path(sys.argv[2])
text_file = root.parent / "shared" / "data" / "tinyshakespeare.txt"
if text_file.exists():
    text = text_file.read_text()
else:
    rng = random.Random(0)
    words = "the king said that a man would go to the sea and find gold in a ship of old wood".split()
    text = "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(50_000))
ids = np.asarray(get_tokenizer().encode(text), dtype=np.uint16)
(out / "shards").mkdir()
write_shard(out / "shards" / "check_val_000000.bin", ids[: len(ids) // 10])
write_shard(out / "shards" / "check_train_000001.bin", np.tile(ids, max(1, 20_000_000 // len(ids))))
(out / "eval.txt").write_text(text[:200_000])
print(f"shards: {len(ids):,} tokens of text, repeated")
EOF

train() {  # $1: run name, then extra flags
    local name="$1"; shift
    "$PY" -m gptforge train --data "$OUT/shards" --model gpt2-124m --out "$OUT/$name" --device cuda \
        --precision bf16 --compile --batch-size 16 --max-steps "$STEPS" --warmup-steps 20 --lr 6e-4 \
        --eval-every 100 --eval-batches 10 --checkpoint-every 0 --sample-tokens 20 --no-progress "$@"
}

peak_report() {  # $1: run folder, $2: label
    "$PY" - "$1" "$2" <<'EOF'
import json, sys, torch
from pathlib import Path
run, label = Path(sys.argv[1]), sys.argv[2]
recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
steps = [r for r in recs if r["kind"] == "train"][10:]  # past compilation and warmup
tok_s = sorted(r["tokens_per_s"] for r in steps)[len(steps) // 2]
n, L, T, d, V = 124e6, 12, 1024, 768, 50257
flops_per_token = 6 * (L * 12 * d * d + V * d) + 12 * L * T * d
name = torch.cuda.get_device_name(0)
peak = next((p for key, p in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12),
                              ("A10", 125e12), ("4090", 165e12)) if key in name), None)
mfu = f"{100 * tok_s * flops_per_token / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s" if peak else "peak unknown"
evals = [r for r in recs if r["kind"] == "eval"]
print(f"{label}: median {tok_s:,.0f} tokens/s, MFU {mfu}; last val loss {evals[-1]['val_loss']:.3f}")
EOF
}

START=$(date +%s)
train plain
peak_report "$OUT/plain" "bf16 + compile + flash SDPA"
MEM="$OUT/memory.py"
cat > "$MEM" <<'EOF'
import sys, torch
from gptforge.model import GPTModel
from gptforge.config import preset
model = GPTModel(preset(sys.argv[1])).cuda().train()
x = torch.randint(0, 50257, (int(sys.argv[2]), 1024), device="cuda")
for checkpointing in (False, True):
    model.grad_checkpointing = checkpointing
    model.zero_grad(set_to_none=True)
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", torch.bfloat16):
        model(x, targets=x).backward()
    print(f"{sys.argv[1]} batch {sys.argv[2]} x 1024, grad_checkpointing={checkpointing}: "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
EOF
"$PY" "$MEM" gpt2-124m 16
"$PY" "$MEM" gpt2-355m 8
echo "training took $(( $(date +%s) - START )) s"

CKPT="$OUT/plain/checkpoint"
"$PY" -m gptforge generate "First Citizen:" --model "$CKPT" --device cuda --max-new-tokens 40 --no-stream
"$PY" -m gptforge eval --data "$OUT/eval.txt" --model "$CKPT" --device cuda
PORT=$(( 20000 + RANDOM % 20000 ))
"$PY" -m gptforge serve --model "$CKPT" --served-model-name check --device cuda --port "$PORT" > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do
    curl -sf "http://127.0.0.1:$PORT/v1/models" > /dev/null 2>&1 && break
    sleep 1
done
curl -sf "http://127.0.0.1:$PORT/v1/completions" -H 'Content-Type: application/json' \
    -d '{"model": "check", "prompt": "First Citizen:", "max_tokens": 20}'
echo
kill "$SERVER"
wait "$SERVER" 2>/dev/null || true
echo "gpu_check: all passed"
