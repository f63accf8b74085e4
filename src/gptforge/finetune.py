"""Finetuning verbs on the training phases of `train.py` (start_run, train_step, evaluate_and_log),
each the book's recipe by default, with LoRA (appendix E) as an option:

- `finetune_classify` (chapter 6, `gptforge finetune classify`): texts padded with 50256 to the
  longest training text, a new head Linear(emb_dim, num_classes) created right after
  `torch.manual_seed(seed)`, only the last transformer block, the final norm and the head
  trainable, 5 epochs; train/val loss every `eval_every` steps over `eval_batches` batches and
  accuracy after each epoch. One improvement is the default: `pool="last-real"` reads the last real
  token (Hugging Face's GPT2ForSequenceClassification) where the book reads the last position even
  when it is padding; `pool="last"` is the book's, exactly.
- `finetune_instruct` (chapter 7, `gptforge finetune instruct`): Alpaca-style records batched by
  the book's `custom_collate_fn`, every parameter trainable, 2 epochs, train/val loss every 5 steps
  over 5 batches, a greedy sample after each epoch, test responses written at the end.

Both: AdamW (lr 5e-5, weight decay 0.1 on every trainable parameter, torch's default betas), no
clipping, no schedule, batches of 8 drawn like the book's DataLoader(shuffle=True, drop_last=True),
through one loop (`book_loop`, the book's train_model_simple / train_classifier_simple). Ctrl-C or
SIGTERM stops after the current step and saves the checkpoint with its training state (optimizer,
RNG, step, loop position, options); `resume=True` (`--resume`) continues it exactly.
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
from .classifier import (
    EncodedTexts, classification_loss, encode_texts, label_ids, label_names, loader_accuracy,
    loader_metrics, padded_length, read_labeled, to_classifier,
)
from .config import POOLS, GPTConfig, check_language_model
from .data import Loader, draw_loader_seed
from .errors import GptforgeError
from .instruct import ALPACA, RESPONSE_KEY, InstructionData, read_records, respond, with_responses
from .io import atomic_write_bytes, sha256_file
from .lora import ALL_TARGETS, DEFAULT_SCALING, SCALINGS, apply_lora, check_lora_options, count_trainable
from .options import SEED_MAX, check_fields, option
from .runtime import StopRequest, autocast_context, lock_run_folder
from .tokenizer import get_tokenizer
from .train import (
    CHECKPOINT_DIR, EvalFn, LossFn, Run, evaluate_and_log, explicit_options, lm_loss, refuse_finished_run,
    resumed_config, run_folder, save_after_stop, save_run, start_run, train_step,
)
from .train_config import TrainConfig

TRAINABLE = ("last-block", "all", "lora")
RESUMABLE_CHANGES = frozenset({"progress", "device"})  # they do not change what the next step computes
RESPONSES_FILE = "test-responses.json"  # the book's instruction-data-with-response.json


def book_loop(run: Run, loader: Loader, loss_fn: LossFn, evaluate: EvalFn, eval_every: int, epochs: int,
              epoch_end: EvalFn | None = None, position: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The book's training loops (train_model_simple, train_classifier_simple) over the phases: a
    step per batch, `evaluate` every eval_every steps (from step 0), `epoch_end` after each epoch's
    last step. Stops early (run.interrupted) on Ctrl-C/SIGTERM. Returns the evaluation records.

    `position` ({"epoch", "batch", "epoch_seed"}: the next batch and the seed of its epoch's order)
    is kept up to date in place; given from a saved run, the loop continues there, that epoch's order
    taken from the saved seed instead of a new draw (the restored RNG then draws what it would have)."""
    position = {} if position is None else position
    history = []
    first_epoch, first_batch = position.get("epoch", 0), position.get("batch", 0)
    for epoch in range(first_epoch, epochs):
        run.epoch = epoch
        run.raw_model.train()
        start = first_batch if epoch == first_epoch else 0
        seed = position["epoch_seed"] if start else draw_loader_seed(loader.shuffle)
        position.update(epoch=epoch, batch=start, epoch_seed=seed)
        for i, batch in enumerate(loader.batches(seed, start), start):
            train_step(run, [batch], loss_fn)
            if eval_every and run.step % eval_every == 0:
                history.append({"step": run.step, **evaluate_and_log(run, evaluate)})
            if epoch_end is not None and i == len(loader) - 1:
                history.append({"step": run.step, **evaluate_and_log(run, epoch_end)})
            run.step += 1
            position["batch"] = i + 1
            if run.stop_requested and run.step < run.total_steps:
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


