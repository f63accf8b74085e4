"""Finetuning verbs on the training phases of `train.py` (start_run, train_step, evaluate_and_log):
`finetune_instruct` (the book's chapter 7, `gptforge finetune instruct`).

The book's chapter-7 recipe, which the defaults follow: every parameter trains, AdamW (lr 5e-5,
weight decay 0.1 on every parameter, torch's default betas), no clipping, no schedule, 2 epochs of
batches of 8 drawn like the book's DataLoader(shuffle=True, drop_last=True), padded by its
`custom_collate_fn`; train/val loss every 5 steps over 5 batches, as its `train_model_simple`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import checkpoint
from .data import Loader
from .errors import GptforgeError
from .instruct import ALPACA, RESPONSE_KEY, InstructionData, read_records, respond, with_responses
from .io import atomic_write_bytes
from .options import check_fields, option
from .runtime import StopRequest, autocast_context
from .tokenizer import get_tokenizer
from .train import CHECKPOINT_DIR, EvalFn, LossFn, Run, evaluate_and_log, lm_loss, start_run, train_step
from .train_config import TrainConfig

RESPONSES_FILE = "test-responses.json"  # the book's instruction-data-with-response.json


def book_loop(run: Run, loader: Loader, loss_fn: LossFn, evaluate: EvalFn, eval_every: int, epochs: int,
              epoch_end: EvalFn | None = None) -> list[dict[str, Any]]:
    """The book's training loops (train_model_simple, train_classifier_simple) over the phases: a
    step per batch, `evaluate` every eval_every steps (from step 0), `epoch_end` after each epoch's
    last step. Stops early (run.interrupted) on Ctrl-C/SIGTERM. Returns the evaluation records."""
    history = []
    for epoch in range(epochs):
        run.epoch = epoch
        run.raw_model.train()
        for i, batch in enumerate(loader):
            train_step(run, [batch], loss_fn)
            if eval_every and run.step % eval_every == 0:
                history.append({"step": run.step, **evaluate_and_log(run, evaluate)})
            if epoch_end is not None and i == len(loader) - 1:
                history.append({"step": run.step, **evaluate_and_log(run, epoch_end)})
            run.step += 1
            if run.stop_requested:
                run.interrupted = True
                return history
    return history


@torch.no_grad()
def loader_loss(run: Run, loader: Loader, num_batches: int | None = None) -> float:
    """The book's `calc_loss_loader`: the mean of the first `num_batches` batch losses (all when
    None); NaN for an empty loader, which is then not iterated (no RNG drawn), as the book's."""
    if len(loader) == 0:
        return float("nan")
    n = min(num_batches or len(loader), len(loader))
    total = 0.0
    for i, (x, y) in enumerate(loader):
        if i == n:
            break
        with autocast_context(run.device, run.autocast):
            total += lm_loss(run.raw_model, (x.to(run.device), y.to(run.device))).item()
    return total / n


# --------------------------------------------------------------------------- instruction following (chapter 7)

