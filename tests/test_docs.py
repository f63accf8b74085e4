"""The README and docs/: the hub's size, the test command CI runs, runnable quick starts (their
parsing; docs/check_quickstarts.py runs them), and pages that teach rather than tell history."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _checker():
    spec = importlib.util.spec_from_file_location("check_quickstarts", ROOT / "docs" / "check_quickstarts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_is_a_hub_of_at_most_16_kb():
    assert len((ROOT / "README.md").read_bytes()) <= 16 * 1024


def test_ci_runs_the_readmes_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if "python -m pytest" in line)
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()
    assert "docs/check_quickstarts.py" in (ROOT / ".ci" / "run").read_text()


def test_every_quick_start_is_marked_and_parsed():
    checker = _checker()
    marked = checker.blocks(ROOT / "README.md")  # raises on a Quick starts block without a mark
    assert {mark for mark, _ in marked} == {"run", "network"}
    assert checker.commands("gptforge a \\\n    --b c   # note\n# a comment\n\nx &\n") == ["gptforge a --b c   # note",
                                                                                       "x &"]
    assert checker.commands("curl -d '{\"a\": 1,\n  \"b\": 2}'\nnext  # it's a comment\n") == [
        "curl -d '{\"a\": 1,\n  \"b\": 2}'", "next  # it's a comment"]  # a quoted string over two lines
    assert checker.in_background("gptforge serve --port 8000 &   # a server") == ("gptforge serve --port 8000", True)
    assert checker.in_background("a && b") == ("a && b", False)
    assert checker.in_background("gptforge generate x  # no & here") == ("gptforge generate x  # no & here", False)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_pages_speak_to_users_not_of_the_works_history(page):
    text = page.read_text()
    for pattern in (r"\bissue \d+", r"\bissues? #\d+", r"last stop", r"this session", r"superseded", r"\bPR #?\d+"):
        found = re.search(pattern, text, re.I)
        assert found is None, f"{page.name}: {text[max(0, found.start() - 80):found.end() + 80]!r}"