# --------------------------------------------------------------------------- options every verb shares

@dataclasses.dataclass
class FinetuneOptions:
    """The options every finetuning verb shares: the model, what trains, the book's optimizer and
    loop. Each verb's config adds its data options and may change a default (trainable, epochs...)."""

    model: str | None = option(None, "the model to adapt: preset, checkpoint, HF directory or hub id")
    out: str = option("runs/finetune", "output folder: checkpoint/, metrics.jsonl, loss.png")
    trainable: str = option("all", "what trains: all, or lora (adapters only)", choices=("all", "lora"))
    lora_rank: int | None = option(None, "LoRA rank (implies --trainable lora; default 16 with it, the book's)",
                                   minimum=1)
    lora_alpha: float = option(16.0, "LoRA alpha (the book's 16)")
    lora_scaling: str = option(DEFAULT_SCALING, "book (update x alpha, appendix E) or peft (x alpha/rank)",
                               choices=SCALINGS)
    lora_targets: str = option(ALL_TARGETS, "Linear layers that get adapters: all (the book, head "
                               "included) or names, e.g. W_query,W_value")
    epochs: int = option(1, "passes over the training records", minimum=1)
    batch_size: int = option(8, "records per step", minimum=1)
    lr: float = option(5e-5, "AdamW learning rate (constant)", above=0)
    weight_decay: float = option(0.1, "AdamW weight decay, on every trainable parameter (the book)", minimum=0)
    eval_every: int = option(5, "train/val loss every this many steps (0: never)", minimum=0)
    eval_batches: int | None = option(5, "batches per estimate (0: all)", minimum=0)
    drop_rate: float = option(0.0, "dropout while finetuning (the book's chapters 6 and 7 use 0)", minimum=0,
                              maximum=0.99)
    seed: int = option(123, "torch seed: new weights (head, LoRA matrices), batch order, dropout", minimum=0,
                       maximum=SEED_MAX)
    precision: str = option("fp32", "fp32 (exact to the book), auto or bf16 autocast",
                            choices=("auto", "bf16", "fp32"))
    device: str = option("auto", "auto, cpu, cuda, cuda:N, mps")
    progress: bool = option(True, "show a progress bar")
    resume: bool = option(False, "continue the run stopped (Ctrl-C/SIGTERM) in --out with its saved options")

    def __post_init__(self) -> None:
        check_fields(self)
        if not str(self.out).strip():  # Path("") is the current directory: never meant
            raise GptforgeError(f"--out must name a folder, got {self.out!r}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise GptforgeError(f"--{f.name.replace('_', '-')} must be one of {', '.join(choices)}, "
                                    f"got {getattr(self, f.name)!r}")
        default = next(f.default for f in dataclasses.fields(self) if f.name == "trainable")
        if self.lora_rank is not None:
            if self.trainable not in ("lora", default):
                raise GptforgeError(f"--lora-rank trains adapters only; it cannot go with --trainable {self.trainable}")
            self.trainable = "lora"
        if self.trainable == "lora":
            self.lora_rank = self.lora_rank or 16
            check_lora_options(self.lora_rank, self.lora_alpha, self.lora_scaling)

    def train_config(self) -> TrainConfig:
        """The TrainConfig the phases run with: the book's optimizer and loop settings."""
        return TrainConfig(
            data=getattr(self, "data", None), model=self.model or "", out=self.out, seed=self.seed,
            epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
            schedule="constant", decay="all", beta1=0.9, beta2=0.999, grad_clip=0.0, eval_every=self.eval_every,
            eval_batches=self.eval_batches, sample_tokens=0, checkpoint_every=0, precision=self.precision,
            device=self.device, data_order="book", progress=self.progress,
        )