@dataclasses.dataclass
class InstructConfig:
    """An instruction finetuning run (the book's chapter 7); the flags of `gptforge finetune instruct`."""

    data: str | None = option(None, "training records: a JSON list or JSONL of {instruction, input, output}")
    val: str | None = option(None, "validation records (loss every --eval-every steps)")
    test: str | None = option(None, "test records: greedy responses go to OUT/test-responses.json")
    test_fraction: float = option(0.0, "hold back this share of --data as test records (the book: 0.1)",
                                  minimum=0, maximum=0.9)
    val_fraction: float = option(0.0, "hold back this share of --data as validation records (the book: 0.05)",
                                 minimum=0, maximum=0.9)
    model: str | None = option(None, "the model to adapt: preset, checkpoint, HF directory or hub id")
    out: str = option("runs/instruct", "output folder: checkpoint/, metrics.jsonl, loss.png, test-responses.json")
    mask_prompt: bool = option(False, "leave the instruction and input out of the loss (the book's exercise 7.2)")
    max_length: int | None = option(None, "cut every record to this many tokens (the book's allowed_max_length; "
                                    "default: each must fit the context)", minimum=1)
    epochs: int = option(2, "passes over the training records (the book: 2)", minimum=1)
    batch_size: int = option(8, "records per step", minimum=1)
    lr: float = option(5e-5, "AdamW learning rate (constant)", above=0)
    weight_decay: float = option(0.1, "AdamW weight decay, on every trainable parameter (the book)", minimum=0)
    eval_every: int = option(5, "train/val loss every this many steps (0: never)", minimum=0)
    eval_batches: int | None = option(5, "batches per estimate (0: all)", minimum=0)
    max_new_tokens: int = option(256, "tokens per test response at most (the book: 256)", minimum=1)
    drop_rate: float = option(0.0, "dropout while finetuning (the book's chapter 7 uses 0)", minimum=0, maximum=0.99)
    seed: int = option(123, "torch seed: batch order, dropout", minimum=0)
    precision: str = option("fp32", "fp32 (exact to the book), auto or bf16 autocast",
                            choices=("auto", "bf16", "fp32"))
    device: str = option("auto", "auto, cpu, cuda, cuda:N, mps")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        check_fields(self)
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise GptforgeError(f"--{f.name.replace('_', '-')} must be one of {', '.join(choices)}, "
                                    f"got {getattr(self, f.name)!r}")

    def train_config(self) -> TrainConfig:
        """The TrainConfig the phases run with: the book's optimizer and loop settings."""
        return TrainConfig(
            data=self.data, model=self.model or "", out=self.out, seed=self.seed, epochs=self.epochs,
            batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay, schedule="constant",
            decay="all", beta1=0.9, beta2=0.999, grad_clip=0.0, eval_every=self.eval_every,
            eval_batches=self.eval_batches, sample_tokens=0, checkpoint_every=0, precision=self.precision,
            device=self.device, data_order="book", progress=self.progress,
        )


@dataclasses.dataclass
class InstructResult:
    """What an instruction run did: the checkpoint (with the prompt template), the test responses
    (None without test records), the last losses and the evaluation records."""

    checkpoint: Path
    responses: Path | None
    steps: int
    train_loss: float | None
    val_loss: float | None
    history: list[dict[str, Any]]
    interrupted: bool = False


def _split_records(cfg: InstructConfig) -> tuple[list[dict], list[dict] | None, list[dict] | None]:
    """(train, val, test) records: the files given, or shares held back from --data in the book's
    order (training records first, then test, then validation)."""
    if not cfg.data:
        raise GptforgeError("no training data: pass --data FILE (JSON or JSONL instruction records)")
    records = read_records(cfg.data)
    for name in ("val", "test"):
        if getattr(cfg, name) and getattr(cfg, f"{name}_fraction"):
            raise GptforgeError(f"give --{name} or --{name}-fraction, not both")
    n_test, n_val = int(len(records) * cfg.test_fraction), int(len(records) * cfg.val_fraction)
    train = records[:len(records) - n_test - n_val]
    test = read_records(cfg.test) if cfg.test else records[len(train):len(train) + n_test] or None
    val = read_records(cfg.val) if cfg.val else records[len(records) - n_val:] if n_val else None
    if not train:
        raise GptforgeError(f"--test-fraction and --val-fraction leave no training records of {len(records)}")
    return train, val, test


def _evaluator(cfg: InstructConfig, train: Loader, val: Loader | None) -> EvalFn:
    """Train and validation loss over eval_batches batches: the book's `evaluate_model`."""
    def evaluate(run: Run) -> dict[str, Any]:
        metrics = {"train_loss": loader_loss(run, train, cfg.eval_batches or None)}
        if val is not None:
            metrics["val_loss"] = loader_loss(run, val, cfg.eval_batches or None)
        return metrics
    return evaluate


