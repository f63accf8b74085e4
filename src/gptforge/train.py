"""Training: the loop behind `gptforge train`, in one process or under `torchrun`, as phases that
other training verbs (finetuning) reuse.

One step = `grad_accum_steps` micro-batches per rank, then one AdamW update. A *global batch* is
`batch_size * grad_accum_steps * world_size` windows; each rank reads its own share of it, so a run
on N processes sees the same data, in the same order, as one process with an N-times larger batch.

Everything a run needs to continue is in `OUT/checkpoint` (our checkpoint format plus a training
state: optimizer, schedule position, RNG states of every rank, data position, this config), written
atomically every `checkpoint_every` steps, at the end, and when Ctrl-C (SIGINT) or SIGTERM asks the
run to stop. `resume=True` continues from it so exactly that the losses equal an uninterrupted run's.

`data_order="book"` consumes the global torch RNG the way the book's DataLoader loop does
(llms-from-scratch, chapter 5), which, with the book's settings, reproduces its printed losses.

The phases (the contract finetuning builds on; docs/training.md has an example):
- `start_run(cfg, model, total_steps, saved_state=..., stop=...) -> Run`: any nn.Module, built and
  seeded by the caller; wraps it (compile/DDP/FSDP), builds AdamW over the parameters with
  requires_grad=True only, restores a saved training state, opens metrics.jsonl and the progress bar.
- `train_step(run, micro_batches, loss_fn)`: one optimizer step; a micro-batch is a tensor or a
  tuple/list of tensors (moved to the device), `loss_fn(model, batch)` returns a scalar loss.
- `evaluate_and_log(run, eval_fn)`: `eval_fn(run)` returns a metrics dict (model in eval mode),
  logged to metrics.jsonl, the progress bar and loss.png.
- `save_run(run, extra_state)`: OUT/checkpoint with everything `start_run` restores.
- `fit(run, next_batches, loss_fn, eval_fn, extra_state)`: the loop over those, with the schedule,
  eval/checkpoint intervals and the stop request; returns a TrainResult.
Pretraining is `build_run` (data, model, resume) then `fit`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
import torch.nn as nn

from . import checkpoint
from .config import PRESETS, GPTConfig, check_language_model, known_fields, preset
from .data import (
    TokenizedCorpus, TokenWindows, batch_indices, corpus_digest, draw_loader_seed, permutation,
    tokenize_corpus,
)
from .device import resolve_device
from .errors import GptforgeError, SystemFailure, os_error_message
from .evaluate import loss_perplexity
from .io import atomic_write_bytes, ensure_dir
from .generation import generate_text
from .metrics import METRICS_FILE, PLOT_FILE, Metrics, progress_bar  # noqa: F401 (re-exported)
from .lora import apply_lora
from .model import GPTModel
from .options import check_path
from .runtime import (
    DistContext, StopRequest, autocast_context, autocast_dtype, init_distributed, keep_freed_memory,
    lock_run_folder, save_checkpoint, set_rng_state, shard, shard_args,
)
from .tokenizer import get_tokenizer
from .train_config import RESUMABLE_CHANGES, TrainConfig, read_config_file  # noqa: F401 (re-exported)

CHECKPOINT_DIR = checkpoint.RUN_CHECKPOINT_DIR
STATE_VERSION = 1


class TrainingDiverged(GptforgeError):
    """The loss or the gradients of a step are not finite (NaN or inf): the run cannot go on. The
    step's update is never applied, so the weights are still the last good step's."""


@dataclasses.dataclass
class TrainResult:
    """What a run did. Losses are mean cross-entropies in nats per token."""

    out: Path
    checkpoint: Path
    steps: int
    tokens_seen: int
    interrupted: bool
    train_loss: float | None
    val_loss: float | None

    @property
    def val_perplexity(self) -> float | None:
        return loss_perplexity(self.val_loss) if self.val_loss is not None else None


# ---------------------------------------------------------------------------------------------
# Building blocks


def model_from_spec(spec: str, overrides: Mapping[str, Any] | None = None) -> GPTModel:
    """A model to train: a preset or a config JSON (initialised with the current torch seed), or a
    gptforge checkpoint directory (finetuning: only drop_rate may be overridden)."""
    overrides = dict(overrides or {})
    path = Path(spec)
    if spec.lower() in PRESETS:
        return GPTModel(preset(spec).replace(**overrides))
    if path.is_file() and path.suffix == ".json":
        return GPTModel(GPTConfig.from_json(path).replace(**overrides))
    if path.is_dir():
        model = checkpoint.load(path)
        check_language_model(model.cfg, spec)
        shape_changes = sorted(set(overrides) - {"drop_rate"})
        if shape_changes:
            raise GptforgeError(f"cannot override {shape_changes} of the checkpoint {spec}: only drop_rate "
                             "can change when finetuning")
        if overrides:
            model.cfg = model.cfg.replace(**overrides)
            for module in model.modules():
                if isinstance(module, nn.Dropout):
                    module.p = overrides["drop_rate"]
        return model
    raise FileNotFoundError(f"--model {spec!r} is not a preset ({', '.join(PRESETS)}), a config .json "
                            "file, or a checkpoint directory")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on the matrices of linear layers only, not on biases, norm scales
    or embeddings. A tied head is the token embedding: counted once, without decay."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # named_parameters() yields a shared tensor once
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def learning_rate(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warmup from lr / warmup_steps
    to lr, then constant or a cosine down to min_lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    span = max(1, total_steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))



@torch.no_grad()
def evaluate(model: nn.Module, windows: TokenWindows, batch_size: int, num_batches: int | None = None, *,
             order: Sequence[int] | None = None, drop_last: bool = False, device: torch.device | str = "cpu",
             autocast: torch.dtype | None = None, rank: int = 0, world_size: int = 1) -> float:
    """Mean over batches of each batch's mean cross-entropy (nats per token), as the book's
    `calc_loss_loader`: the first `num_batches` batches (all when None) of `batch_size` windows in
    `order`. Under torchrun each rank computes its share of every batch and the shares are
    all-reduced, so the result is the same as in one process. The caller chooses train/eval mode."""
    batches = batch_indices(len(windows), batch_size, order=order, drop_last=drop_last)
    if not batches:
        return float("nan")
    if num_batches:
        batches = batches[:num_batches]
    device = torch.device(device)
    total = 0.0
    for indices in batches:
        share = math.ceil(len(indices) / world_size)
        mine = indices[rank * share:(rank + 1) * share]
        loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of token losses, tokens)
        if mine:
            x, y = windows.batch(mine)
            with autocast_context(device, autocast):
                loss = model(x.to(device), targets=y.to(device))  # this batch's mean, as the book's
            if world_size == 1:
                total += loss.item()
                continue
            loss_sum[0] = loss * y.numel()
            loss_sum[1] = y.numel()
        dist.all_reduce(loss_sum)
        total += (loss_sum[0] / loss_sum[1]).item()
    return total / len(batches)


# ---------------------------------------------------------------------------------------------
# The run


def _resolve_config(config: TrainConfig | None, options: Mapping[str, Any]) -> tuple[TrainConfig, dict | None]:
    """The run's config and, when resuming, the saved training state. `options` are the fields the
    caller set explicitly (on --resume only RESUMABLE_CHANGES may differ from the saved run)."""
    if config is not None and not isinstance(config, TrainConfig):
        raise GptforgeError(f"train's first argument is a TrainConfig (or pass its fields as keywords), got "
                            f"{type(config).__name__}")
    options = known_fields(TrainConfig, options, "training options")
    given = explicit_options(config, options)
    config = dataclasses.replace(config, **options) if config is not None else TrainConfig(**options)
    if not config.resume:
        if config.data is None:
            raise GptforgeError("no training data given: pass data= (--data) a text file, a folder or a glob")
        refuse_finished_run(config.out, "continue it with --resume, or ")
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        unused = [name for name in ("lora_alpha", "lora_scaling", "lora_targets")
                  if name in given and given[name] != defaults[name]]  # (a saved train_config.json has them all)
        if unused and config.lora_rank is None:  # they would be ignored without a word
            flags = ", ".join("--" + name.replace("_", "-") for name in unused)
            raise GptforgeError(f"{flags} only appl{'ies' if len(unused) == 1 else 'y'} to LoRA training: add "
                                "--lora-rank R, or drop them")
        return config, None
    ckpt = Path(config.out) / CHECKPOINT_DIR
    if not (ckpt / checkpoint.CONFIG_FILE).exists():
        raise FileNotFoundError(f"nothing to resume in {config.out}: no {CHECKPOINT_DIR}/ there; "
                                "start the run without --resume")
    state = checkpoint.load_training_state(ckpt)
    if state is None or state.get("version") != STATE_VERSION:
        raise GptforgeError(f"{ckpt} holds no gptforge training state to resume from")
    saved = TrainConfig.from_dict({**state["train_config"], "resume": True})
    return resumed_config(saved, given, RESUMABLE_CHANGES, config.out), state


def explicit_options(config: Any | None, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options a caller set: the fields of the dataclass `config` that differ from their
    defaults, then `options` (which win)."""
    given = {}
    for f in dataclasses.fields(config) if config is not None else ():
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if getattr(config, f.name) != default:
            given[f.name] = getattr(config, f.name)
    return {**given, **options}


