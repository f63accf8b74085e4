"""Training: the loop behind `gptforge train`, in one process or under `torchrun`.

One step = `grad_accum_steps` micro-batches per rank, then one AdamW update. A *global batch* is
`batch_size * grad_accum_steps * world_size` windows; each rank reads its own share of it, so a run
on N processes sees the same data, in the same order, as one process with an N-times larger batch.

Everything a run needs to continue is in `OUT/checkpoint` (our checkpoint format plus a training
state: optimizer, schedule position, RNG states of every rank, data position, this config), written
atomically every `checkpoint_every` steps, at the end, and when Ctrl-C (SIGINT) or SIGTERM asks the
run to stop. `resume=True` continues from it so exactly that the losses equal an uninterrupted run's.

`data_order="book"` consumes the global torch RNG the way the book's DataLoader loop does
(llms-from-scratch, chapter 5), which, with the book's settings, reproduces its printed losses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from . import checkpoint
from .config import PRESETS, GPTConfig, known_fields, preset
from .data import (
    TokenizedCorpus, TokenWindows, batch_indices, corpus_digest, draw_loader_seed, permutation,
    tokenize_corpus,
)
from .generation import generate_text
from .model import GPTModel
from .tokenizer import get_tokenizer
from .errors import GptforgeError

CHECKPOINT_DIR = "checkpoint"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
STATE_VERSION = 1


def _field(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run is made of. The CLI's `gptforge train` flags are these fields
    (`--batch-size` for `batch_size`), and a JSON/TOML config file holds the same keys."""

    data: str | list[str] | None = _field(None, "text file, folder of text files, or glob")
    model: str = _field("gpt2-124m", "preset name, model config JSON, or checkpoint dir (finetuning)")
    out: str = _field("runs/gptforge", "output folder: checkpoint, metrics, loss curve, token files")
    model_overrides: dict = _field({}, "GPTConfig fields to change, e.g. {\"context_length\": 256}")
    seed: int = _field(123, "torch seed: model initialisation, dropout, data order")
    epochs: int = _field(1, "passes over the training windows (ignored when max_steps is set)")
    max_steps: int | None = _field(None, "optimizer steps in all (default: epochs * steps per epoch)")
    batch_size: int = _field(8, "windows per micro-batch, per process")
    grad_accum_steps: int = _field(1, "micro-batches accumulated per optimizer step")
    stride: int | None = _field(None, "tokens between window starts (default: context_length)")
    val_fraction: float = _field(0.1, "share of the text, from its end, held out for validation")
    lr: float = _field(4e-4, "peak learning rate")
    min_lr: float | None = _field(None, "learning rate at the end of the cosine (default: lr / 10)")
    warmup_steps: int = _field(0, "linear warmup steps from 0 to lr")
    schedule: str = _field("cosine", "cosine (after warmup) or constant", choices=("cosine", "constant"))
    weight_decay: float = _field(0.1, "AdamW weight decay")
    decay: str = _field("matrices", "which parameters decay: matrices (not biases, norms, embeddings) "
                        "or all (the book's AdamW(model.parameters()))", choices=("matrices", "all"))
    beta1: float = _field(0.9, "AdamW beta1")
    beta2: float = _field(0.95, "AdamW beta2")
    grad_clip: float = _field(1.0, "clip the global gradient norm to this (0: no clipping)")
    eval_every: int = _field(100, "evaluate every this many steps, at steps 0, N, 2N, ... (0: only at the end)")
    eval_batches: int | None = _field(20, "batches per loss estimate (None/0: all of them)")
    sample_prompt: str = _field("Every effort moves you", "prompt continued (greedy) at each evaluation")
    sample_tokens: int = _field(50, "tokens of that continuation (0: no sample)")
    checkpoint_every: int = _field(500, "save a checkpoint every this many steps (0: only at the end)")
    precision: str = _field("auto", "auto (bf16 autocast where the device has it), bf16 or fp32",
                            choices=("auto", "bf16", "fp32"))
    compile: bool = _field(False, "torch.compile the model")
    device: str = _field("auto", "auto, cpu, cuda, cuda:N, mps")
    data_order: str = _field("seeded", "seeded (per-epoch generator from the seed) or book (the "
                             "global RNG, as the book's DataLoader)", choices=("seeded", "book"))
    fsdp: bool = _field(False, "shard parameters, gradients and optimizer state with FSDP (torchrun)")
    progress: bool = _field(True, "show a progress bar")
    resume: bool = _field(False, "continue the run saved in OUT/checkpoint")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field and what it accepts."""
        def positive(name: str, allow_none: bool = False, allow_zero: bool = False) -> None:
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
                raise GptforgeError(f"{name} must be an integer >= {0 if allow_zero else 1}, got {value!r}")

        for name in ("epochs", "batch_size", "grad_accum_steps"):
            positive(name)
        positive("max_steps", allow_none=True)
        positive("stride", allow_none=True)
        positive("eval_batches", allow_none=True, allow_zero=True)
        for name in ("seed", "warmup_steps", "eval_every", "checkpoint_every", "sample_tokens"):
            positive(name, allow_zero=True)
        for name in ("lr", "weight_decay", "grad_clip", "beta1", "beta2", "val_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
                raise GptforgeError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.lr <= 0:
            raise GptforgeError(f"lr must be > 0, got {self.lr}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise GptforgeError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if not (self.beta1 < 1 and self.beta2 < 1):
            raise GptforgeError(f"beta1 and beta2 must be < 1, got {self.beta1}, {self.beta2}")
        if not self.val_fraction < 1:
            raise GptforgeError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise GptforgeError(f"{f.name} must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}")
        if not isinstance(self.model_overrides, dict):
            raise GptforgeError(f"model_overrides must be a dict of GPTConfig fields, got {self.model_overrides!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        return cls(**known_fields(cls, data, "training options"))

    @classmethod
    def from_file(cls, path: str | Path, **changes: Any) -> TrainConfig:
        """Read a JSON or TOML config file (keys are the field names); `changes` win over it."""
        return cls.from_dict({**read_config_file(path), **changes})


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The options in a JSON (.json) or TOML (.toml) training config file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"training config file not found: {path}") from None
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except Exception as err:  # json and toml raise their own decode errors
        raise GptforgeError(f"{path} is not a valid {'TOML' if path.suffix == '.toml' else 'JSON'} file: {err}") from None
    if not isinstance(data, dict):
        raise GptforgeError(f"{path} must hold a table/object of training options")
    return data


# Options that may change when a run is resumed: they do not change what the next step computes.
RESUMABLE_CHANGES = frozenset({"epochs", "max_steps", "eval_every", "checkpoint_every", "progress",
                               "sample_prompt", "sample_tokens", "resume", "device", "compile"})


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
        return math.exp(self.val_loss) if self.val_loss is not None else None


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


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 for `autocast` when asked for (or, with "auto", when the device computes it natively:
    CUDA with bf16 support, CPUs with AVX512-BF16 or AMX); None means full fp32."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
    elif device.type == "cpu":
        supported = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    else:
        supported = False
    if precision == "bf16" and device.type not in ("cuda", "cpu"):
        raise GptforgeError(f"bf16 autocast is not available on {device.type}; use --precision fp32")
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if supported else None


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the OS.

    A training step allocates and frees the same large tensors (logits, activations, gradients)
    every step. By default glibc serves each one with a fresh mmap and unmaps it when freed, so
    every step page-faults all of that memory in again: measured here, that costs ~30% of a CPU
    step (the same effect as running under jemalloc or tcmalloc, which PyTorch's CPU tuning guide
    recommends). This turns off mmap for large blocks and lets the heap keep what is freed. It
    changes the whole process, so it is only applied to CPU training runs; it returns False where
    it does not apply (not Linux/glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


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
            with _autocast(device, autocast):
                loss = model(x.to(device), targets=y.to(device))  # this batch's mean, as the book's
            if world_size == 1:
                total += loss.item()
                continue
            loss_sum[0] = loss * y.numel()
            loss_sum[1] = y.numel()
        dist.all_reduce(loss_sum)
        total += (loss_sum[0] / loss_sum[1]).item()
    return total / len(batches)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class _StopRequest:
    """Turns the first Ctrl-C (SIGINT) or SIGTERM into a request to stop after the current step;
    a second Ctrl-C interrupts at once. Only the main thread can install signal handlers."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print("\ngptforge: stopping after this step and saving a checkpoint (Ctrl-C again to abort)",
              file=sys.stderr, flush=True)

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclasses.dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def _init_distributed(device_name: str) -> _Dist:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return _Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    owns = not dist.is_initialized()
    if owns:
        device = checkpoint.resolve_device(device_name, local_rank)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return _Dist(rank, world_size, local_rank, owns)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Metrics and the loss curve