def _sampler(record: dict[str, str]) -> EvalFn:
    """The book's `generate_and_print_sample` after each epoch: a greedy response to one record."""
    def sample(run: Run) -> dict[str, Any]:
        return {"sample": respond(run.raw_model, [record], max_new_tokens=50)[0]}
    return sample


def load_for_finetuning(name: str, seed: int, drop_rate: float) -> nn.Module:
    """The model to adapt: GPT-2's vocabulary required, fp32 master weights (--precision sets the
    compute), `torch.manual_seed(seed)` first (a preset's random weights), dropout set."""
    model_cfg = checkpoint.load_config(name)
    if model_cfg.vocab_size < get_tokenizer().vocab_size:
        raise GptforgeError(f"{name} has vocab_size {model_cfg.vocab_size}, fewer than GPT-2's "
                            f"{get_tokenizer().vocab_size} token ids; finetune a GPT-2-vocabulary model")
    torch.manual_seed(seed)
    model = checkpoint.load(name, dtype=torch.float32)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = drop_rate
    model.cfg = model.cfg.replace(drop_rate=drop_rate)
    return model


def finetune_instruct(config: InstructConfig | None = None, /, **options: Any) -> InstructResult:
    """Teach a GPT model to follow instructions; the Python twin of `gptforge finetune instruct`.

    `finetune_instruct(data="train.json", val="val.json", test="test.json", model="gpt2",
    out="runs/instruct")`; options are InstructConfig's fields. Writes OUT/checkpoint (with the
    Alpaca prompt template in its config), OUT/metrics.jsonl, OUT/loss.png and, with test records,
    OUT/test-responses.json (each record with its greedy `model_response`, as the book's)."""
    cfg = dataclasses.replace(config, **options) if config is not None else InstructConfig(**options)
    if not cfg.model:
        raise GptforgeError("no model to finetune: pass --model (a preset, checkpoint, HF directory or hub id)")
    train, val, test = _split_records(cfg)
    context = checkpoint.load_config(cfg.model).context_length

    def data(records: Sequence[dict] | None, source: str) -> InstructionData | None:
        return None if records is None else InstructionData(
            records, context, max_length=cfg.max_length, mask_prompt=cfg.mask_prompt, source=source)

    train_data, val_data = data(train, cfg.data), data(val, cfg.val or "validation records")
    loader = Loader(train_data, cfg.batch_size, shuffle=True, drop_last=True)
    if len(loader) == 0:
        raise GptforgeError(f"{len(train)} training records are fewer than one batch of {cfg.batch_size}; "
                            "lower --batch-size or add records")
    val_loader = Loader(val_data, cfg.batch_size) if val_data is not None else None
    model = load_for_finetuning(cfg.model, cfg.seed, cfg.drop_rate)
    model.cfg = model.cfg.replace(prompt_template=ALPACA)
    torch.manual_seed(cfg.seed)  # the book reseeds before its optimizer and loop
    with StopRequest() as stop:
        run = start_run(cfg.train_config(), model, cfg.epochs * len(loader), stop=stop)
        history = book_loop(run, loader, lm_loss, _evaluator(cfg, loader, val_loader), cfg.eval_every,
                            cfg.epochs, _sampler((val or train)[0]))
    run.progress.close()
    model = run.raw_model.eval()
    ckpt = checkpoint.save(model, run.out / CHECKPOINT_DIR)
    responses = None
    if test:
        answered = with_responses(test, respond(model, test, max_new_tokens=cfg.max_new_tokens), RESPONSE_KEY)
        responses = atomic_write_bytes(run.out / RESPONSES_FILE, json.dumps(answered, indent=4).encode())
    losses = [h for h in history if "train_loss" in h]
    return InstructResult(ckpt, responses, run.step, losses[-1]["train_loss"] if losses else None,
                          losses[-1].get("val_loss") if losses else None, history, run.interrupted)