def resumed_config(saved: Any, given: Mapping[str, Any], resumable: frozenset[str], out: str | Path) -> Any:
    """A stopped run's config `saved` (a dataclass) with the options `given` again, in `out`: those
    in `resumable` replace the saved ones; any other that differs is refused with the reason."""
    changes = {}
    for name, value in given.items():
        if name in ("out", "resume"):
            continue
        if name in resumable:
            changes[name] = value
        elif value != getattr(saved, name):
            raise GptforgeError(f"--{name.replace('_', '-')} cannot change on --resume (the saved run has "
                                f"{getattr(saved, name)!r}, not {value!r}); only {', '.join(sorted(resumable))} "
                                "can, or start a new run in another --out")
    return dataclasses.replace(saved, out=str(out), **changes)


def refuse_finished_run(out: str | Path, hint: str = "") -> None:
    """A new run must not write over the checkpoint of one already in `out` (a trained model would
    be lost): refused before any work, `hint` saying what else the user can do."""
    ckpt = Path(out) / CHECKPOINT_DIR
    if (ckpt / checkpoint.CONFIG_FILE).exists():
        raise GptforgeError(f"{out} already holds a run ({ckpt}); {hint}choose another --out (or remove "
                            f"{ckpt} to start over there)")


def train(config: TrainConfig | None = None, /, *, on_step: Callable[[dict[str, Any]], None] | None = None,
          **options: Any) -> TrainResult:
    """Train a GPT model; the Python twin of `gptforge train`.

    `train(TrainConfig(...))`, `train(data="corpus/", model="gpt2-124m", out="runs/x", epochs=2)`
    and `train(out="runs/x", resume=True)` all work; options are TrainConfig's fields.
    on_step: called on rank 0 with each step's metrics record (after the update).
    Returns a TrainResult. Launched by torchrun, every process calls this the same way.
    The run holds its --out folder (`runtime.lock_run_folder`) from the first check to the end.
    """
    with lock_run_folder(run_folder(config, options, TrainConfig)):
        cfg, saved_state = _resolve_config(config, options)
        resolve_device(cfg.device)  # an unknown or absent device fails now, not after the data is tokenized
        dctx = init_distributed(cfg.device)
        try:
            with StopRequest() as stop:
                return _run(cfg, saved_state, dctx, stop, on_step)
        finally:
            if dctx.owns_group:
                dist.destroy_process_group()


