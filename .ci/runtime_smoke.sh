#!/usr/bin/env bash
# Every verb end to end in the runtime-only environment (`pip install torch==2.13.0 -e .` and
# nothing else), so an import a verb makes that is not a runtime dependency fails here, not for a
# user. Exits non-zero when any verb fails. A new verb adds its own block below.
# Usage: .ci/runtime_smoke.sh [VENV]   (default: .venv-runtime; corpora from ../shared/data or $GPTFORGE_DATA_DIR)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-runtime}
GF=$VENV/bin/gptforge
PY=$VENV/bin/python
VERDICT=${GPTFORGE_DATA_DIR:-../shared/data}/the-verdict.txt
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
TMP=$(mktemp -d)
SERVER=
cleanup() { [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null; rm -rf "$TMP"; }
trap cleanup EXIT
say() { echo "runtime smoke: $*" >&2; }
fail() { say "FAILED: $*"; exit 1; }

# The environment must really be runtime-only: test extras here would hide a missing dependency.
"$PY" -c "import importlib.util as u, sys; extra = [m for m in ('pytest', 'transformers', 'llms_from_scratch') if u.find_spec(m)]; sys.exit(f'test-only packages installed: {extra}' if extra else 0)"

say "info"
"$GF" info gpt2-124m >"$TMP/info.txt" || fail "info"
grep -q "124" "$TMP/info.txt" || fail "info printed no parameter count"

say "generate (the built-in default model)"
"$GF" generate "Every effort moves you" --max-new-tokens 8 --no-stream >"$TMP/gen.txt" || fail "generate"
[ "$(wc -w <"$TMP/gen.txt")" -gt 4 ] || fail "generate printed almost nothing: $(cat "$TMP/gen.txt")"

say "train (tiny gpt2-124m shape on the-verdict, 2 steps, with its plot and progress bar)"
[ -f "$VERDICT" ] || fail "corpus not found: $VERDICT"
"$GF" train --data "$VERDICT" --model gpt2-124m --set n_layers=1 --set emb_dim=64 --set n_heads=2 \
    --set context_length=32 --batch-size 2 --max-steps 2 --eval-every 1 --eval-batches 1 --sample-tokens 4 \
    --out "$TMP/run" >"$TMP/train.out" 2>"$TMP/train.err" || { cat "$TMP/train.err" >&2; fail "train"; }
[ -s "$TMP/run/loss.png" ] || fail "train wrote no loss.png"
grep -q "2/2" "$TMP/train.err" || fail "train showed no progress bar"
[ "$(grep -c '"kind": "train"' "$TMP/run/metrics.jsonl")" -eq 2 ] || fail "train logged no 2 steps"

say "convert (to hf and back)"
"$GF" convert "$TMP/run/checkpoint" --to hf --out "$TMP/hf" >/dev/null || fail "convert --to hf"
"$GF" convert "$TMP/hf" --to gptforge --out "$TMP/back" >/dev/null || fail "convert --to gptforge"
"$GF" info "$TMP/back" >/dev/null || fail "info on the converted checkpoint"

say "convert (to GGUF q4_0 and read back)"
"$GF" convert gptforge-shakespeare --to gguf --out "$TMP/m.gguf" --gguf-type q4_0 >/dev/null || fail "convert --to gguf"
"$GF" generate "ROMEO:" --model "$TMP/m.gguf" --max-new-tokens 4 --quantize int4 --no-stream >/dev/null || fail "generate on a GGUF file"

say "serve (start, one completion, stop)"
PORT=$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$GF" serve --model "$TMP/back" --port "$PORT" 2>"$TMP/serve.err" &
SERVER=$!
"$PY" - "$PORT" <<'EOF' || { cat "$TMP/serve.err" >&2; fail "serve"; }
import json, sys, time, urllib.request

base = f"http://127.0.0.1:{sys.argv[1]}"
for _ in range(240):  # the server imports torch and loads the model first
    try:
        urllib.request.urlopen(base + "/health", timeout=1)
        break
    except OSError:
        time.sleep(0.25)
model = json.load(urllib.request.urlopen(base + "/v1/models", timeout=10))["data"][0]["id"]
body = {"model": model, "prompt": "Every effort", "max_tokens": 4}
request = urllib.request.Request(base + "/v1/completions", headers={"Content-Type": "application/json"},
                                 data=json.dumps(body).encode())
reply = json.load(urllib.request.urlopen(request, timeout=60))
assert reply["choices"][0]["text"], reply
# The playground page and its files come from the installed package; its inspect endpoint answers.
assert b"gptforge playground" in urllib.request.urlopen(base + "/", timeout=10).read()
assert b"setupInspect" in urllib.request.urlopen(base + "/static/app.js", timeout=10).read()
request = urllib.request.Request(base + "/v1/inspect", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"prompt": "Every effort", "attention_layers": [0]}).encode())
assert json.load(urllib.request.urlopen(request, timeout=60))["attention"][0]["heads"]
EOF
kill -INT "$SERVER"
wait "$SERVER" || [ $? -eq 130 ] || [ $? -eq 0 ] || fail "serve did not stop cleanly"
SERVER=