class _Metrics:
    """JSON lines in OUT/metrics.jsonl (one per step, one per evaluation) and OUT/loss.png."""

    def __init__(self, out: Path, keep_before_step: int | None, enabled: bool):
        self.path = out / METRICS_FILE
        self.plot_path = out / PLOT_FILE
        self.enabled = enabled
        self.records: list[dict[str, Any]] = []
        self._plotted = -math.inf
        if not enabled:
            return
        if keep_before_step is not None and self.path.exists():  # resuming: drop what came after the checkpoint
            for line in self.path.read_text().splitlines():
                record = json.loads(line)
                if record["step"] < keep_before_step:
                    self.records.append(record)
        checkpoint.atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in self.records).encode())

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def plot(self, force: bool = False) -> None:
        """Redraw the loss curve (at most once a minute unless forced: drawing takes a while)."""
        if not self.enabled or (not force and time.monotonic() - self._plotted < 60):
            return
        self._plotted = time.monotonic()
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r for r in self.records if r["kind"] == "train"]
        evals = [r for r in self.records if r["kind"] == "eval"]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        if steps:
            ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, alpha=0.4, label="train (step)")
        if evals:
            ax.plot([r["step"] for r in evals], [r["train_loss"] for r in evals], marker=".", label="train (eval)")
            if any(r["val_loss"] is not None for r in evals):
                ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], marker=".", ls="-.", label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy loss (nats/token)")
        ax.legend(loc="upper right")
        fig.tight_layout()
        checkpoint.atomic_write(self.plot_path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
        plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The run


def _resolve_config(config: TrainConfig | None, options: Mapping[str, Any]) -> tuple[TrainConfig, dict | None]:
    """The run's config and, when resuming, the saved training state. `options` are the fields the
    caller set explicitly (on --resume only RESUMABLE_CHANGES may differ from the saved run)."""
    if config is not None:
        given = {**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                    if getattr(config, f.name) != f.default and f.name != "model_overrides"
                    or (f.name == "model_overrides" and config.model_overrides)}, **options}
        config = dataclasses.replace(config, **options)
    else:
        given = dict(options)
        config = TrainConfig(**options)
    if not config.resume:
        if config.data is None:
            raise GptforgeError("no training data given: pass data= (--data) a text file, a folder or a glob")
        return config, None
    ckpt = Path(config.out) / CHECKPOINT_DIR
    if not (ckpt / checkpoint.CONFIG_FILE).exists():
        raise FileNotFoundError(f"nothing to resume in {config.out}: no {CHECKPOINT_DIR}/ there; "
                                "start the run without --resume")
    state = checkpoint.load_training_state(ckpt)
    if state is None or state.get("version") != STATE_VERSION:
        raise GptforgeError(f"{ckpt} holds no gptforge training state to resume from")
    saved = TrainConfig.from_dict({**state["train_config"], "resume": True})
    changes = {}
    for name, value in given.items():
        if name == "out":
            continue
        if name in RESUMABLE_CHANGES:
            changes[name] = value
        elif value != getattr(saved, name):
            raise GptforgeError(f"{name} cannot change on --resume (the saved run has {getattr(saved, name)!r}, "
                             f"not {value!r}); only {', '.join(sorted(RESUMABLE_CHANGES))} can, or start a new "
                             "run in another --out")
    return dataclasses.replace(saved, out=str(config.out), **changes), state