def run_folder(config: Any | None, options: Mapping[str, Any], cls: type) -> str | Path:
    """The --out of a run about to start: `options`' out, else `config`'s, else `cls`'s default."""
    if "out" in options:
        out = options["out"]
    else:
        out = config.out if isinstance(config, cls) else next(f.default for f in dataclasses.fields(cls) if f.name == "out")
    return check_path("out", out)


# ---------------------------------------------------------------------------------------------
# The phases: build the run (incl. resume), one step, evaluate and log, save. `fit` is the loop.


LossFn = Callable[[nn.Module, Any], torch.Tensor]
EvalFn = Callable[["Run"], dict[str, Any]]


@dataclasses.dataclass
class Run:
    """What the phases share. `model` is what runs forward/backward (the model itself, or its
    torch.compile/DDP/FSDP wrapper); `raw_model` is the model itself, what gets saved."""

    cfg: TrainConfig
    model: nn.Module
    raw_model: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    autocast: torch.dtype | None
    dctx: DistContext
    total_steps: int
    metrics: Metrics
    progress: Any
    stop: StopRequest | None = None
    on_step: Callable[[dict[str, Any]], None] | None = None
    save_model: Callable[..., Any] = checkpoint.save  # (model, dir, training_state=...): the checkpoint writer
    step: int = 0  # the next optimizer step (0-based); after `fit`, the steps done
    epoch: int = 0
    tokens_seen: int = 0
    last_eval: dict[str, Any] = dataclasses.field(default_factory=dict)
    stop_requested: bool = False
    interrupted: bool = False
    t_last: float = dataclasses.field(default_factory=time.perf_counter)

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    def result(self) -> TrainResult:
        return TrainResult(out=self.out, checkpoint=self.out / CHECKPOINT_DIR, steps=self.step,
                           tokens_seen=self.tokens_seen, interrupted=self.interrupted,
                           train_loss=self.last_eval.get("train_loss"), val_loss=self.last_eval.get("val_loss"))


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Next-token loss of a batch (inputs, targets), both (B, T) ids: mean cross-entropy, nats per token."""
    x, y = batch
    return model(x, targets=y)  # fused: the (B, T, vocab) logits are never materialised


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the parameters with requires_grad=True only: frozen ones get no state."""
    if cfg.decay == "all":
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": cfg.weight_decay}]
    else:
        groups = [g for g in parameter_groups(model, cfg.weight_decay) if g["params"]]
    # Fused AdamW is faster; the book's run keeps torch's default implementation for exactness.
    fused = {"fused": True} if (device.type in ("cuda", "cpu") and cfg.data_order != "book") else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay, **fused)


