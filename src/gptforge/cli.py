"""The `gptforge` command line: one function per verb, each a thin door onto the Python API.
Bad input ends with one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence

import torch

DEFAULT_MODEL = "book-124m"


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line, exit code 2."""


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _format_count(n: int) -> str:
    return f"{n:,}"


def cmd_info(args: argparse.Namespace) -> None:
    """Print the parameter counts by component and the weights' memory, without building the model."""
    from .config import PRESETS
    from .model import count_parameters

    if args.model.lower() in PRESETS:
        cfg = PRESETS[args.model.lower()]
    else:
        from .checkpoint import load

        cfg = load(args.model).cfg
    counts = count_parameters(cfg)
    rows = [
        ("embeddings (token + position)", counts.embeddings),
        ("attention", counts.attention),
        ("feed-forward", counts.feed_forward),
        ("layer norms", counts.norms),
        ("output head" + (" (tied to token embedding)" if cfg.tie_weights else ""), counts.head),
        ("total", counts.total),
        ("total, output head counted once", counts.total_head_once),
    ]
    print(f"model: {args.model}")
    print(", ".join(f"{k}={v}" for k, v in cfg.to_dict().items()))
    width = max(len(r[0]) for r in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {_format_count(value):>15}")
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        print(f"{'weights in ' + name:<{width}}  {counts.weight_bytes(dtype) / 2**20:>12,.1f} MiB")


def cmd_generate(args: argparse.Namespace) -> None:
    """Print the prompt's continuation."""
    from .checkpoint import load
    from .generation import generate_text

    torch.manual_seed(args.seed)
    model = load(args.model, device=args.device)
    print(generate_text(model, args.prompt, args.max_new_tokens))


def _train_options(args: argparse.Namespace) -> dict:
    """TrainConfig options from a config file and the flags given (flags win)."""
    from .train import TrainConfig, read_config_file

    options = read_config_file(args.config) if args.config else {}
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            options[f.name] = value
    for item in args.set or []:
        key, sep, text = item.partition("=")
        if not sep:
            raise UsageError(f"--set expects KEY=VALUE (a GPTConfig field), got {item!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        options.setdefault("model_overrides", {})
        options["model_overrides"] = {**options["model_overrides"], key.strip(): value}
    return options


def cmd_train(args: argparse.Namespace) -> int:
    """Train (or finetune, or resume) a model; exit code 130 when stopped by Ctrl-C after saving."""
    from .train import train

    result = train(**_train_options(args))
    val = f", val loss {result.val_loss:.4f} (perplexity {result.val_perplexity:,.2f})" if result.val_loss is not None else ""
    train_loss = f", train loss {result.train_loss:.4f}" if result.train_loss is not None else ""
    print(f"{'stopped' if result.interrupted else 'done'} after {result.steps} steps, "
          f"{result.tokens_seen:,} tokens{train_loss}{val}; checkpoint: {result.checkpoint}")
    return 130 if result.interrupted else 0


def _add_train_parser(verbs: argparse._SubParsersAction) -> None:
    from .train import TrainConfig

    tr = verbs.add_parser(
        "train", help="train, finetune or resume a model on text",
        description="Train on a text file, folder or glob. Flags are TrainConfig fields; a --config "
                    "JSON/TOML file holds the same keys (flags win). Launch with torchrun for several processes.",
    )
    tr.add_argument("--config", metavar="FILE", help="JSON or TOML file of training options")
    tr.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="change a model config field, e.g. --set context_length=256 (repeatable)")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "model_overrides":
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        kw: dict = {"dest": f.name, "default": None, "help": f.metadata["help"]}
        if kind == "bool":
            tr.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if kind.startswith("int"):
            kw["type"] = _non_negative_int
        elif kind.startswith("float"):
            kw["type"] = float
        tr.add_argument(flag, **kw)
    tr.set_defaults(func=cmd_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptforge", description="GPT-2 from scratch: inspect, generate, train, serve.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")

    info = verbs.add_parser("info", help="parameter counts and memory of a model")
    info.add_argument("model", metavar="MODEL", help="preset name (e.g. gpt2-124m, book-124m)")
    info.set_defaults(func=cmd_info)

    gen = verbs.add_parser("generate", help="continue a prompt")
    gen.add_argument("prompt", metavar="PROMPT", help="text to continue; empty starts from <|endoftext|>")
    gen.add_argument("--model", default=DEFAULT_MODEL, help=f"preset name (default: {DEFAULT_MODEL})")
    gen.add_argument("--max-new-tokens", type=_non_negative_int, default=50, help="tokens to generate (default: 50)")
    gen.add_argument("--seed", type=_non_negative_int, default=123, help="torch seed, also for a preset's random weights (default: 123)")
    gen.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    gen.set_defaults(func=cmd_generate)

    _add_train_parser(verbs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except (UsageError, ValueError, FileNotFoundError) as err:
        print(f"gptforge: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gptforge: interrupted", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
