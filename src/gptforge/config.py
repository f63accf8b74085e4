"""Model configuration: the `GPTConfig` dataclass, its validation, and the named GPT-2 presets."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from .errors import GptforgeError, did_you_mean

# The seed's dict keys (llms-from-scratch, ch04 `GPT_CONFIG_124M`) plus our two extensions.
SEED_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias")
INIT_SCHEMES = ("torch", "gpt2")


POOLS = ("last-real", "last")


@dataclasses.dataclass(frozen=True)
class ClassifierSpec:
    """What makes a model a text classifier (book chapter 6): its output head is
    Linear(emb_dim, len(labels)) with a bias, and one position's logits classify a text.

    labels: the class names, class id i is labels[i].
    pool: "last-real" reads the last real (non-padding) token, as Hugging Face's
        GPT2ForSequenceClassification; "last" reads the last position even when it is padding,
        exactly as the book does.
    max_length: the padded length of the training texts; inputs are padded (with 50256) or cut to
        it when classifying, as the book's `classify_review` (it only changes results with "last").
    """

    labels: tuple[str, ...]
    pool: str = "last-real"
    max_length: int | None = None

    def __post_init__(self) -> None:
        labels = tuple(self.labels) if isinstance(self.labels, (list, tuple)) else self.labels
        if not isinstance(labels, tuple) or len(labels) < 2 or not all(isinstance(x, str) and x for x in labels):
            raise GptforgeError(f"a classifier needs two or more non-empty label names, got {self.labels!r}")
        if len(set(labels)) != len(labels):
            raise GptforgeError(f"classifier label names must be distinct, got {list(labels)}")
        object.__setattr__(self, "labels", labels)
        if self.pool not in POOLS:
            raise GptforgeError(f"pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        if self.max_length is not None and (isinstance(self.max_length, bool) or not isinstance(self.max_length, int)
                                            or self.max_length < 1):
            raise GptforgeError(f"classifier max_length must be a positive integer, got {self.max_length!r}")

    @property
    def num_classes(self) -> int:
        return len(self.labels)


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """How an instruction (and optional input) becomes a prompt, saved with an instruction-tuned
    model (config.json key "prompt_template") so that responses, `serve`'s chat endpoint and
    `judge` format prompts as its training did.

    The default is the book's Alpaca template (llms-from-scratch ch07): `prompt(i, x)` equals the
    book's `format_input({"instruction": i, "input": x}) + "\\n\\n### Response:\\n"`. Generation
    stops at the end token or at the first of `stop` (the next `###` section)."""

    preamble: str = ("Below is an instruction that describes a task. "
                     "Write a response that appropriately completes the request.")
    instruction: str = "\n\n### Instruction:\n"
    input: str = "\n\n### Input:\n"
    response: str = "\n\n### Response:\n"
    stop: tuple[str, ...] = ("\n\n###", "###")  # the first keeps the blank line out of the response
    name: str = "alpaca"

    def __post_init__(self) -> None:
        stop = tuple(self.stop) if isinstance(self.stop, (list, tuple)) else self.stop
        strings = [getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "stop"]
        if not all(isinstance(v, str) for v in strings) or not isinstance(stop, tuple) or not all(
                isinstance(v, str) and v for v in stop):
            raise GptforgeError(f"bad prompt template {self!r}: its fields are strings and 'stop' a list of "
                                f"non-empty strings")
        object.__setattr__(self, "stop", stop)

    def format_input(self, instruction: str, input: str = "") -> str:
        """The instruction part of the prompt: the book's `format_input`."""
        return self.preamble + self.instruction + instruction + (self.input + input if input else "")

    def prompt(self, instruction: str, input: str = "") -> str:
        """The whole prompt a response follows."""
        return self.format_input(instruction, input) + self.response


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """The shape of a GPT-2 model.

    Field names are the book's dict keys, so `GPTConfig(**GPT_CONFIG_124M)` and
    `GPTModel(GPT_CONFIG_124M)` both work with the book's plain dict.

    tie_weights: the output head reuses the token embedding matrix (GPT-2 does; the book does not).
    init: "torch" keeps PyTorch's default initialisers in the book's construction order (this is
        what reproduces the seed's figures); "gpt2" is GPT-2's scheme for training from scratch
        (normal(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layers)).
    classifier: None for a language model; a ClassifierSpec (labels, pooling) for a text
        classifier, whose output head has one output per label (config.json key "classifier").
    prompt_template: None for a base model; the PromptTemplate an instruction-tuned model was
        trained with (what `serve` applies to chat messages).
    """

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1
    qkv_bias: bool = False
    tie_weights: bool = False
    init: str = "torch"
    classifier: ClassifierSpec | None = None
    prompt_template: PromptTemplate | None = None

    def __post_init__(self) -> None:
        for name, kind in (("classifier", ClassifierSpec), ("prompt_template", PromptTemplate)):
            value = getattr(self, name)
            if isinstance(value, Mapping):  # from config.json
                value = kind(**known_fields(kind, value, f"{name} keys"))
                object.__setattr__(self, name, value)
            if value is not None and not isinstance(value, kind):
                raise GptforgeError(f"GPTConfig.{name} must be a {kind.__name__} or None, got {value!r}")
        if self.classifier is not None and self.tie_weights:
            raise GptforgeError("a classifier's output head cannot be tied to the token embedding; "
                                "use tie_weights=False")
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise GptforgeError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.emb_dim % self.n_heads != 0:
            raise GptforgeError(
                f"GPTConfig.emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})"
            )
        if isinstance(self.drop_rate, bool) or not isinstance(self.drop_rate, (int, float)) or not (
            0.0 <= self.drop_rate < 1.0
        ):
            raise GptforgeError(f"GPTConfig.drop_rate must satisfy 0 <= drop_rate < 1, got {self.drop_rate!r}")
        for name in ("qkv_bias", "tie_weights"):
            if not isinstance(getattr(self, name), bool):
                raise GptforgeError(f"GPTConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.init not in INIT_SCHEMES:
            raise GptforgeError(f"GPTConfig.init must be one of {INIT_SCHEMES}, got {self.init!r}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    # Book code indexes its config dict (`cfg["emb_dim"]`); let it index ours the same way.
    def __getitem__(self, key: str) -> Any:
        if key not in _FIELDS:
            raise KeyError(key)
        return getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain values; "classifier" only for a classifier (language models' dicts
        keep the book's keys and ours, nothing more)."""
        data = dataclasses.asdict(self)
        if self.classifier is None:
            del data["classifier"]
        else:
            data["classifier"]["labels"] = list(self.classifier.labels)
        return data

    def replace(self, **changes: Any) -> GPTConfig:
        return dataclasses.replace(self, **known_fields(GPTConfig, changes, "GPTConfig keys"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GPTConfig:
        """Build from a dict with the seed's keys (others are rejected, naming them)."""
        return cls(**known_fields(cls, data, "GPTConfig keys"))

    @classmethod
    def from_json(cls, path: str | Path) -> GPTConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except json.JSONDecodeError as err:
            raise GptforgeError(f"config file {path} is not valid JSON: {err}") from None
        except (OSError, UnicodeDecodeError) as err:  # a folder, no permission, not text
            raise GptforgeError(f"config file {path} cannot be read ({getattr(err, 'strerror', None) or err})") from None
        if not isinstance(data, dict):
            raise GptforgeError(f"config file {path} must hold a JSON object")
        return cls.from_dict(data)


_FIELDS = frozenset(field.name for field in dataclasses.fields(GPTConfig))  # what `cfg[key]` may name


def known_fields(cls: type, data: Mapping[str, Any], what: str) -> dict[str, Any]:
    """`data` as keyword arguments for the dataclass `cls`; unknown keys raise ValueError naming
    them and the known ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise GptforgeError(f"unknown {what} {unknown}; known {what} are {sorted(known)}")
    return dict(data)


def check_language_model(cfg: GPTConfig, name: str = "this model") -> None:
    """Refuse a classifier where tokens are predicted (generate, serve, train, instruct, GGUF): its
    head has one row per label, not one per token, so it would emit label ids as tokens."""
    if cfg.classifier is not None:
        raise GptforgeError(f"{name} is a classifier (labels {', '.join(map(str, cfg.classifier.labels))}), not a "
                            "language model: its head scores labels, not tokens; use it with `gptforge classify` "
                            "or `gptforge eval`")


def as_config(cfg: GPTConfig | Mapping[str, Any] | str) -> GPTConfig:
    """Accept a GPTConfig, a seed-style dict or a preset name."""
    if isinstance(cfg, GPTConfig):
        return cfg
    if isinstance(cfg, str):
        return preset(cfg)
    if isinstance(cfg, Mapping):
        return GPTConfig.from_dict(cfg)
    raise GptforgeError(f"expected a GPTConfig, a dict or a preset name, got {type(cfg).__name__}")


# Real GPT-2 shapes: OpenAI's released hparams.json for 124M/355M/774M/1558M, identical to
# Hugging Face's config.json for gpt2, gpt2-medium, gpt2-large and gpt2-xl (n_ctx 1024,
# n_vocab 50257, attention/residual/embedding dropout 0.1, c_attn with bias, wte tied to lm_head).
# Trained from scratch they start from GPT-2's initialisation (loss ~ln 50257), as nanoGPT and transformers do.
_GPT2 = dict(vocab_size=50257, context_length=1024, drop_rate=0.1, qkv_bias=True, tie_weights=True, init="gpt2")

PRESETS: dict[str, GPTConfig] = {
    "gpt2-124m": GPTConfig(**_GPT2, emb_dim=768, n_heads=12, n_layers=12),
    "gpt2-355m": GPTConfig(**_GPT2, emb_dim=1024, n_heads=16, n_layers=24),
    "gpt2-774m": GPTConfig(**_GPT2, emb_dim=1280, n_heads=20, n_layers=36),
    "gpt2-1558m": GPTConfig(**_GPT2, emb_dim=1600, n_heads=25, n_layers=48),
    # The seed's configuration: the book's GPT_CONFIG_124M (ch04), untied head, no qkv bias.
    "book-124m": GPTConfig(
        vocab_size=50257, context_length=1024, emb_dim=768, n_heads=12, n_layers=12,
        drop_rate=0.1, qkv_bias=False, tie_weights=False,
    ),
}


def preset(name: str) -> GPTConfig:
    """Return the named preset; unknown names raise ValueError listing the known ones."""
    if not isinstance(name, str):
        raise GptforgeError(f"a preset is named by a string, one of {', '.join(PRESETS)}; got {name!r}")
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise GptforgeError(f"unknown preset {name!r}{did_you_mean(name, PRESETS) or '; choose one of ' + ', '.join(PRESETS)}") from None
