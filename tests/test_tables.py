"""The one record reader (gptforge.tables.read_table) against pandas' readers, and its errors."""

from __future__ import annotations

import json

import pytest

from gptforge.errors import GptforgeError
from gptforge.tables import read_table

pandas = pytest.importorskip("pandas")

ROWS = [{"text": "Win a prize, now!", "label": "spam"}, {"text": "Lunch at 1?\nOr 2.", "label": "ham"},
        {"text": "caf\u00e9 \u2615", "label": "ham"}]


@pytest.mark.parametrize("suffix, sep", [(".csv", ","), (".tsv", "\t")])
def test_csv_and_tsv_equal_pandas(tmp_path, suffix, sep):
    path = tmp_path / f"rows{suffix}"
    pandas.DataFrame(ROWS).to_csv(path, sep=sep, index=False, encoding="utf-8-sig")  # with a byte-order mark
    assert read_table(path) == pandas.read_csv(path, sep=sep, dtype=str, encoding="utf-8-sig").to_dict("records")
    assert read_table(path) == ROWS  # the quoted line break survives


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_json_list_or_lines_under_either_suffix_equal_pandas(tmp_path, suffix):
    lines, listed = tmp_path / f"lines{suffix}", tmp_path / f"list{suffix}"
    lines.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")  # a trailing blank line is skipped
    listed.write_text(json.dumps(ROWS, indent=1))
    assert read_table(lines) == pandas.read_json(lines, lines=True, dtype=str).to_dict("records")
    assert read_table(listed) == pandas.read_json(listed, dtype=str).to_dict("records")


def test_other_suffixes_are_json_only_when_asked(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text(json.dumps(ROWS))
    with pytest.raises(GptforgeError, match=r"unknown table format '.txt'; use one of .csv, .tsv, .jsonl, .json"):
        read_table(path)
    assert read_table(path, other_suffixes_as_json=True) == ROWS


@pytest.mark.parametrize("name, content, message", [
    ("a.csv", "text,label\n", "holds no records"),
    ("a.csv", "", "is empty; it should hold records: CSV/TSV with a header row"),
    ("a.csv", "text,label\nhello, there,x\n", "more cells than the header has names; quote texts with commas"),
    ("a.json", "[]", "holds no records"),
    ("a.json", '{"text": "a"}', None),  # one JSONL line: a record, not an error
    ("a.json", '[{"text": "a"}, "b"]', "a.json record 2 is a JSON string, expected an object with named fields"),
    ("a.jsonl", '{"text": "a"}\n{"text": \n', r"a.jsonl line 2 is not valid JSON \(.*\); expected a JSON list of "
                                              r"objects or one JSON object per line \(JSONL\)"),
    ("a.jsonl", "null\n", "line 1 is a JSON null, expected an object"),
    ("a.json", '[{"text": "a"}', r"a.json is not valid JSON \(.*\); expected a JSON list"),
])
def test_bad_tables_are_one_clear_error(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    if message is None:
        assert read_table(path) == [{"text": "a"}]
        return
    with pytest.raises(GptforgeError, match=message):
        read_table(path)


def test_not_utf8_missing_and_folder(tmp_path):
    (tmp_path / "a.csv").write_bytes(b"text,label\n\xff\xfe,x\n")
    with pytest.raises(GptforgeError, match="is not UTF-8 text"):
        read_table(tmp_path / "a.csv")
    with pytest.raises(FileNotFoundError, match="data file not found"):
        read_table(tmp_path / "missing.csv")
    (tmp_path / "d.csv").mkdir()
    with pytest.raises(GptforgeError, match="is a folder"):
        read_table(tmp_path / "d.csv")