say "finetune classify, classify, LoRA + convert --merge-lora (the sample files, the tiny model above)"
"$GF" finetune classify --data examples/messages-train.csv --val examples/messages-val.csv --model "$TMP/back" \
    --max-length 32 --epochs 1 --eval-every 2 --out "$TMP/clf" >"$TMP/clf.out" 2>"$TMP/clf.err" \
    || { cat "$TMP/clf.err" >&2; fail "finetune classify"; }
grep -q "labels ham, spam" "$TMP/clf.out" || fail "finetune classify printed no labels: $(cat "$TMP/clf.out")"
[ -s "$TMP/clf/loss.png" ] || fail "finetune classify wrote no loss.png"
"$GF" classify --json --model "$TMP/clf/checkpoint" "Free entry to win 1000 pounds" >"$TMP/cls.json" || fail "classify"
grep -q '"probabilities"' "$TMP/cls.json" || fail "classify --json printed no probabilities"
"$GF" finetune classify --data examples/messages-train.csv --model "$TMP/back" --max-length 32 --epochs 1 \
    --lora-rank 2 --no-progress --out "$TMP/lora" >/dev/null || fail "finetune classify --lora-rank"
"$GF" convert "$TMP/lora/checkpoint" --merge-lora --to gptforge --out "$TMP/merged" >/dev/null || fail "convert --merge-lora"
"$GF" classify --model "$TMP/merged" "See you at the gym" >/dev/null || fail "classify on the merged model"

say "finetune instruct (tiny model, the sample records, 1 epoch), chat on it, judge through it"
"$PY" -c "import torch, gptforge; torch.manual_seed(0); gptforge.save(gptforge.GPTModel(dict(vocab_size=50257, context_length=128, emb_dim=32, n_heads=2, n_layers=1, drop_rate=0.0, qkv_bias=False)), '$TMP/tiny')" \
    || fail "saving a tiny model"
"$GF" finetune instruct --data examples/instruct-sample.json --test-fraction 0.1 --model "$TMP/tiny" \
    --out "$TMP/instruct" --epochs 1 --max-new-tokens 4 --no-progress >"$TMP/instruct.out" 2>&1 \
    || { cat "$TMP/instruct.out" >&2; fail "finetune instruct"; }
[ -s "$TMP/instruct/test-responses.json" ] || fail "finetune instruct wrote no test responses"
PORT=$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$GF" serve --model "$TMP/instruct/checkpoint" --served-model-name instruct --port "$PORT" 2>"$TMP/chat.err" &
SERVER=$!
"$PY" - "$PORT" <<'EOF' || { cat "$TMP/chat.err" >&2; fail "serve chat"; }
import json, sys, time, urllib.request

base = f"http://127.0.0.1:{sys.argv[1]}"
for _ in range(240):
    try:
        urllib.request.urlopen(base + "/health", timeout=1)
        break
    except OSError:
        time.sleep(0.25)
body = {"model": "instruct", "messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 4}
request = urllib.request.Request(base + "/v1/chat/completions", headers={"Content-Type": "application/json"},
                                 data=json.dumps(body).encode())
reply = json.load(urllib.request.urlopen(request, timeout=60))
assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["role"] == "assistant", reply
EOF
# A tiny model's replies are no numbers: --skip-invalid goes on (the openai client is what this exercises).
"$GF" judge --data "$TMP/instruct/test-responses.json" --url "http://127.0.0.1:$PORT/v1" --model instruct \
    --max-tokens 3 --skip-invalid >"$TMP/judge.out" 2>&1 || { cat "$TMP/judge.out" >&2; fail "judge"; }
grep -q "mean score" "$TMP/judge.out" || fail "judge printed no mean: $(cat "$TMP/judge.out")"
kill -INT "$SERVER"
wait "$SERVER" || [ $? -eq 130 ] || [ $? -eq 0 ] || fail "serve (chat) did not stop cleanly"
SERVER=

say "all verbs passed"