def start_run(cfg: TrainConfig, model: nn.Module, total_steps: int, *, dctx: DistContext | None = None,
              saved_state: Mapping[str, Any] | None = None, stop: StopRequest | None = None,
              on_step: Callable[[dict[str, Any]], None] | None = None,
              save_model: Callable[..., Any] = checkpoint.save) -> Run:
    """Phase 1: put `model` (already built and seeded) on the device, wrap it (compile, DDP, FSDP),
    build the optimizer and, when `saved_state` (from `checkpoint.load_training_state`) is given,
    restore step, tokens seen, optimizer and RNG states. Opens metrics.jsonl and the progress bar.
    `save_model(model, dir, training_state=...)` writes checkpoints (a model other than GPTModel
    brings its own); `stop` (a StopRequest) turns Ctrl-C into a saved, resumable stop."""
    dctx = dctx or DistContext()
    device = resolve_device(cfg.device, dctx.local_rank)
    if device.type == "cpu":
        keep_freed_memory()
    model.to(device).train()
    if dctx.world_size > 1 and dctx.rank > 0:
        torch.manual_seed(cfg.seed + dctx.rank)  # own dropout masks on each rank
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if cfg.fsdp:
        model = shard(model, raw_model, dctx)
    elif dctx.world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(raw_model, cfg, device)
    step = tokens_seen = 0
    if saved_state is not None:
        _restore(model, optimizer, saved_state, cfg, dctx)
        step, tokens_seen = saved_state["step"], saved_state["tokens_seen"]
    out = Path(cfg.out)
    if dctx.main:
        ensure_dir(out)
        atomic_write_bytes(out / "train_config.json", (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())
    if stop is not None:
        stop.defer()  # the run can save now: a stop waits for the end of its step
    return Run(cfg=cfg, model=model, raw_model=raw_model, optimizer=optimizer, device=device,
               autocast=autocast_dtype(cfg.precision, device), dctx=dctx, total_steps=total_steps,
               metrics=Metrics(out, step, dctx.main), progress=progress_bar(cfg.progress and dctx.main, total_steps, step),
               stop=stop, on_step=on_step, save_model=save_model, step=step, tokens_seen=tokens_seen)


def _restore(model: nn.Module, optimizer: torch.optim.Optimizer, saved_state: Mapping[str, Any],
             cfg: TrainConfig, dctx: DistContext) -> None:
    if cfg.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, saved_state["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(saved_state["optimizer"])
    rngs = saved_state["rng"]
    if len(rngs) == dctx.world_size:
        set_rng_state(rngs[dctx.rank])
    else:
        print(f"gptforge: the checkpoint was written by {len(rngs)} processes, this run has "
              f"{dctx.world_size}: dropout randomness will differ from an uninterrupted run", file=sys.stderr)
        torch.manual_seed(cfg.seed + saved_state["step"] + dctx.rank)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    return batch


def _first_tensor(batch: Any) -> torch.Tensor:
    return batch if isinstance(batch, torch.Tensor) else _first_tensor(batch[0])


def train_step(run: Run, micro_batches: Sequence[Any], loss_fn: LossFn = lm_loss) -> dict[str, Any]:
    """Phase 2: one optimizer step at run.step over this rank's micro-batches (gradients averaged
    over them and, under torchrun, over the ranks). Logs and returns the step's record; sets
    run.stop_requested when any rank got Ctrl-C/SIGTERM (or on_step asked to stop)."""
    cfg, model, n = run.cfg, run.model, len(micro_batches)
    lr = learning_rate(run.step, cfg, run.total_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.optimizer.zero_grad(set_to_none=True)
    loss_sum, tokens = 0.0, 0
    for micro, batch in enumerate(micro_batches):
        batch = _to_device(batch, run.device)
        sync = micro == n - 1 or not hasattr(model, "no_sync")
        with (contextlib.nullcontext() if sync else model.no_sync()), autocast_context(run.device, run.autocast):
            loss = loss_fn(model, batch)
        (loss / n).backward()
        loss_sum += loss.item()
        tokens += _first_tensor(batch).numel()
    if cfg.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
    else:  # measured all the same: an update from gradients that are not finite is never applied
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]).item()

    # One all-reduce carries the loss for the log and whether any rank was asked to stop (or could not
    # write); before the update, so that a loss that is not finite on any rank stops every rank with its
    # weights intact.
    stop = (run.stop is not None and run.stop.requested) or run.metrics.error is not None
    flags = torch.tensor([loss_sum / n, float(stop)], device=run.device)
    if run.dctx.world_size > 1:
        dist.all_reduce(flags)
    step_loss = flags[0].item() / run.dctx.world_size
    run.stop_requested = flags[1].item() > 0
    if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
        run.optimizer.zero_grad(set_to_none=True)
        what = f"the loss is {step_loss}" if not math.isfinite(step_loss) else f"the gradient norm is {grad_norm}"
        raise TrainingDiverged(f"training diverged at step {run.step}: {what} (the learning rate, {lr:g} at this "
                               "step, is likely too high)")
    run.optimizer.step()
    run.tokens_seen += tokens * run.dctx.world_size
    now = time.perf_counter()
    tok_s = tokens * run.dctx.world_size / max(now - run.t_last, 1e-9)
    run.t_last = now
    record = {"kind": "train", "step": run.step, "epoch": run.epoch, "loss": step_loss, "lr": lr,
              "grad_norm": grad_norm, "tokens_seen": run.tokens_seen, "tokens_per_s": tok_s}
    run.metrics.log(record)
    if run.dctx.world_size == 1:  # (under torchrun the next step's all-reduce carries it to every rank)
        run.stop_requested = run.stop_requested or run.metrics.error is not None
    run.progress.update(1)
    run.progress.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
    if run.on_step is not None and run.dctx.main:
        run.on_step(record)
        run.stop_requested = run.stop_requested or (run.stop is not None and run.stop.requested)
    return record


def evaluate_and_log(run: Run, eval_fn: EvalFn) -> dict[str, Any]:
    """Phase 3: `eval_fn(run)` (the model in eval mode, every rank calls it) returns a metrics dict,
    logged to metrics.jsonl, written above the progress bar (numbers, then strings such as a sample)
    and drawn in loss.png (every key ending in "loss")."""
    run.raw_model.eval()
    metrics = eval_fn(run)
    run.raw_model.train()
    run.last_eval = metrics
    run.metrics.log({"kind": "eval", "step": run.step, "epoch": run.epoch, "tokens_seen": run.tokens_seen, **metrics})
    if run.dctx.main:
        numbers = ", ".join(f"{k.replace('_', ' ')} {v:,.3f}" for k, v in metrics.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool))
        run.progress.write(f"step {run.step} (epoch {run.epoch + 1}): {numbers}")
        for k, v in metrics.items():
            if isinstance(v, str):
                run.progress.write(f"  {k}: " + v.replace("\n", " "))
        run.metrics.plot()
    run.t_last = time.perf_counter()  # evaluation time does not count against tokens/s
    return metrics


