"""Finetuning verbs on the training phases of `train.py` (start_run, train_step, evaluate_and_log):
`finetune_classify` (the book's chapter 6, `gptforge finetune classify`), with LoRA (appendix E).

The book's recipe, which the defaults follow: texts padded with 50256 to the longest training text,
a new head Linear(emb_dim, num_classes) created right after `torch.manual_seed(seed)`, only the last
transformer block, the final norm and the head trainable, AdamW (lr 5e-5, weight decay 0.1 on every
trainable parameter, torch's default betas), no clipping, no schedule, 5 epochs of batches of 8 drawn
like the book's DataLoader(shuffle=True, drop_last=True); train/val loss every `eval_every` steps over
`eval_batches` batches and accuracy after each epoch. One improvement is the default: `pool=
"last-real"` reads the last real token (Hugging Face's GPT2ForSequenceClassification) where the book
reads the last position even when it is padding; `pool="last"` is the book's, exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import checkpoint
from .classifier import (
    EncodedTexts, Loader, classification_loss, encode_texts, label_ids, label_names, loader_accuracy,
    loader_metrics, padded_length, read_labeled, to_classifier,
)
from .config import POOLS
from .errors import GptforgeError
from .options import check_fields, option
from .lora import ALL_TARGETS, DEFAULT_SCALING, SCALINGS, apply_lora, check_lora_options, count_trainable
from .runtime import StopRequest
from .tokenizer import get_tokenizer
from .train import CHECKPOINT_DIR, Run, evaluate_and_log, start_run, train_step
from .train_config import TrainConfig

TRAINABLE = ("last-block", "all", "lora")


@dataclasses.dataclass
class ClassifyConfig:
    """A classification finetuning run; the flags of `gptforge finetune classify`."""

    data: str | None = option(None, "training records: CSV, TSV, JSONL or JSON with a text and a label column")
    val: str | None = option(None, "validation records (same columns)")
    test: str | None = option(None, "test records, scored once at the end")
    model: str | None = option(None, "the model to adapt: preset, checkpoint, HF directory or hub id")
    out: str = option("runs/classifier", "output folder: checkpoint/, metrics.jsonl, loss.png")
    text_column: str = option("text", "the column holding the texts")
    label_column: str = option("label", "the column holding the labels (any strings)")
    max_length: int | None = option(None, "pad/cut every text to this many tokens (default: the longest "
                                    "training text, which must fit the context)")
    pool: str = option("last-real", "which position classifies: last-real (the last real token, as "
                       "Hugging Face) or last (the last position, padding or not: the book)", choices=POOLS)
    trainable: str = option("last-block", "what trains: last-block (last block, final norm, head: the "
                            "book), all, or lora (adapters only)", choices=TRAINABLE)
    lora_rank: int | None = option(None, "LoRA rank (implies --trainable lora; default 16 with it, the book's)",
                                   minimum=1)
    lora_alpha: float = option(16.0, "LoRA alpha (the book's 16)")
    lora_scaling: str = option(DEFAULT_SCALING, "book (update x alpha, appendix E) or peft (x alpha/rank)",
                               choices=SCALINGS)
    lora_targets: str = option(ALL_TARGETS, "Linear layers that get adapters: all (the book, head "
                               "included) or names, e.g. W_query,W_value")
    epochs: int = option(5, "passes over the training records", minimum=1)
    batch_size: int = option(8, "records per step", minimum=1)
    lr: float = option(5e-5, "AdamW learning rate (constant)", above=0)
    weight_decay: float = option(0.1, "AdamW weight decay, on every trainable parameter (the book)", minimum=0)
    eval_every: int = option(50, "train/val loss and accuracy every this many steps (0: never)", minimum=0)
    eval_batches: int | None = option(5, "batches per estimate (0: all)", minimum=0)
    drop_rate: float = option(0.0, "dropout while finetuning (the book's chapter 6 uses 0)", minimum=0, maximum=0.99)
    seed: int = option(123, "torch seed: the new head, LoRA matrices, batch order, dropout", minimum=0)
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
        if self.lora_rank is not None:
            if self.trainable not in ("lora", "last-block"):
                raise GptforgeError(f"--lora-rank trains adapters only; it cannot go with --trainable {self.trainable}")
            self.trainable = "lora"
        if self.trainable == "lora":
            self.lora_rank = self.lora_rank or 16
            check_lora_options(self.lora_rank, self.lora_alpha, self.lora_scaling)

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
class ClassifyResult:
    """What a classification run did: the final accuracies over all records (None without the
    file), the evaluation records and the saved checkpoint."""

    checkpoint: Path
    labels: tuple[str, ...]
    steps: int
    train_accuracy: float
    val_accuracy: float | None
    test_accuracy: float | None
    trainable_parameters: int
    total_parameters: int
    history: list[dict[str, Any]]
    interrupted: bool = False


@dataclasses.dataclass
class _Splits:
    train: Loader
    val: Loader | None
    test: Loader | None
    labels: tuple[str, ...]
    length: int


def _read_splits(cfg: ClassifyConfig, context_length: int) -> _Splits:
    """The three files as the book's loaders: train shuffled (drop_last), val/test in order."""
    if not cfg.data:
        raise GptforgeError("no training data: pass --data FILE (CSV/JSONL with text and label columns)")
    train = read_labeled(cfg.data, cfg.text_column, cfg.label_column)
    if len(train.texts) < cfg.batch_size:  # drop_last would leave no batch at all
        raise GptforgeError(f"{cfg.data} has {len(train.texts)} records, fewer than one batch of {cfg.batch_size}; "
                            "lower --batch-size or add records")
    names = label_names(train.labels)
    length = padded_length(train.texts, cfg.max_length, context_length, cfg.data)

    def encoded(path: str | None, labelled=None) -> EncodedTexts | None:
        if path is None:
            return None
        records = labelled or read_labeled(path, cfg.text_column, cfg.label_column)
        return encode_texts(records.texts, length, label_ids(records, names))

    return _Splits(
        train=Loader(encoded(cfg.data, train), cfg.batch_size, shuffle=True, drop_last=True),
        val=_maybe(encoded(cfg.val), cfg.batch_size), test=_maybe(encoded(cfg.test), cfg.batch_size),
        labels=names, length=length)