def model_config(cfg: FinetuneOptions) -> GPTConfig:
    """The config of the model to adapt (read before its weights, so bad data fails fast); GPT-2's
    vocabulary required."""
    if not cfg.model:
        raise GptforgeError("no model to finetune: pass --model (a preset, checkpoint, HF directory or hub id)")
    model_cfg = checkpoint.load_config(cfg.model)
    if model_cfg.vocab_size < get_tokenizer().vocab_size:
        raise GptforgeError(f"{cfg.model} has vocab_size {model_cfg.vocab_size}, fewer than GPT-2's "
                            f"{get_tokenizer().vocab_size} token ids; finetune a GPT-2-vocabulary model")
    return model_cfg


def load_for_finetuning(cfg: FinetuneOptions) -> nn.Module:
    """The model to adapt, as fp32 master weights (--precision sets the compute):
    `torch.manual_seed(seed)` first (a preset's random weights); dropout set to cfg.drop_rate; with
    LoRA, `model.lora_base` names the base (a preset fails here, before loading)."""
    base = checkpoint.adapter.base_reference(cfg.model) if cfg.trainable == "lora" else None
    torch.manual_seed(cfg.seed)
    model = checkpoint.load(cfg.model, dtype=torch.float32)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = cfg.drop_rate
    model.cfg = model.cfg.replace(drop_rate=cfg.drop_rate)
    if base is not None:
        model.lora_base = base  # what the adapter checkpoint names as its base
    return model


# --------------------------------------------------------------------------- stop and resume

def resolve_config(cls: type, kind: str, config: FinetuneOptions | None,
                   options: dict[str, Any]) -> tuple[Any, dict[str, Any] | None]:
    """The run's config and, with resume=True, the training state saved in OUT/checkpoint (its
    options are used; only RESUMABLE_CHANGES may differ from them). A new run into an --out that
    holds one is refused; so is resuming nothing, a finished run or another verb's run."""
    cfg = dataclasses.replace(config, **options) if config is not None else cls(**options)
    if not cfg.resume:
        refuse_finished_run(cfg.out, f"if it was stopped, continue it with `gptforge finetune {kind} --resume "
                                     f"--out {cfg.out}`; otherwise ")
        return cfg, None
    given = explicit_options(config, options)
    ckpt = Path(cfg.out) / CHECKPOINT_DIR
    if not (ckpt / checkpoint.CONFIG_FILE).exists():
        raise GptforgeError(f"nothing to resume in {cfg.out}: no {CHECKPOINT_DIR}/ there; "
                            "start the run without --resume")
    state = checkpoint.load_training_state(ckpt)
    if state is None or "finetune" not in state:  # a finished run keeps no training state
        raise GptforgeError(f"{ckpt} holds no stopped finetuning run to resume (the run finished, or was saved "
                            "before --resume existed); start a new run in another --out")
    if state["finetune"] != kind:
        raise GptforgeError(f"{ckpt} is a `finetune {state['finetune']}` run; resume it with "
                            f"`gptforge finetune {state['finetune']} --resume --out {cfg.out}`")
    saved = cls(**{**state["finetune_config"], "resume": True})
    resumed = resumed_config(saved, given, RESUMABLE_CHANGES, cfg.out)
    if _data_digests(resumed) != state["data_sha256"]:
        raise GptforgeError(f"the data files ({', '.join(state['data_sha256'])}) changed since the run in "
                            f"{cfg.out} was saved; resume with the same files")
    return resumed, state


def _data_digests(cfg: FinetuneOptions) -> dict[str, str]:
    """sha256 of each data file the run reads, so a resumed run is known to read the same records."""
    return {name: sha256_file(getattr(cfg, name)) for name in ("data", "val", "test") if getattr(cfg, name, None)}


