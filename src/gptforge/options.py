"""Options described once: a dataclass field carries its help text, choices and range in its metadata,
and from that one description come both the validation of a value (`check_value`, `check_fields`)
and the command-line flag (`add_flags`). `GenerationConfig` and the CLI's `generate`/`serve` flags
use it, and so do `TrainConfig` and the finetuning configs."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from typing import Any

from .errors import GptforgeError

# The largest seed any option takes: torch's generators hold 64 bits, and seed + rank or + step
# (training) must still fit.
SEED_MAX = 2**63 - 1


def option(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field with its description. meta: choices, minimum, maximum, above (exclusive
    minimum), metavar, flag (the CLI flag when it is not --field-name), cli=False (no flag)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **meta})
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def _kind(annotation: Any) -> str:
    """'int', 'float', 'bool', 'str', 'ints' (a tuple of ints), 'strs' or 'other' from a field's annotation."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    for name, kind in (("tuple[int", "ints"), ("tuple[str", "strs"), ("bool", "bool"), ("int", "int"),
                       ("float", "float"), ("str", "str")):
        if text.startswith(name):
            return kind
    return "other"


def _range_text(meta: dict) -> str:
    low = f"> {meta['above']}" if "above" in meta else f">= {meta['minimum']}" if "minimum" in meta else ""
    high = f"<= {meta['maximum']}" if "maximum" in meta else ""
    return " and ".join(part for part in (low, high) if part)


def check_value(name: str, value: Any, kind: str, *, minimum: float | None = None, maximum: float | None = None,
                above: float | None = None, optional: bool = False) -> Any:
    """Return `value` if it is a finite `kind` ('int' or 'float') in range, else raise GptforgeError
    naming `name`. Booleans are not numbers here; None passes when `optional`."""
    if value is None and optional:
        return value
    is_int = isinstance(value, int) and not isinstance(value, bool)
    ok = is_int if kind == "int" else (is_int or isinstance(value, float)) and math.isfinite(value)
    meta = {k: v for k, v in (("minimum", minimum), ("maximum", maximum), ("above", above)) if v is not None}
    if ok:
        ok = ((minimum is None or value >= minimum) and (maximum is None or value <= maximum)
              and (above is None or value > above))
    if not ok:
        what = "an integer" if kind == "int" else "a number"
        bounds = _range_text(meta)
        raise GptforgeError(f"{name} must be {what}{' ' + bounds if bounds else ''}, got {value!r}")
    return value


def check_path(name: str, value: Any) -> Any:
    """Return `value` if it is a str or os.PathLike, else raise GptforgeError naming `name` (None or a
    number would otherwise fail inside pathlib, or be read as a name such as 'None')."""
    if not isinstance(value, (str, os.PathLike)):
        raise GptforgeError(f"{name} must be a str or pathlib.Path, got {type(value).__name__}")
    return value


def _field_range(f: dataclasses.Field) -> dict:
    return {k: f.metadata[k] for k in ("minimum", "maximum", "above") if k in f.metadata}


def check_fields(obj: Any) -> None:
    """Check every int/float field of a dataclass instance against its metadata range."""
    for f in dataclasses.fields(obj):
        kind = _kind(f.type)
        if kind in ("int", "float"):
            optional = "None" in str(f.type)
            check_value(f"{type(obj).__name__}.{f.name}", getattr(obj, f.name), kind, optional=optional,
                        **_field_range(f))


def flag_type(kind: str, flag: str, limits: dict):
    """An argparse `type` that parses `kind` ('int', 'float' or 'ints', comma-separated) and applies
    `limits` (minimum, maximum, above); a bad value is argparse's one-line error."""
    def parse(text: str):
        if kind == "ints":
            if text.strip().lower() in ("", "none"):
                return ()
            try:
                return tuple(int(part) for part in text.split(","))
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"{flag} expects comma-separated integers or 'none', got {text!r}") from None
        try:
            value = int(text) if kind == "int" else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind == 'int' else 'a number'}, got {text!r}") from None
        try:
            return check_value(flag, value, kind, **limits)
        except GptforgeError as err:
            raise argparse.ArgumentTypeError(str(err).replace(f"{flag} must be ", "expected ")) from None
    return parse


def add_flags(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = (),
              defaults: dict[str, Any] | None = None, int_minimum: int | None = None) -> None:
    """Add one flag per field of dataclass `cls` (`--top-k` for `top_k`) from its metadata. Flags
    default to None (the field's own default applies) unless `defaults` names a value; the help
    shows the field's default. `int_minimum` bounds integer fields whose metadata gives no range."""
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.metadata.get("cli", True) or "help" not in f.metadata:
            continue
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        kind = _kind(f.type)
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else None)
        shown = "" if default is None or default == () else f" (default: {default})"
        kw: dict = {"dest": f.name, "default": defaults.get(f.name), "help": f.metadata["help"] + shown}
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        kw.update({key: f.metadata[key] for key in ("choices", "metavar") if key in f.metadata})
        if kind == "strs":
            kw.update(action="append", metavar="TEXT")
        elif kind in ("int", "float", "ints"):
            limits = _field_range(f) or ({"minimum": int_minimum} if kind == "int" and int_minimum is not None else {})
            kw["type"] = flag_type(kind, flag, limits)
        parser.add_argument(flag, **kw)
