"""Reading records (rows of named text fields) from CSV, TSV, JSONL or JSON files: the input of the
finetuning verbs and of evaluation. One reader, so every verb accepts the same files."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import GptforgeError

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")
JSON_SHAPES = "a JSON list of objects or one JSON object per line (JSONL)"


def read_table(path: str | Path, *, other_suffixes_as_json: bool = False) -> list[dict[str, Any]]:
    """The records of a .csv/.tsv file (header row = field names) or a .json/.jsonl file, either
    suffix holding a JSON list of objects or one object per line (JSONL; blank lines skipped): the
    content tells which. `other_suffixes_as_json` reads a file with any other suffix as .json (the
    instruct verb's records), else such a suffix is an error. A missing file is a
    FileNotFoundError; an unreadable one, or one without records, a GptforgeError."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES and not other_suffixes_as_json:
        raise GptforgeError(f"{path}: unknown table format {path.suffix!r}; use one of {', '.join(TABLE_SUFFIXES)}")
    text = _read_text(path)
    if not text.strip():
        raise GptforgeError(f"{path} is empty; it should hold records: "
                            + ("CSV/TSV with a header row" if suffix in (".csv", ".tsv") else JSON_SHAPES))
    if suffix in (".csv", ".tsv"):
        # newline="": csv keeps the line breaks inside quoted cells (splitlines would drop them)
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        rows = [dict(row) for row in reader]
        if None in {k for row in rows for k in row}:  # DictReader puts extra cells under None
            raise GptforgeError(f"{path}: a row has more cells than the header has names; quote texts with commas")
    else:
        rows = _json_records(text, path)
    if not rows:
        raise GptforgeError(f"{path} holds no records")
    return rows


def _read_text(path: Path) -> str:
    if path.is_dir():
        raise GptforgeError(f"{path} is a folder; name the data file in it")
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets write a byte-order mark
    except FileNotFoundError:
        raise FileNotFoundError(f"data file not found: {path}") from None
    except UnicodeDecodeError as err:
        raise GptforgeError(f"{path} is not UTF-8 text ({err})") from None


def _json_records(text: str, path: Path) -> list[dict[str, Any]]:
    """A JSON list when the text starts with '[' (JSONL lines are objects, so never do), else JSONL."""
    if text.lstrip().startswith("["):
        items = enumerate(_json(text, str(path)), 1)
        return [_check_object(item, f"{path} record {n}") for n, item in items]
    return [_check_object(_json(line, f"{path} line {n}"), f"{path} line {n}")
            for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise GptforgeError(f"{where} is not valid JSON ({err}); expected {JSON_SHAPES}") from None


def _check_object(item: Any, where: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise GptforgeError(f"{where} is a JSON {json_type(item)}, expected an object with named fields")
    return item


def json_type(value: Any) -> str:
    """The JSON kind of a parsed value: object, list, string, boolean, null or number."""
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def find_column(rows: Sequence[dict[str, Any]], name: str, path: str | Path, flag: str) -> str:
    """The field called `name` (exactly, or else the one field equal to it ignoring case, so the
    book's 'Text'/'Label' columns match 'text'/'label'); missing: a GptforgeError naming `flag`."""
    fields = list(rows[0])
    if name in fields:
        return name
    folded = [f for f in fields if f.lower() == name.lower()]
    if len(folded) == 1:
        return folded[0]
    raise GptforgeError(f"{path} has no column {name!r} (it has {', '.join(map(repr, fields))}); "
                        f"name the right one with {flag}")


def text_field(rows: Sequence[dict[str, Any]], column: str, path: str | Path, *,
               allow_empty: bool = False) -> list[str]:
    """Column `column` of every record as strings; an absent, null or (unless `allow_empty`) empty
    value is a GptforgeError naming the record (1-based, header excluded)."""
    values = []
    for number, row in enumerate(rows, 1):
        value = row.get(column)
        if value is None or (not allow_empty and str(value).strip() == ""):
            raise GptforgeError(f"{path}: record {number} has an empty {column!r}; fill it in or remove the record")
        values.append(value if isinstance(value, str) else json.dumps(value) if isinstance(value, (dict, list))
                      else str(value))
    return values