def train(config: TrainConfig | None = None, /, *, on_step: Callable[[dict[str, Any]], None] | None = None,
          **options: Any) -> TrainResult:
    """Train a GPT model; the Python twin of `gptforge train`.

    `train(TrainConfig(...))`, `train(data="corpus/", model="gpt2-124m", out="runs/x", epochs=2)`
    and `train(out="runs/x", resume=True)` all work; options are TrainConfig's fields.
    on_step: called on rank 0 with each step's metrics record (after the update).
    Returns a TrainResult. Launched by torchrun, every process calls this the same way.
    """
    cfg, saved_state = _resolve_config(config, options)
    dctx = _init_distributed(cfg.device)
    try:
        with _StopRequest() as stop:
            return _run(cfg, saved_state, dctx, stop, on_step)
    finally:
        if dctx.owns_group:
            dist.destroy_process_group()


def _run(cfg: TrainConfig, saved_state: dict | None, dctx: _Dist, stop: _StopRequest,
         on_step: Callable[[dict[str, Any]], None] | None) -> TrainResult:
    out = Path(cfg.out)
    device = checkpoint.resolve_device(cfg.device, dctx.local_rank)
    amp = autocast_dtype(cfg.precision, device)
    if device.type == "cpu":
        keep_freed_memory()
    if dctx.main:
        out.mkdir(parents=True, exist_ok=True)

    # Data: rank 0 tokenizes (once; later runs reuse the token files), the others wait and map them.
    if dctx.main:
        corpus = tokenize_corpus(cfg.data, out / "data", val_fraction=cfg.val_fraction)
    dctx.barrier()
    if not dctx.main:
        corpus = tokenize_corpus(cfg.data, out / "data", val_fraction=cfg.val_fraction)
    if saved_state is not None and saved_state["data"]["digest"] != corpus_digest(corpus):
        raise GptforgeError(f"the data {cfg.data} changed since the checkpoint was saved; resume with the same files")

    # Model: seeded right before it is built, as the book does.
    torch.manual_seed(cfg.seed)
    if saved_state is not None:
        model = checkpoint.load(out / CHECKPOINT_DIR)
    else:
        model = model_from_spec(cfg.model, cfg.model_overrides)
    model.to(device).train()
    ctx_len = model.cfg.context_length
    if corpus.train_tokens and model.cfg.vocab_size < get_tokenizer().vocab_size:
        raise GptforgeError(f"the model's vocab_size {model.cfg.vocab_size} is smaller than GPT-2's "
                         f"{get_tokenizer().vocab_size} token ids; use vocab_size >= 50257")
    train_windows = TokenWindows(corpus.train(), ctx_len, cfg.stride, name="training text")
    val_windows = None
    if corpus.val_tokens:
        val_windows = TokenWindows(corpus.val(), ctx_len, ctx_len, name="validation text (val_fraction)")
    global_batch = cfg.batch_size * cfg.grad_accum_steps * dctx.world_size
    steps_per_epoch = len(train_windows) // global_batch
    if steps_per_epoch == 0:
        raise GptforgeError(f"the training text gives {len(train_windows)} windows of {ctx_len + 1} tokens, "
                         f"fewer than one global batch of {global_batch}; lower batch_size/grad_accum_steps "
                         "or stride, or use more text")
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch

    if dctx.world_size > 1 and dctx.rank > 0:
        torch.manual_seed(cfg.seed + dctx.rank)  # own dropout masks on each rank

    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if cfg.fsdp:
        model = _shard(model, raw_model, dctx)
    elif dctx.world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    groups = [{"params": list(raw_model.parameters()), "weight_decay": cfg.weight_decay}] \
        if cfg.decay == "all" else parameter_groups(raw_model, cfg.weight_decay)
    # Fused AdamW is faster; the book's run keeps torch's default implementation for exactness.
    fused = {"fused": True} if (device.type in ("cuda", "cpu") and cfg.data_order != "book") else {}
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  weight_decay=cfg.weight_decay, **fused)

    step, tokens_seen, epoch_seed = 0, 0, None
    if saved_state is not None:
        if cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, optimizer, saved_state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(saved_state["optimizer"])
        step = saved_state["step"]
        tokens_seen = saved_state["tokens_seen"]
        epoch_seed = saved_state["epoch_seed"]
        rngs = saved_state["rng"]
        if len(rngs) == dctx.world_size:
            _set_rng_state(rngs[dctx.rank])
        else:
            print(f"gptforge: the checkpoint was written by {len(rngs)} processes, this run has "
                  f"{dctx.world_size}: dropout randomness will differ from an uninterrupted run", file=sys.stderr)
            torch.manual_seed(cfg.seed + step + dctx.rank)

    metrics = _Metrics(out, step if saved_state is not None else 0, dctx.main)
    if dctx.main:
        checkpoint.atomic_write_bytes(out / "train_config.json", (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())
    progress = _progress_bar(cfg.progress and dctx.main, total_steps, step)

    def epoch_order(epoch: int, seed: int | None) -> tuple[list[list[int]], int]:
        if seed is None:
            seed = draw_loader_seed(shuffle=True) if cfg.data_order == "book" else cfg.seed * 1_000_003 + epoch
        order = permutation(len(train_windows), seed)
        return batch_indices(len(train_windows), global_batch, order=order, drop_last=True), seed

    eval_order = None if cfg.data_order == "book" else permutation(len(train_windows), cfg.seed + 7)

    def run_eval() -> tuple[float, float | None]:
        raw_model.eval()
        eval_model = model if cfg.fsdp else raw_model
        n = cfg.eval_batches or None
        if cfg.data_order == "book":
            order = permutation(len(train_windows), draw_loader_seed(shuffle=True))
        else:
            order = eval_order
        eval_batch = cfg.batch_size * dctx.world_size
        train_loss = evaluate(eval_model, train_windows, eval_batch, n, order=order, drop_last=True,
                              device=device, autocast=amp, **_shard_args(dctx))
        val_loss = None
        if val_windows is not None:
            if cfg.data_order == "book":
                draw_loader_seed(shuffle=False)
            val_loss = evaluate(eval_model, val_windows, eval_batch, n, device=device, autocast=amp,
                                **_shard_args(dctx))
        raw_model.train()
        return train_loss, val_loss

    def save() -> Path:
        ckpt = out / CHECKPOINT_DIR
        _save_checkpoint(ckpt, model, raw_model, optimizer, dctx, cfg, {
            "version": STATE_VERSION, "step": step, "tokens_seen": tokens_seen, "epoch_seed": epoch_seed,
            "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
            "train_config": cfg.to_dict(),
            "data": {"digest": corpus_digest(corpus), "train_tokens": corpus.train_tokens,
                     "val_tokens": corpus.val_tokens},
        })
        return ckpt

    last_train_loss = last_val_loss = None
    last_eval_step = -1
    interrupted = False
    batches = None
    window_tokens = global_batch * ctx_len
    t_last = time.perf_counter()
    model.train()
    while step < total_steps:
        epoch, position = divmod(step, steps_per_epoch)
        if position == 0 or batches is None:
            batches, epoch_seed = epoch_order(epoch, epoch_seed if position > 0 else None)
        global_indices = batches[position]
        lr = learning_rate(step, cfg, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for micro in range(cfg.grad_accum_steps):
            first = (micro * dctx.world_size + dctx.rank) * cfg.batch_size
            x, y = train_windows.batch(global_indices[first:first + cfg.batch_size])
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            sync = micro == cfg.grad_accum_steps - 1 or not hasattr(model, "no_sync")
            with (contextlib.nullcontext() if sync else model.no_sync()), _autocast(device, amp):
                loss = model(x, targets=y)  # mean cross-entropy, without materialising the logits
            (loss / cfg.grad_accum_steps).backward()
            loss_sum += loss.item()
        if cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        else:
            grad_norm = None
        optimizer.step()
        tokens_seen += window_tokens

        # One all-reduce carries the loss for the log and whether any rank was asked to stop.
        flags = torch.tensor([loss_sum / cfg.grad_accum_steps, float(stop.requested)], device=device)
        if dctx.world_size > 1:
            dist.all_reduce(flags)
        step_loss = flags[0].item() / dctx.world_size
        stop_now = flags[1].item() > 0
        now = time.perf_counter()
        tok_s = window_tokens / max(now - t_last, 1e-9)
        t_last = now
        record = {"kind": "train", "step": step, "epoch": epoch, "loss": step_loss, "lr": lr,
                  "grad_norm": grad_norm, "tokens_seen": tokens_seen, "tokens_per_s": tok_s}
        metrics.log(record)
        progress.update(1)
        progress.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
        if on_step is not None and dctx.main:
            on_step(record)
            stop_now = stop_now or stop.requested  # a callback may ask to stop (tests do)

        if (cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps - 1:
            last_train_loss, last_val_loss = run_eval()
            last_eval_step = step
            sample = None
            if cfg.sample_tokens and dctx.main and not cfg.fsdp:
                # Greedy (the run's RNG is untouched) and, as the book's sample, not cut at <|endoftext|>.
                sample = generate_text(raw_model, cfg.sample_prompt, cfg.sample_tokens, stop_token_ids=())
            metrics.log({"kind": "eval", "step": step, "epoch": epoch, "tokens_seen": tokens_seen,
                         "train_loss": last_train_loss, "val_loss": last_val_loss,
                         "val_perplexity": math.exp(last_val_loss) if last_val_loss is not None else None,
                         "sample": sample})
            if dctx.main:
                val_text = f", val loss {last_val_loss:.3f} (perplexity {math.exp(last_val_loss):,.1f})" \
                    if last_val_loss is not None else ""
                progress.write(f"step {step} (epoch {epoch + 1}): train loss {last_train_loss:.3f}{val_text}")
                if sample is not None:
                    progress.write("  sample: " + sample.replace("\n", " "))
                metrics.plot()
            t_last = time.perf_counter()  # evaluation time does not count against tokens/s

        step += 1
        if stop_now and step < total_steps:
            interrupted = True
            save()
            if dctx.main:
                metrics.plot(force=True)
                progress.write(f"gptforge: interrupted after step {step - 1}; checkpoint saved to "
                               f"{out / CHECKPOINT_DIR}; continue with --resume --out {out}")
            break
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total_steps:
            save()
            t_last = time.perf_counter()
    else:
        ckpt = save()
        if dctx.main:
            metrics.plot(force=True)
    progress.close()
    return TrainResult(out=out, checkpoint=out / CHECKPOINT_DIR, steps=step, tokens_seen=tokens_seen,
                       interrupted=interrupted, train_loss=last_train_loss, val_loss=last_val_loss)


def _shard_args(dctx: _Dist) -> dict[str, int]:
    return {"rank": dctx.rank, "world_size": dctx.world_size}


def _progress_bar(enabled: bool, total: int, initial: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Checkpoints and FSDP


def _save_checkpoint(ckpt: Path, model: nn.Module, raw_model: GPTModel, optimizer: torch.optim.Optimizer,
                     dctx: _Dist, cfg: TrainConfig, state: dict[str, Any]) -> None:
    """Every rank calls this (RNG states and, with FSDP, shards are gathered); rank 0 writes."""
    rngs = [_rng_state()]
    if dctx.world_size > 1:
        rngs = [None] * dctx.world_size
        dist.all_gather_object(rngs, _rng_state())
        rngs = [{k: (v.cpu() if isinstance(v, torch.Tensor) else [t.cpu() for t in v]) for k, v in r.items()}
                for r in rngs]
    if cfg.fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(model, options=options)
        optim_state = get_optimizer_state_dict(model, optimizer, options=options)
        if dctx.main:
            to_save = checkpoint.build_model(raw_model.cfg, model_state, "FSDP full state dict")
    else:
        to_save, optim_state = raw_model, optimizer.state_dict()
    if dctx.main:
        checkpoint.save(to_save, ckpt, training_state={**state, "optimizer": optim_state, "rng": rngs})
    dctx.barrier()


def _shard(model: nn.Module, raw_model: GPTModel, dctx: _Dist) -> nn.Module:
    """FSDP2: each transformer block is a unit, the embeddings/head the root (a tied head stays one
    tensor). Parameters, gradients and optimizer state are split across the ranks."""
    if dctx.world_size == 1:
        raise GptforgeError("--fsdp shards across processes: launch with torchrun --nproc-per-node N (N >= 2)")
    from torch.distributed.fsdp import fully_shard

    for block in raw_model.trf_blocks:
        fully_shard(block)
    fully_shard(raw_model)
    return model