def save_run(run: Run, extra_state: Mapping[str, Any] | None = None) -> Path:
    """Phase 4: write OUT/checkpoint (the model plus everything `start_run` restores, and
    `extra_state`, e.g. the data position). Every rank calls it; rank 0 writes."""
    state = {"version": STATE_VERSION, "step": run.step, "tokens_seen": run.tokens_seen,
             "total_steps": run.total_steps, "train_config": run.cfg.to_dict(), **(extra_state or {})}
    ckpt = run.out / CHECKPOINT_DIR
    if not _weights_finite(run):  # such a checkpoint could not be loaded: keep the one there is
        raise TrainingDiverged(f"the model's weights are not finite (NaN or inf) after step {run.step - 1}; they "
                               f"were not saved{f', {ckpt} is left as it was' if ckpt.exists() else ''}")
    save_checkpoint(ckpt, run.model, run.raw_model, run.optimizer, run.dctx, run.cfg.fsdp, state, run.save_model)
    return ckpt


def _weights_finite(run: Run) -> bool:
    """Whether every weight of the model is finite, on every rank (each checks its own shard)."""
    bad = torch.zeros((), dtype=torch.int64, device=run.device)
    for p in run.raw_model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p  # an FSDP shard
        bad += (~torch.isfinite(local.detach())).sum()
    if run.dctx.world_size > 1:
        dist.all_reduce(bad)
    return bad.item() == 0


