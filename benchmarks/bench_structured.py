"""What a grammar costs: tokens/s of constrained decoding (a JSON schema, through llguidance) against
unconstrained decoding of the same number of tokens, on the batching scheduler the server runs.

Each run decodes exactly --tokens tokens per sequence (the schema asks for a long array of records,
so the JSON never ends early; the unconstrained rows ignore <|endoftext|>), greedy, for 1 and 8
sequences at once, on the built-in model and on GPT-2 124M shapes (random weights). The grammar's
mask is filled on a worker thread while the model runs; the cost left is what the model step waits
for plus applying the mask. Prints the CPU, each tokens/s and the ratio (target: at most 1.3x).

    python benchmarks/bench_structured.py --tokens 64 --repeats 3
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gptforge import GenerationConfig, GPTModel, load, preset  # noqa: E402
from gptforge.cpu import cpu_summary  # noqa: E402
from gptforge.generation import prompt_ids  # noqa: E402
from gptforge.scheduler import BatchScheduler, SequenceState  # noqa: E402
from gptforge.structured import json_schema_grammar  # noqa: E402

RECORDS = {"type": "array", "minItems": 1000, "items": {
    "type": "object", "additionalProperties": False, "required": ["name", "age", "tags"], "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "maxItems": 3, "items": {"enum": ["red", "green", "blue"]}}}}}
PROMPTS = ["Hello, I am", "The meaning of life is", "Once upon a time", "In the beginning",
           "The quick brown fox", "import torch\n", "Dear Sir or Madam,", "It was a dark and stormy night"]


def run(scheduler: BatchScheduler, batch: int, tokens: int, constrained: bool) -> float:
    """Tokens/s of `batch` sequences of exactly `tokens` tokens each, decoded together."""
    grammar = json_schema_grammar(RECORDS) if constrained else None
    done = threading.Semaphore(0)
    config = GenerationConfig(stop_token_ids=())
    seqs = [SequenceState(prompt_ids(PROMPTS[i % len(PROMPTS)]), tokens, config,
                          lambda out: done.release() if out.finish_reason else None,
                          grammar=grammar.matcher() if grammar else None) for i in range(batch)]
    start = time.perf_counter()
    for seq in seqs:
        scheduler.submit(seq)
    for _ in seqs:
        done.acquire()
    elapsed = time.perf_counter() - start
    assert all(len(s.generated) == tokens for s in seqs), [len(s.generated) for s in seqs]
    return batch * tokens / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per sequence (default: 64)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each, interleaved, the best counts (default: 5)")
    parser.add_argument("--models", default="gptforge-shakespeare,gpt2-124m",
                        help="comma-separated: the built-in model and/or gpt2-124m (random weights)")
    args = parser.parse_args()
    print(cpu_summary())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; greedy, {args.tokens} tokens per "
          f"sequence, best of {args.repeats}; constrained = JSON schema (array of records) through llguidance")
    json_schema_grammar(RECORDS).matcher()  # the tokenizer's grammar view, built once (~1 s), outside the timing
    for name in args.models.split(","):
        if name == "gpt2-124m":
            torch.manual_seed(123)
            model = GPTModel(preset("gpt2-124m")).eval()
        else:
            model = load(name, dtype=torch.float32).eval()
        scheduler = BatchScheduler(model, max_batch_size=8)
        scheduler.start()
        try:
            run(scheduler, 1, 4, True)  # warm up: kernels, panels, the mask worker
            for batch in (1, 8):
                runs = [(run(scheduler, batch, args.tokens, False), run(scheduler, batch, args.tokens, True))
                        for _ in range(args.repeats)]  # interleaved: a drift of the machine hits both alike
                plain, grammar = (max(r[k] for r in runs) for k in (0, 1))
                print(f"{name:>22} batch {batch}: unconstrained {plain:7.1f} tok/s, constrained {grammar:7.1f} tok/s, "
                      f"cost {plain / grammar:.2f}x", flush=True)
        finally:
            scheduler.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
