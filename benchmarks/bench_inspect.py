"""POST /v1/inspect on GPT-2 124M shapes (random weights) for a 128-token prompt, through the
server's app (FastAPI's TestClient: routing, the forward pass, JSON), against transformers'
GPT2LMHeadModel on the same weights with `output_attentions=True` (eager attention, the peer that
returns the same weights) and against gptforge's own plain forward (no weights kept).

Requests timed, as the page sends them:
- Inspect: the attention of one layer, the logit lens top-5 for every layer and position;
- all layers: the attention of all 12 layers (the largest answer the endpoint gives here);
- Step: no attention, no lens, the next token's top-20 distribution after sampling.

    python benchmarks/bench_inspect.py [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch
from fastapi.testclient import TestClient

from gptforge import GPTModel, preset
from gptforge.checkpoint import config_to_hf, state_to_hf
from gptforge.cpu import cpu_summary
from gptforge.fast import prepare_for_inference
from gptforge.scheduler import BatchScheduler
from gptforge.serve import ServeSettings, create_app
from gptforge.tokenizer import get_tokenizer

TOKENS = 128


def best(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPTModel(preset("gpt2-124m").replace(init="gpt2")).eval()
    ids = (torch.arange(TOKENS) * 379 % 50000).tolist()  # 128 distinct ordinary tokens

    from transformers import GPT2Config, GPT2LMHeadModel
    hf_cfg = config_to_hf(model.cfg)
    hf = GPT2LMHeadModel(GPT2Config(**hf_cfg, attn_implementation="eager")).eval()
    hf.load_state_dict(state_to_hf(model), strict=False)
    x = torch.tensor([ids])

    def hf_forward() -> None:
        with torch.no_grad():
            hf(x, output_attentions=True)

    prepare_for_inference(model, "auto")  # as `gptforge serve` does

    def plain_forward() -> None:
        with torch.no_grad():
            model(x)

    app = create_app(BatchScheduler(model, get_tokenizer()), ServeSettings(model_name="gpt2"))
    requests = {
        "Inspect (1 layer's attention + lens top-5)": {"attention_layers": [11], "logit_lens_top_k": 5},
        "all 12 layers' attention + lens top-5": {"logit_lens_top_k": 5},
        "Step (top-20 next token, no attention)": {"attention_layers": [], "logit_lens_top_k": 0,
                                                   "next_token": {"temperature": 0.8, "top_k": 40, "seed": 1}},
    }
    print(f"# python benchmarks/bench_inspect.py --repeats {args.repeats} --threads {args.threads}")
    print(cpu_summary())
    print(f"torch {torch.__version__}, {args.threads} thread(s), GPT-2 124M shapes (random weights), "
          f"{TOKENS}-token prompt, best of {args.repeats}")
    t_hf = best(hf_forward, args.repeats)
    t_plain = best(plain_forward, args.repeats)
    print(f"{'what':50s} {'ms':>8s} {'answer KB':>10s} {'vs transformers':>16s}")
    print(f"{'transformers forward, output_attentions=True':50s} {t_hf * 1e3:8.0f} {'':>10s} {1.0:15.2f}x")
    print(f"{'gptforge plain forward (no weights kept)':50s} {t_plain * 1e3:8.0f} {'':>10s} {t_plain / t_hf:15.2f}x")
    with TestClient(app) as client:
        for name, body in requests.items():
            sizes = []

            def call() -> None:
                r = client.post("/v1/inspect", json={"prompt": ids, **body})
                assert r.status_code == 200, r.text
                sizes.append(len(r.content))

            t = best(call, args.repeats)
            print(f"{'POST /v1/inspect: ' + name:50s} {t * 1e3:8.0f} {sizes[-1] / 1024:10.0f} {t / t_hf:15.2f}x")


if __name__ == "__main__":
    main()