def _stop_diverged(run: Run, err: TrainingDiverged, extra_state: Callable[[], Mapping[str, Any]]) -> NoReturn:
    """End a diverged run: save the model of the last good step (the diverged update was never
    applied), then raise `err` saying where it is."""
    ckpt = run.out / CHECKPOINT_DIR
    advice = "start again with a lower --lr"
    if run.step == 0:
        kept = "no step had finished, so nothing was saved"
    elif not _weights_finite(run):
        kept = "the weights are not finite either, so they were not saved" + (
            f" ({ckpt} is left as it was)" if ckpt.exists() else "")
    else:
        save_run(run, extra_state())
        kept = f"the model after step {run.step - 1}, the last good one, is saved in {ckpt}"
        advice += f" (from those weights: --model {ckpt} and another --out)"
    run.progress.close()
    raise TrainingDiverged(f"{err}; {kept}; {advice}") from None


def fit(run: Run, next_batches: Callable[[Run], Sequence[Any]], loss_fn: LossFn = lm_loss,
        eval_fn: EvalFn | None = None, extra_state: Callable[[], Mapping[str, Any]] = dict) -> TrainResult:
    """The loop: until run.total_steps, `next_batches(run)` gives the step's micro-batches (it may
    set run.epoch), then train_step; evaluate_and_log every eval_every steps and at the last; save
    every checkpoint_every steps, at the end, and when asked to stop (then run.interrupted)."""
    cfg = run.cfg
    while run.step < run.total_steps:
        try:
            train_step(run, next_batches(run), loss_fn)
        except TrainingDiverged as err:
            _stop_diverged(run, err, extra_state)
        if eval_fn is not None and ((cfg.eval_every and run.step % cfg.eval_every == 0)
                                    or run.step == run.total_steps - 1):
            evaluate_and_log(run, eval_fn)
        run.step += 1
        if run.stop_requested and run.step < run.total_steps:
            run.interrupted = True
            save_after_stop(run, lambda: save_run(run, extra_state()))
            if run.dctx.main:
                run.metrics.plot(force=True)
                run.progress.write(f"gptforge: interrupted after step {run.step - 1}; checkpoint saved to "
                                   f"{run.out / CHECKPOINT_DIR}; continue with --resume --out {run.out}")
            break
        if cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0 and run.step < run.total_steps:
            save_run(run, extra_state())
            run.t_last = time.perf_counter()
    else:
        save_after_stop(run, lambda: save_run(run, extra_state()))
        if run.dctx.main:
            run.metrics.plot(force=True)
    run.progress.close()
    return run.result()