def restore_weights(model: nn.Module, out: str | Path) -> None:
    """Resuming: the weights saved in OUT/checkpoint into `model`, built as the saved run built it
    (same layers, same trainable parameters: the optimizer state maps onto them in order)."""
    saved = checkpoint.load(Path(out) / CHECKPOINT_DIR, dtype=torch.float32)
    model.load_state_dict(saved.state_dict())


def earlier_evaluations(run: Run) -> list[dict[str, Any]]:
    """Resuming: the evaluation records the saved run logged before it stopped (as book_loop's)."""
    skip = ("kind", "step", "epoch", "tokens_seen")
    return [{"step": r["step"], **{k: v for k, v in r.items() if k not in skip}}
            for r in run.metrics.records if r["kind"] == "eval"]


def save_finetune(run: Run, cfg: FinetuneOptions, kind: str, position: dict[str, Any]) -> Path:
    """OUT/checkpoint. After a stop, with everything `--resume` needs: the training state
    (optimizer, RNG, step), the loop position, this config and the data files' digests, and a line
    saying how to continue. A finished run keeps only the model (its optimizer state would double
    the checkpoint, and nothing resumes a finished finetune)."""
    if not run.interrupted:
        return checkpoint.save(run.raw_model, run.out / CHECKPOINT_DIR)
    options = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "resume"}
    ckpt = save_run(run, {"finetune": kind, "finetune_config": options, "position": dict(position),
                          "data_sha256": _data_digests(cfg)})
    run.progress.write(f"gptforge: interrupted after step {run.step - 1}; checkpoint saved to {ckpt}; "
                       f"continue with `gptforge finetune {kind} --resume --out {run.out}`")
    return ckpt


# --------------------------------------------------------------------------- classification (chapter 6)

@dataclasses.dataclass
class ClassifyConfig(FinetuneOptions):
    """A classification finetuning run; the flags of `gptforge finetune classify`."""

    data: str | None = option(None, "training records: CSV, TSV, JSONL or JSON with a text and a label column")
    val: str | None = option(None, "validation records (same columns)")
    test: str | None = option(None, "test records, scored once at the end")
    out: str = option("runs/classifier", "output folder: checkpoint/, metrics.jsonl, loss.png")
    text_column: str = option("text", "the column holding the texts")
    label_column: str = option("label", "the column holding the labels (any strings)")
    max_length: int | None = option(None, "pad/cut every text to this many tokens (default: the longest "
                                    "training text, which must fit the context)")
    pool: str = option("last-real", "which position classifies: last-real (the last real token, as "
                       "Hugging Face) or last (the last position, padding or not: the book)", choices=POOLS)
    trainable: str = option("last-block", "what trains: last-block (last block, final norm, head: the "
                            "book), all, or lora (adapters only)", choices=TRAINABLE)
    epochs: int = option(5, "passes over the training records", minimum=1)
    eval_every: int = option(50, "train/val loss and accuracy every this many steps (0: never)", minimum=0)


@dataclasses.dataclass
class ClassifyResult:
    """What a classification run did: the final accuracies over all records (None without the
    file, or when the run was stopped), the evaluation records and the saved checkpoint."""

    checkpoint: Path
    labels: tuple[str, ...]
    steps: int
    train_accuracy: float | None
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


def finetune_classify(config: ClassifyConfig | None = None, /, *,
                      on_step: Callable[[dict[str, Any]], None] | None = None, **options: Any) -> ClassifyResult:
    """Adapt a GPT model to classify texts; the Python twin of `gptforge finetune classify`.

    `finetune_classify(data="train.csv", val="val.csv", model="gpt2", out="runs/spam")`; options
    are ClassifyConfig's fields. Writes OUT/checkpoint (a classifier checkpoint; with LoRA, an
    adapter checkpoint naming its base, either with the training state), OUT/metrics.jsonl and
    OUT/loss.png. `finetune_classify(out="runs/spam", resume=True)` continues a stopped run exactly.
    on_step: called with each step's metrics record (after the update)."""
    with lock_run_folder(run_folder(config, options, ClassifyConfig)):
        return _finetune_classify(config, on_step, options)


