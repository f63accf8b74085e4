"""A run's record: JSON lines in OUT/metrics.jsonl, the loss curve OUT/loss.png, the progress bar.

Each record is appended whole or not at all; a write the system refuses (a full disk) stops the
recording and is kept in `Metrics.error` for the loop to end the run on, after saving."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from .errors import os_error_message
from .io import append_line, atomic_write, atomic_write_bytes

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class Metrics:
    """JSON lines in OUT/metrics.jsonl (one per step, one per evaluation) and OUT/loss.png."""

    def __init__(self, out: Path, keep_before_step: int | None, enabled: bool):
        self.path = out / METRICS_FILE
        self.plot_path = out / PLOT_FILE
        self.enabled = enabled
        self.records: list[dict[str, Any]] = []
        self.error: OSError | None = None  # the first write the system refused; nothing is written after it
        self._plotted = -math.inf
        if not enabled:
            return
        if keep_before_step is not None and self.path.exists():  # resuming: drop what came after the checkpoint
            self.records = [r for r in read_records(self.path) if r["step"] < keep_before_step]
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in self.records).encode())

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        if self.error is None:
            try:
                append_line(self.path, json.dumps(record) + "\n")
            except OSError as err:
                self.error = err

    def plot(self, force: bool = False) -> None:
        """Redraw the loss curve (at most once a minute unless forced: drawing takes a while)."""
        if not self.enabled or (not force and time.monotonic() - self._plotted < 60):
            return
        self._plotted = time.monotonic()
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r for r in self.records if r["kind"] == "train"]
        evals = [r for r in self.records if r["kind"] == "eval"]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        if steps:
            ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, alpha=0.4, label="train (step)")
        # Every loss an evaluation reports (train_loss, val_loss, ...), one line each.
        for key in dict.fromkeys(k for r in evals for k in r if k.endswith("loss")):
            points = [(r["step"], r[key]) for r in evals if r.get(key) is not None]
            if points:
                label = {"train_loss": "train (eval)", "val_loss": "validation"}.get(key, key.replace("_", " "))
                ax.plot(*zip(*points), marker=".", ls="-." if key == "val_loss" else "-", label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy loss (nats/token)")
        ax.legend(loc="upper right")
        fig.tight_layout()
        try:
            atomic_write(self.plot_path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
        except OSError as err:
            self.error = self.error or err
            if force:  # the run's last drawing: nothing checks the error after it
                print(f"gptforge: cannot draw the loss curve: {os_error_message(err)}", file=sys.stderr)
        finally:
            plt.close(fig)


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl. A last line cut short (the run was killed, or its disk filled,
    while it wrote) is left out, as is any other line that is not a record, with a warning."""
    records, bad = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(keepends=True), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int) and line.endswith("\n"):
            records.append(record)
        elif line.strip():
            bad.append(number)
    if bad:
        print(f"gptforge: {path}: left out line{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad[:5]))}"
              f"{' ...' if len(bad) > 5 else ''}, not a complete record (a write cut short)", file=sys.stderr)
    return records


def progress_bar(enabled: bool, total: int, initial: int, unit: str = "step") -> Any:
    """A tqdm bar of optimizer steps (or other `unit`s) on stderr (disabled: a bar that prints nothing)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit=unit, dynamic_ncols=True,
                file=sys.stderr)
