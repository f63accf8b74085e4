"""llama.cpp's own converter (convert_hf_to_gguf.py, with its conversion/ and gguf-py/), the
reference for tests/checkpoint/test_gguf.py: unpacked once into .ci/llama.cpp from the
llama-cpp-python source package whose version the test extra pins, so the README's test command
and CI test the same things. `python tests/llama_converter.py` does it by hand."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / ".ci" / "llama.cpp"
PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py")


def pinned_version() -> str:
    """The llama-cpp-python version pyproject.toml's test extra pins."""
    match = re.search(r'"llama-cpp-python==([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    if match is None:
        raise RuntimeError("pyproject.toml pins no llama-cpp-python version")
    return match.group(1)


def unpack(target: Path = TARGET) -> Path:
    """The converter's path, unpacked into `target` first if it is not there (pip download of the
    source package: from pip's cache when the test extra was just installed). Raises RuntimeError
    saying why when it cannot be had."""
    converter = target / PARTS[0]
    if converter.is_file():
        return converter
    version = pinned_version()
    with tempfile.TemporaryDirectory() as tmp:
        # the source package only: its build requirements come as wheels (pip prepares its metadata)
        got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary",
                              "llama-cpp-python", f"llama-cpp-python=={version}", "-d", tmp],
                             capture_output=True, text=True)
        archives = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if got.returncode != 0 or not archives:
            raise RuntimeError(f"pip could not download llama-cpp-python=={version}'s source: "
                               f"{(got.stderr.strip().splitlines() or ['no archive'])[-1]}")
        prefix = f"{archives[0].name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        with tarfile.open(archives[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                       and m.name[len(prefix):].split("/")[0] in PARTS]
            tar.extractall(tmp, members=members, filter="data")
        staging = Path(tempfile.mkdtemp(dir=target.parent if target.parent.exists() else None))
        try:
            for part in PARTS:
                src = Path(tmp) / prefix / part
                (shutil.copytree if src.is_dir() else shutil.copy2)(src, staging / part)
            target.parent.mkdir(parents=True, exist_ok=True)
            staging.rename(target)  # whole or not at all: a second session finds it complete
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if not converter.is_file():
                raise
    return converter


if __name__ == "__main__":
    print(unpack())