def _finetune_classify(config: ClassifyConfig | None, on_step: Callable[[dict[str, Any]], None] | None,
                       options: dict[str, Any]) -> ClassifyResult:
    cfg, saved = resolve_config(ClassifyConfig, "classify", config, options)
    splits = _read_splits(cfg, model_config(cfg).context_length)
    model = load_for_finetuning(cfg)
    prepare_classifier(model, cfg, splits.labels, splits.length)
    if saved is not None:
        restore_weights(model, cfg.out)
    trainable, total = count_trainable(model)
    tcfg = cfg.train_config()
    torch.manual_seed(cfg.seed)  # the book reseeds before its optimizer and loop (a resumed run: its saved RNG)
    with StopRequest() as stop:
        run = start_run(tcfg, model, cfg.epochs * len(splits.train), saved_state=saved, stop=stop, on_step=on_step)
        run.progress.write(f"trainable parameters: {trainable:,} of {total:,} ({cfg.trainable})")
        position = dict(saved["position"]) if saved is not None else {}
        history = earlier_evaluations(run) if saved is not None else []
        history += book_loop(run, splits.train, classification_loss, _evaluator(splits, cfg.eval_batches),
                             cfg.eval_every, cfg.epochs, _epoch_accuracy(splits, cfg.eval_batches), position)
        run.progress.close()
        model = run.raw_model.eval()
        ckpt = save_after_stop(run, lambda: save_finetune(run, cfg, "classify", position))  # before the passes below
    final = {"train": None, "val": None, "test": None}
    if not run.interrupted:  # a stopped run ends now: the passes over all the data are for a finished one
        final = {name: loader_accuracy(model, loader) if loader is not None else None
                 for name, loader in (("train", splits.train), ("val", splits.val), ("test", splits.test))}
        run.metrics.log({"kind": "final", "step": run.step, **{f"{k}_acc": v for k, v in final.items()}})
    run.metrics.plot(force=True)
    return ClassifyResult(ckpt, splits.labels, run.step, final["train"], final["val"], final["test"],
                          trainable, total, history, run.interrupted)


# --------------------------------------------------------------------------- instruction following (chapter 7)

@dataclasses.dataclass
class InstructConfig(FinetuneOptions):
    """An instruction finetuning run (the book's chapter 7); the flags of `gptforge finetune instruct`."""

    data: str | None = option(None, "training records: a JSON list or JSONL of {instruction, input, output}")
    val: str | None = option(None, "validation records (loss every --eval-every steps)")
    test: str | None = option(None, "test records: greedy responses go to OUT/test-responses.json")
    test_fraction: float = option(0.0, "hold back this share of --data as test records (the book: 0.1)",
                                  minimum=0, maximum=0.9)
    val_fraction: float = option(0.0, "hold back this share of --data as validation records (the book: 0.05)",
                                 minimum=0, maximum=0.9)
    out: str = option("runs/instruct", "output folder: checkpoint/, metrics.jsonl, loss.png, test-responses.json")
    mask_prompt: bool = option(False, "leave the instruction and input out of the loss (the book's exercise 7.2)")
    max_length: int | None = option(None, "cut every record to this many tokens (the book's allowed_max_length; "
                                    "default: each must fit the context)", minimum=1)
    max_new_tokens: int = option(256, "tokens per test response at most (the book: 256)", minimum=1)
    trainable: str = option("all", "what trains: all (the book), or lora (adapters only)", choices=("all", "lora"))
    epochs: int = option(2, "passes over the training records (the book: 2)", minimum=1)


@dataclasses.dataclass
class InstructResult:
    """What an instruction run did: the checkpoint (with the prompt template), the test responses
    (None without test records, or when the run was stopped), the last losses and the evaluation records."""

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