def save_after_stop(run: Run, save: Callable[[], Path]) -> Path:
    """`save()` the checkpoint of a run that stops or ends. When what stopped it was a write the
    system refused (run.metrics.error: its disk filled up, say), the save is a best effort and the
    run ends with one SystemFailure line saying what failed and what was kept."""
    failed = run.metrics.error
    if failed is None:
        return save()
    try:
        kept = (f"the checkpoint of step {run.step - 1} is saved in {save()}"
                f"{'; continue with --resume once there is room' if run.interrupted else ''}")
    except OSError as err:
        kept = (f"saving the checkpoint failed too ({os_error_message(err)}); {run.out / CHECKPOINT_DIR} holds "
                "the last one saved, if any")
    run.progress.close()
    raise SystemFailure(f"cannot write {os_error_message(failed)}; {kept}")


# ---------------------------------------------------------------------------------------------
# Pretraining on a text corpus: the phases above with token windows


class _Corpus:
    """The pretraining data position: which windows each step reads, and the loss estimates."""

    def __init__(self, cfg: TrainConfig, corpus: TokenizedCorpus, ctx_len: int, world_size: int,
                 saved_state: Mapping[str, Any] | None):
        self.cfg, self.corpus = cfg, corpus
        self.train = TokenWindows(corpus.train(), ctx_len, cfg.stride, name="training text")
        self.val = None
        if corpus.val_tokens:
            self.val = TokenWindows(corpus.val(), ctx_len, ctx_len, name="validation text (val_fraction)")
        self.global_batch = cfg.batch_size * cfg.grad_accum_steps * world_size
        self.steps_per_epoch = len(self.train) // self.global_batch
        if self.steps_per_epoch == 0:
            raise GptforgeError(f"the training text gives {len(self.train)} windows of {ctx_len + 1} tokens, "
                                f"fewer than one global batch of {self.global_batch}; lower batch_size/"
                                "grad_accum_steps or stride, or use more text")
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.epoch_seed = saved_state["epoch_seed"] if saved_state is not None else None
        self.batches: list[list[int]] | None = None
        self.eval_order = None if cfg.data_order == "book" else permutation(len(self.train), cfg.seed + 7)

    def next_batches(self, run: Run) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches of step run.step: its slices of the step's global batch."""
        cfg = self.cfg
        run.epoch, position = divmod(run.step, self.steps_per_epoch)
        if position == 0 or self.batches is None:
            seed = self.epoch_seed if position > 0 else None
            if seed is None:
                # torch's generators take 64 bits: a large --seed wraps rather than overflows
                seed = draw_loader_seed(shuffle=True) if cfg.data_order == "book" else \
                    (cfg.seed * 1_000_003 + run.epoch) % 2**64
            order = permutation(len(self.train), seed)
            self.batches = batch_indices(len(self.train), self.global_batch, order=order, drop_last=True)
            self.epoch_seed = seed
        indices = self.batches[position]
        firsts = [(micro * run.dctx.world_size + run.dctx.rank) * cfg.batch_size for micro in range(cfg.grad_accum_steps)]
        return [self.train.batch(indices[first:first + cfg.batch_size]) for first in firsts]

    def evaluate(self, run: Run) -> dict[str, Any]:
        """Train and validation loss over eval_batches batches, and a greedy sample (rank 0)."""
        cfg = self.cfg
        eval_model = run.model if cfg.fsdp else run.raw_model
        n = cfg.eval_batches or None
        order = permutation(len(self.train), draw_loader_seed(shuffle=True)) if cfg.data_order == "book" \
            else self.eval_order
        kw = {"device": run.device, "autocast": run.autocast, **shard_args(run.dctx)}
        eval_batch = cfg.batch_size * run.dctx.world_size
        train_loss = evaluate(eval_model, self.train, eval_batch, n, order=order, drop_last=True, **kw)
        val_loss = None
        if self.val is not None:
            if cfg.data_order == "book":
                draw_loader_seed(shuffle=False)
            val_loss = evaluate(eval_model, self.val, eval_batch, n, **kw)
        sample = None
        if cfg.sample_tokens and run.dctx.main and not cfg.fsdp:
            # Greedy (the run's RNG is untouched) and, as the book's sample, not cut at <|endoftext|>;
            # in train mode generate decodes the weights as they are, not a cached fast view of them.
            run.raw_model.train()
            sample = generate_text(run.raw_model, cfg.sample_prompt, cfg.sample_tokens, stop_token_ids=())
        return {"train_loss": train_loss, "val_loss": val_loss,
                "val_perplexity": loss_perplexity(val_loss) if val_loss is not None else None, "sample": sample}

    def state(self) -> dict[str, Any]:
        return {"epoch_seed": self.epoch_seed, "steps_per_epoch": self.steps_per_epoch,
                "data": {"digest": corpus_digest(self.corpus), "train_tokens": self.corpus.train_tokens,
                         "val_tokens": self.corpus.val_tokens}}