def _maybe(data: EncodedTexts | None, batch_size: int) -> Loader | None:
    return Loader(data, batch_size) if data is not None else None


def prepare_classifier(model: nn.Module, cfg: ClassifyConfig, labels: tuple[str, ...], length: int) -> nn.Module:
    """The book's steps, in its order: freeze everything, seed, new head, then unfreeze what trains
    (last block + final norm; everything; or LoRA adapters on the targets, the head's included)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = cfg.drop_rate
    model.cfg = model.cfg.replace(drop_rate=cfg.drop_rate)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    to_classifier(model, labels, cfg.pool, length)
    if cfg.trainable == "all":
        model.requires_grad_(True)
    elif cfg.trainable == "last-block":
        model.trf_blocks[-1].requires_grad_(True)
        model.final_norm.requires_grad_(True)
    else:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_scaling)
    return model


def _evaluator(splits: _Splits, batches: int | None) -> Callable[[Run], dict[str, Any]]:
    """Train/val loss and accuracy over `batches` batches, one pass per loader (so the global RNG
    is drawn as by the book's evaluate_model)."""
    def evaluate(run: Run) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        for name, loader in (("train", splits.train), ("val", splits.val)):
            if loader is not None:
                metrics[f"{name}_loss"], metrics[f"{name}_acc"] = loader_metrics(run.raw_model, loader, batches)
        return metrics
    return evaluate


def _epoch_accuracy(splits: _Splits, batches: int | None) -> Callable[[Run], dict[str, Any]]:
    """Accuracy after an epoch, as the book's train_classifier_simple computes it."""
    def evaluate(run: Run) -> dict[str, Any]:
        metrics = {"epoch_train_acc": loader_accuracy(run.raw_model, splits.train, batches)}
        if splits.val is not None:
            metrics["epoch_val_acc"] = loader_accuracy(run.raw_model, splits.val, batches)
        return metrics
    return evaluate


def finetune_classify(config: ClassifyConfig | None = None, /, **options: Any) -> ClassifyResult:
    """Adapt a GPT model to classify texts; the Python twin of `gptforge finetune classify`.

    `finetune_classify(data="train.csv", val="val.csv", model="gpt2", out="runs/spam")`; options
    are ClassifyConfig's fields. Writes OUT/checkpoint (a classifier checkpoint; with LoRA, an
    adapter checkpoint naming its base), OUT/metrics.jsonl and OUT/loss.png."""
    cfg = dataclasses.replace(config, **options) if config is not None else ClassifyConfig(**options)
    if not cfg.model:
        raise GptforgeError("no model to finetune: pass --model (a preset, checkpoint, HF directory or hub id)")
    model_cfg = checkpoint.load_config(cfg.model)
    if model_cfg.vocab_size < get_tokenizer().vocab_size:
        raise GptforgeError(f"{cfg.model} has vocab_size {model_cfg.vocab_size}, fewer than GPT-2's "
                            f"{get_tokenizer().vocab_size} token ids; classify with a GPT-2-vocabulary model")
    splits = _read_splits(cfg, model_cfg.context_length)
    base = checkpoint.adapter.base_reference(cfg.model) if cfg.trainable == "lora" else None  # fails early
    torch.manual_seed(cfg.seed)  # a preset's random weights
    model = checkpoint.load(cfg.model, dtype=torch.float32)  # fp32 master weights; --precision sets the compute
    prepare_classifier(model, cfg, splits.labels, splits.length)
    if base is not None:
        model.lora_base = base  # what the adapter checkpoint names as its base
    trainable, total = count_trainable(model)
    tcfg = cfg.train_config()
    torch.manual_seed(cfg.seed)  # the book reseeds before its optimizer and loop
    with StopRequest() as stop:
        run = start_run(tcfg, model, cfg.epochs * len(splits.train), stop=stop)
        run.progress.write(f"trainable parameters: {trainable:,} of {total:,} ({cfg.trainable})")
        history = _loop(run, cfg, splits)
    run.progress.close()
    model = run.raw_model.eval()
    final = {"train": loader_accuracy(model, splits.train)}
    for name in ("val", "test"):
        loader = getattr(splits, name)
        final[name] = loader_accuracy(model, loader) if loader is not None else None
    ckpt = checkpoint.save(model, run.out / CHECKPOINT_DIR)
    run.metrics.log({"kind": "final", "step": run.step, **{f"{k}_acc": v for k, v in final.items()}})
    run.metrics.plot(force=True)
    return ClassifyResult(ckpt, splits.labels, run.step, final["train"], final["val"], final["test"],
                          trainable, total, history, run.interrupted)


def _loop(run: Run, cfg: ClassifyConfig, splits: _Splits) -> list[dict[str, Any]]:
    """The book's train_classifier_simple over the phases: a step per batch, losses every
    eval_every steps, accuracy after each epoch. Returns the evaluation records."""
    evaluate, epoch_accuracy = _evaluator(splits, cfg.eval_batches), _epoch_accuracy(splits, cfg.eval_batches)
    history = []
    for epoch in range(cfg.epochs):
        run.epoch = epoch
        run.raw_model.train()
        for i, batch in enumerate(splits.train):
            train_step(run, [batch], classification_loss)
            if cfg.eval_every and run.step % cfg.eval_every == 0:
                history.append({"step": run.step, **evaluate_and_log(run, evaluate)})
            if i == len(splits.train) - 1:  # the epoch's last step: the book's accuracy after each epoch
                history.append({"step": run.step, **evaluate_and_log(run, epoch_accuracy)})
            run.step += 1
            if run.stop_requested:
                run.interrupted = True
                return history
    return history