def _loss_evaluator(cfg: InstructConfig, train: Loader, val: Loader | None) -> EvalFn:
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


def finetune_instruct(config: InstructConfig | None = None, /, *,
                      on_step: Callable[[dict[str, Any]], None] | None = None, **options: Any) -> InstructResult:
    """Teach a GPT model to follow instructions; the Python twin of `gptforge finetune instruct`.

    `finetune_instruct(data="train.json", val="val.json", test="test.json", model="gpt2",
    out="runs/instruct")`; options are InstructConfig's fields. Writes OUT/checkpoint (with the
    Alpaca prompt template in its config), OUT/metrics.jsonl, OUT/loss.png and, with test records,
    OUT/test-responses.json (each record with its greedy `model_response`, as the book's).
    `finetune_instruct(out="runs/instruct", resume=True)` continues a stopped run exactly.
    on_step: called with each step's metrics record (after the update)."""
    with lock_run_folder(run_folder(config, options, InstructConfig)):
        return _finetune_instruct(config, on_step, options)


def _finetune_instruct(config: InstructConfig | None, on_step: Callable[[dict[str, Any]], None] | None,
                       options: dict[str, Any]) -> InstructResult:
    cfg, saved = resolve_config(InstructConfig, "instruct", config, options)
    base_cfg = model_config(cfg)
    check_language_model(base_cfg, cfg.model)  # instructions are text in, text out
    context = base_cfg.context_length
    train, val, test = _split_records(cfg)

    def data(records: Sequence[dict] | None, source: str) -> InstructionData | None:
        return None if records is None else InstructionData(
            records, context, max_length=cfg.max_length, mask_prompt=cfg.mask_prompt, source=source)

    train_data, val_data = data(train, cfg.data), data(val, cfg.val or "validation records")
    loader = Loader(train_data, cfg.batch_size, shuffle=True, drop_last=True)
    if len(loader) == 0:
        raise GptforgeError(f"{len(train)} training records are fewer than one batch of {cfg.batch_size}; "
                            "lower --batch-size or add records")
    val_loader = Loader(val_data, cfg.batch_size) if val_data is not None else None
    model = load_for_finetuning(cfg)
    model.cfg = model.cfg.replace(prompt_template=ALPACA)
    if cfg.trainable == "lora":  # as appendix E: seed, then the adapters (apply_lora freezes the rest)
        torch.manual_seed(cfg.seed)
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_scaling)
    if saved is not None:
        restore_weights(model, cfg.out)
    trainable, total = count_trainable(model)
    torch.manual_seed(cfg.seed)  # the book reseeds before its optimizer and loop (a resumed run: its saved RNG)
    with StopRequest() as stop:
        run = start_run(cfg.train_config(), model, cfg.epochs * len(loader), saved_state=saved, stop=stop,
                        on_step=on_step)
        run.progress.write(f"trainable parameters: {trainable:,} of {total:,} ({cfg.trainable})")
        position = dict(saved["position"]) if saved is not None else {}
        history = earlier_evaluations(run) if saved is not None else []
        history += book_loop(run, loader, lm_loss, _loss_evaluator(cfg, loader, val_loader), cfg.eval_every,
                             cfg.epochs, _sampler((val or train)[0]), position)
        run.progress.close()
        model = run.raw_model.eval()
        ckpt = save_after_stop(run, lambda: save_finetune(run, cfg, "instruct", position))  # a Ctrl-C waits for it
    run.metrics.plot(force=True)
    responses = None
    if test and not run.interrupted:  # a stopped run ends now; its resumed run answers the test records
        answered = with_responses(test, respond(model, test, max_new_tokens=cfg.max_new_tokens), RESPONSE_KEY)
        responses = atomic_write_bytes(run.out / RESPONSES_FILE, json.dumps(answered, indent=4).encode())
    losses = [h for h in history if "train_loss" in h]
    return InstructResult(ckpt, responses, run.step, losses[-1]["train_loss"] if losses else None,
                          losses[-1].get("val_loss") if losses else None, history, run.interrupted)