def build_run(cfg: TrainConfig, saved_state: Mapping[str, Any] | None, dctx: DistContext,
              stop: StopRequest | None = None, on_step: Callable[[dict[str, Any]], None] | None = None,
              ) -> tuple[Run, _Corpus]:
    """Phase 1 of pretraining: tokenize the data (rank 0 first; later runs reuse the token files),
    build or reload the model (seeded right before, as the book does), then `start_run`."""
    out = Path(cfg.out)
    if dctx.main:
        corpus = tokenize_corpus(cfg.data, out / "data", val_fraction=cfg.val_fraction, progress=cfg.progress)
    dctx.barrier()
    if not dctx.main:
        corpus = tokenize_corpus(cfg.data, out / "data", val_fraction=cfg.val_fraction)
    if saved_state is not None and saved_state["data"]["digest"] != corpus_digest(corpus):
        raise GptforgeError(f"the data {cfg.data} changed since the checkpoint was saved; resume with the same files")
    torch.manual_seed(cfg.seed)
    if saved_state is not None:
        model = checkpoint.load(out / CHECKPOINT_DIR)
    else:
        model = model_from_spec(cfg.model, cfg.model_overrides)
        if cfg.lora_rank is not None:  # the adapter checkpoint names the base by path and checksum
            model.lora_base = checkpoint.adapter.base_reference(cfg.model)
            apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_scaling)
    if corpus.train_tokens and model.cfg.vocab_size < get_tokenizer().vocab_size:
        raise GptforgeError(f"the model's vocab_size {model.cfg.vocab_size} is smaller than GPT-2's "
                            f"{get_tokenizer().vocab_size} token ids; use vocab_size >= 50257")
    data = _Corpus(cfg, corpus, model.cfg.context_length, dctx.world_size, saved_state)
    run = start_run(cfg, model, data.total_steps, dctx=dctx, saved_state=saved_state, stop=stop, on_step=on_step)
    return run, data


def _run(cfg: TrainConfig, saved_state: dict | None, dctx: DistContext, stop: StopRequest,
         on_step: Callable[[dict[str, Any]], None] | None) -> TrainResult:
    run, data = build_run(cfg, saved_state, dctx, stop, on_step)
    return fit(run, data.next_batches, lm_loss, data.evaluate, data.state)
