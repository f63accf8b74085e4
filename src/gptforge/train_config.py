"""TrainConfig: every option of a training run (the `gptforge train` flags, a JSON/TOML config file)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import GPTConfig, known_fields
from .errors import GptforgeError
from .loggers import parse_loggers
from .lora import check_lora_options
from .options import SEED_MAX, check_path, check_value, option


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run is made of. The CLI's `gptforge train` flags are these fields
    (`--batch-size` for `batch_size`), and a JSON/TOML config file holds the same keys."""

    data: str | list[str] | None = option(None, "text file, folder or glob of them; llm.c .bin token shards; "
                                          "a datasets save_to_disk folder, parquet/JSONL/arrow files, or a "
                                          "hub dataset id (docs/training.md)")
    data_config: str | None = option(None, "a hub dataset's config (subset), e.g. sample-10BT")
    data_column: str = option("text", "a dataset's text column")
    data_max_tokens: int | None = option(None, "tokenize a dataset's first this many tokens only")
    model: str = option("gpt2-124m", "preset name, model config JSON, or checkpoint dir (finetuning)")
    out: str = option("runs/gptforge", "output folder: checkpoint, metrics, loss curve, token files")
    model_overrides: dict = option({}, "GPTConfig fields to change, e.g. {\"context_length\": 256}")
    seed: int = option(123, "torch seed: model initialisation, dropout, data order", minimum=0, maximum=SEED_MAX)
    epochs: int = option(1, "passes over the training windows (ignored when max_steps is set)")
    max_steps: int | None = option(None, "optimizer steps in all (default: epochs * steps per epoch)")
    batch_size: int = option(8, "windows per micro-batch, per process")
    grad_accum_steps: int = option(1, "micro-batches accumulated per optimizer step")
    stride: int | None = option(None, "tokens between window starts (default: context_length)")
    val_fraction: float = option(0.1, "share of the text, from its end, held out for validation")
    lr: float = option(4e-4, "peak learning rate")
    min_lr: float | None = option(None, "learning rate at the end of the cosine (default: lr / 10)")
    warmup_steps: int = option(0, "linear warmup steps from 0 to lr")
    schedule: str = option("cosine", "cosine (after warmup) or constant", choices=("cosine", "constant"))
    weight_decay: float = option(0.1, "AdamW weight decay")
    decay: str = option("matrices", "which parameters decay: matrices (not biases, norms, embeddings) "
                        "or all (the book's AdamW(model.parameters()))", choices=("matrices", "all"))
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: no clipping)")
    eval_every: int = option(100, "evaluate every this many steps, at steps 0, N, 2N, ... (0: only at the end)")
    eval_batches: int | None = option(20, "batches per loss estimate (None/0: all of them)")
    sample_prompt: str = option("Every effort moves you", "prompt continued (greedy) at each evaluation")
    sample_tokens: int = option(50, "tokens of that continuation (0: no sample)")
    checkpoint_every: int = option(500, "save a checkpoint every this many steps (0: only at the end)")
    precision: str = option("auto", "auto (bf16 autocast where the device has it), bf16 or fp32",
                            choices=("auto", "bf16", "fp32"))
    compile: bool = option(False, "torch.compile the model")
    device: str = option("auto", "auto, cpu, cuda, cuda:N, mps")
    data_order: str = option("seeded", "seeded (per-epoch generator from the seed) or book (the "
                             "global RNG, as the book's DataLoader)", choices=("seeded", "book"))
    fsdp: bool = option(False, "shard parameters, gradients and optimizer state with FSDP (torchrun)")
    progress: bool = option(True, "show a progress bar")
    logger: str = option("csv", "where metrics go, comma-separated: csv (metrics.jsonl, always), tensorboard, "
                         "wandb, mlflow")
    grad_checkpointing: bool = option(False, "recompute each block's activations in backward (less memory, "
                                      "one more forward pass)")
    resume: bool = option(False, "continue the run saved in OUT/checkpoint")
    lora_rank: int | None = option(None, "train LoRA adapters of this rank only (base frozen; needs a "
                                   "checkpoint as --model; the checkpoint saved holds only the adapters)")
    lora_alpha: float = option(16.0, "LoRA alpha (the book's 16)")
    lora_scaling: str = option("book", "LoRA update scaled by alpha (book, appendix E) or alpha/rank (peft)",
                               choices=("book", "peft"))
    lora_targets: str = option("all", "Linear layers with adapters: all (the book) or names, e.g. W_query,W_value")

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
        positive("data_max_tokens", allow_none=True)
        positive("eval_batches", allow_none=True, allow_zero=True)
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "sample_tokens"):
            positive(name, allow_zero=True)
        check_value("seed", self.seed, "int", minimum=0, maximum=SEED_MAX)
        for name in ("out", "model"):
            check_path(name, getattr(self, name))
        if self.data is not None:
            for path in self.data if isinstance(self.data, (list, tuple)) else [self.data]:
                check_path("data (a path, or a list of them)", path)
        for name in ("sample_prompt", "device", "lora_targets", "data_column", "logger"):
            if not isinstance(getattr(self, name), str):
                raise GptforgeError(f"{name} must be a str, got {getattr(self, name)!r}")
        if self.data_config is not None and not isinstance(self.data_config, str):
            raise GptforgeError(f"data_config must be a str, got {self.data_config!r}")
        parse_loggers(self.logger)  # an unknown or uninstalled logger fails before any work
        for name in ("compile", "fsdp", "progress", "resume", "grad_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise GptforgeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not str(self.out).strip():  # Path("") is the current directory: never meant
            raise GptforgeError(f"out must name a folder, got {self.out!r}")
        if not str(self.model).strip():
            raise GptforgeError("no model given (an empty model); name a preset, a config .json or a checkpoint")
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
        if self.lora_rank is not None:
            check_lora_options(self.lora_rank, self.lora_alpha, self.lora_scaling)
        if not isinstance(self.model_overrides, dict):
            raise GptforgeError(f"model_overrides must be a dict of GPTConfig fields, got {self.model_overrides!r}")
        known_fields(GPTConfig, self.model_overrides, "GPTConfig fields (--set KEY=VALUE)")

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
    except (OSError, UnicodeDecodeError) as err:  # a folder, no permission, not text
        raise GptforgeError(f"training config file {path} cannot be read ({getattr(err, 'strerror', None) or err})") \
            from None
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
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:  # a typo would otherwise be TrainConfig's TypeError
        raise GptforgeError(f"{path}: unknown training options {unknown}; the keys are the `gptforge train` "
                            "flags' names with underscores (e.g. batch_size, max_steps)")
    return data


# Options that may change when a run is resumed: they do not change what the next step computes.
RESUMABLE_CHANGES = frozenset({"epochs", "max_steps", "eval_every", "checkpoint_every", "progress",
                               "sample_prompt", "sample_tokens", "resume", "device", "compile",
                               "logger", "grad_checkpointing"})
