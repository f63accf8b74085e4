"""Small labelled data sets for the classification tests, written here (no corpora, no downloads):
short spam-like (label 1) and ham-like (label 0) messages from templates, in the book's CSV layout
(columns Text, Label) so that llms_from_scratch.ch06.SpamDataset reads the same files."""

from __future__ import annotations

import csv
import random
from pathlib import Path

SPAM = ["WIN a free {thing} now! Call {num} today", "Congratulations, you won {num} pounds, claim your {thing}",
        "URGENT: your {thing} voucher expires, text {num}", "Free {thing} for you, reply YES to {num} to claim"]
HAM = ["See you at the {place} around {time}?", "Can you bring the {thing} to the {place} later",
       "I will be late, stuck at the {place} until {time}", "Thanks for dinner, the {thing} was lovely"]
FILL = {"thing": ["phone", "holiday", "prize", "ringtone", "cake", "book", "ticket"],
        "num": ["87121", "09061", "80082", "1000", "2000"],
        "place": ["station", "office", "park", "cinema", "gym"], "time": ["six", "noon", "8pm", "ten"]}


def messages(count: int, seed: int = 0) -> list[tuple[str, int]]:
    """`count` (text, label) pairs, labels alternating 1, 0, 1, ..."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        template = rng.choice(SPAM if i % 2 == 0 else HAM)
        out.append((template.format(**{k: rng.choice(v) for k, v in FILL.items()}), 1 - i % 2))
    return out


def write_splits(out: Path, sizes: tuple[int, int, int] = (40, 16, 8), seed: int = 0) -> dict[str, Path]:
    """train/val/test CSVs with `sizes` records each (the book's Text/Label columns)."""
    records = messages(sum(sizes), seed)
    paths, start = {}, 0
    for name, size in zip(("train", "val", "test"), sizes):
        path = out / f"{name}.csv"
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["Text", "Label"])
            writer.writerows(records[start:start + size])
        paths[name], start = path, start + size
    return paths
