"""Run every command of the README's quick starts and every runnable command of docs/, as written.

A fenced block is run when its info string says so: ```bash run (each command must exit 0) or
```bash network (each command needs the Hugging Face hub: it is run offline, with an empty hub
cache, and must fail in one line with gptforge's no-network message). Every ```bash block of the
README's "Quick starts" is one of the two. The commands of a page run in order, in one fresh
folder per page laid out like the repository (examples/ and ../shared/data beside them), so a
page's later commands use the files its earlier ones made; `.venv` there is the environment given
(`source .venv/bin/activate` works as written). A command ending in `&` (a server) runs in the
background until the page ends, and the next command waits until it answers; port 8000 is mapped
to a free port, so a server already on 8000 does not interfere.

    python docs/check_quickstarts.py [--venv .venv-runtime] [PAGE ...]

Exits 1 at the first command that fails, printing its output.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.M | re.S)
NO_NETWORK = ("no cached copy of it", "cannot be reached (no network)")
COMMAND_TIMEOUT_S = 900
SERVER_START_S = 180


def blocks(page: Path) -> list[tuple[str, str]]:
    """The (mark, text) of each ```bash run / ```bash network block of `page`; in the README, every
    bash block of its Quick starts must carry one."""
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        language, info, body = match.group(1), match.group(2).split(), match.group(3)
        if language != "bash":
            continue
        mark = next((word for word in info if word in ("run", "network")), None)
        if mark is None and page.name == "README.md" and _in_quick_starts(text, match.start()):
            raise SystemExit(f"{page}: a Quick starts block is not marked `bash run` or `bash network`:\n{body}")
        if mark is not None:
            found.append((mark, body))
    return found


def _in_quick_starts(text: str, offset: int) -> bool:
    headings = [(m.start(), m.group(1)) for m in re.finditer(r"^## (.*)$", text, re.M)]
    current = [title for start, title in headings if start < offset]
    return bool(current) and current[-1].strip() == "Quick starts"


def commands(body: str) -> list[str]:
    """A block's commands: continuation lines joined, a quoted string spanning lines kept whole,
    blank lines and whole-line comments dropped."""
    joined = re.sub(r"\\\n\s*", "", body)
    found, pending = [], ""
    for line in joined.splitlines():
        if not pending and (not line.strip() or line.strip().startswith("#")):
            continue
        pending = f"{pending}\n{line}" if pending else line.strip()
        try:
            shlex.split(pending, comments=True)  # raises while a quote is still open
        except ValueError:
            continue
        found.append(pending)
        pending = ""
    if pending:
        raise SystemExit(f"a command's quote is never closed:\n{pending}")
    return found


def in_background(command: str) -> tuple[str, bool]:
    """`command` without a final `&` (and the comment after it), and whether it had one."""
    match = re.fullmatch(r"(.*?)\s*&\s*(#.*)?", command)
    if match is None or match.group(1).endswith("&"):  # no `&`, or `a && b`
        return command, False
    return match.group(1), True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workdir(venv: Path) -> Path:
    """A fresh folder laid out like the repository: examples/, .venv (the environment given) and
    ../shared/data (the corpora) where the checkout has them."""
    top = Path(tempfile.mkdtemp(prefix="gptforge-quickstarts-"))
    repo = top / "repo"
    repo.mkdir()
    (repo / "examples").symlink_to(ROOT / "examples")
    (repo / ".venv").symlink_to(venv.resolve())
    shared = ROOT.parent / "shared"
    if os.environ.get("GPTFORGE_DATA_DIR"):
        (top / "shared").mkdir()
        (top / "shared" / "data").symlink_to(Path(os.environ["GPTFORGE_DATA_DIR"]).resolve())
    elif shared.is_dir():
        (top / "shared").symlink_to(shared)
    return repo


def wait_for_server(port: int, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited ({server.returncode}) before answering")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the server did not answer on port {port} within {SERVER_START_S} s")


def stop(server: subprocess.Popen | None) -> None:
    if server is not None and server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def run_page(page: Path, venv: Path) -> int:
    """Run the page's marked commands; returns how many ran. SystemExit(1) at the first failure."""
    todo = [(mark, command) for mark, body in blocks(page) for command in commands(body)]
    if not todo:
        return 0
    repo, port = workdir(venv), free_port()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)  # the environment's own gptforge, as a user has it
    env.pop("VIRTUAL_ENV", None)
    server, server_port = None, None
    try:
        for mark, command in todo:
            written = command
            command = re.sub(r"(?<=[:\s])8000\b", str(port), command)
            command, background = in_background(command)
            if background:
                stop(server)  # one server per port: a later one replaces it
            if server is not None and server_port is not None and not background:
                try:
                    wait_for_server(server_port, server)
                except RuntimeError as err:
                    print(f"FAILED: {page.relative_to(ROOT)}: the server started before `{written}`: {err}",
                          file=sys.stderr)
                    raise SystemExit(1) from None
                server_port = None
            run_env = dict(env)
            if mark == "network":
                run_env.update(HF_HUB_OFFLINE="1", HF_HOME=str(repo.parent / "hf-empty"))
            script = f"source .venv/bin/activate && {command}"
            print(f"{page.relative_to(ROOT)}: $ {written}", flush=True)
            started = time.monotonic()
            if background:
                server = subprocess.Popen(["bash", "-c", f"exec bash -c {_quote(script)}"], cwd=repo, env=run_env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True)
                server_port = port
                continue
            done = subprocess.run(["bash", "-c", script], cwd=repo, env=run_env, capture_output=True, text=True,
                                  timeout=COMMAND_TIMEOUT_S)
            seconds = time.monotonic() - started
            if mark == "run" and done.returncode != 0:
                _fail(page, written, done, f"exit {done.returncode}")
            if mark == "network":
                lines = done.stderr.strip().splitlines()
                if done.returncode != 2 or len(lines) != 1 or not any(m in lines[0] for m in NO_NETWORK):
                    _fail(page, written, done, "a network command must fail offline with exit 2 and one line "
                                               "saying the hub cannot be reached")
            print(f"  ok ({seconds:.1f} s{', offline as expected' if mark == 'network' else ''})", flush=True)
    finally:
        stop(server)
        shutil.rmtree(repo.parent, ignore_errors=True)
    return len(todo)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def _fail(page: Path, command: str, done: subprocess.CompletedProcess, why: str) -> None:
    print(f"FAILED ({why}): {page.relative_to(ROOT)}: {command}\n--- stdout\n{done.stdout[-4000:]}\n"
          f"--- stderr\n{done.stderr[-4000:]}", file=sys.stderr)
    raise SystemExit(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--venv", default=".venv-runtime", help="the environment to run in (default: .venv-runtime)")
    parser.add_argument("pages", nargs="*", help="pages to check (default: README.md and docs/*.md)")
    args = parser.parse_args()
    venv = Path(args.venv)
    if not (venv / "bin" / "gptforge").exists():
        raise SystemExit(f"{venv}/bin/gptforge not found: make the environment first "
                         "(python3 -m venv .venv-runtime && .venv-runtime/bin/pip install torch==2.13.0 -e .)")
    pages = [ROOT / p for p in args.pages] or [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    started, total = time.monotonic(), 0
    for page in pages:
        total += run_page(page, venv)
    print(f"quick starts: {total} commands ran as written on {len(pages)} pages in "
          f"{time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
