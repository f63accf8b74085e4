"""Reading records (rows of named text fields) from CSV, TSV, JSONL or JSON files: the input of the
finetuning verbs and of evaluation. One reader, so every verb accepts the same files."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import GptforgeError

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")


def read_table(path: str | Path) -> list[dict[str, Any]]:
    """The records of a .csv/.tsv file (header row = field names), a .jsonl file (one JSON object
    per line; blank lines skipped) or a .json file (a list of objects). A missing file is a
    FileNotFoundError; an unreadable one, or one without records, a GptforgeError."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise GptforgeError(f"{path}: unknown table format {path.suffix!r}; use one of {', '.join(TABLE_SUFFIXES)}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets write a byte-order mark
    except FileNotFoundError:
        raise FileNotFoundError(f"data file not found: {path}") from None
    except UnicodeDecodeError as err:
        raise GptforgeError(f"{path} is not UTF-8 text ({err})") from None
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        rows = [dict(row) for row in reader]
        if None in {k for row in rows for k in row}:  # DictReader puts extra cells under None
            raise GptforgeError(f"{path}: a row has more cells than the header has names; quote texts with commas")
    elif suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                rows.append(_json_object(line, f"{path}:{number}"))
    else:
        data = _json(text, str(path))
        if not isinstance(data, list):
            raise GptforgeError(f"{path} must hold a JSON list of objects")
        rows = [_check_object(item, f"{path}[{i}]") for i, item in enumerate(data)]
    if not rows:
        raise GptforgeError(f"{path} holds no records")
    return rows


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise GptforgeError(f"{where} is not valid JSON: {err}") from None


def _json_object(text: str, where: str) -> dict[str, Any]:
    return _check_object(_json(text, where), where)


def _check_object(item: Any, where: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise GptforgeError(f"{where} is a JSON {type(item).__name__}, expected an object with named fields")
    return item


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
