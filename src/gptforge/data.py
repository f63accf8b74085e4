"""Training data: text files -> a `uint16` token file on disk -> windows of `context_length + 1`
tokens -> batches.

Text is tokenized once, in a streaming pass that holds one chunk at a time, into `train.bin` and
`val.bin` (raw little-endian `uint16`, read back through `np.memmap`). The split is the book's: the
first `1 - val_fraction` of the characters train, the rest validate, each part tokenized on its own.
Several files are joined with `<|endoftext|>` between them, as GPT-2's training data was.

A window starting at token i is the input `tokens[i : i + T]` and the target `tokens[i + 1 : i + T + 1]`
for i = 0, stride, 2 * stride, ... while a full window fits: with stride = T this is the book's
`GPTDatasetV1` (chapter 2) exactly.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .io import atomic_write_bytes, ensure_dir, exclusive_lock, write_file
from .metrics import progress_bar
from .tokenizer import Tokenizer, as_tokenizer
from .errors import GptforgeError

TOKEN_DTYPE = np.uint16  # GPT-2's 50,257 ids fit; half the bytes of int32
CHUNK_CHARS = 1 << 20  # characters read per step of the streaming pass
_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Finding and checking the text


def find_text_files(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """The files a `--data` argument names: a file, a folder (every non-hidden file below it,
    sorted), a glob pattern (`corpus/*.txt`, `**` allowed), or a list of those.

    Raises FileNotFoundError when nothing matches."""
    if isinstance(source, (list, tuple)):
        files = [f for s in source for f in find_text_files(s)]
        return list(dict.fromkeys(files))
    text = str(source)
    path = Path(text).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise FileNotFoundError(f"data folder {path} holds no files; put .txt files in it")
        return files
    if glob.has_magic(text):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"no files match the data pattern {text!r}")
        return files
    raise FileNotFoundError(f"data not found: {text} (give a text file, a folder of them, or a glob)")


def _read_chunks(path: Path, chunk_chars: int) -> Iterator[str]:
    """The file's text in chunks of up to `chunk_chars` characters, with clear errors for files that
    are not readable UTF-8 text."""
    try:
        with open(path, encoding="utf-8") as f:  # universal newlines, as the book reads it
            while chunk := f.read(chunk_chars):
                if "\x00" in chunk:
                    raise GptforgeError(f"{path} looks like a binary file (it contains NUL bytes); "
                                     "training data must be UTF-8 text")
                yield chunk
    except UnicodeDecodeError as err:
        raise GptforgeError(f"{path} is not UTF-8 text (byte {err.start} of a chunk: {err.reason}); "
                         "convert it to UTF-8 or leave it out") from None
    except PermissionError:
        raise GptforgeError(f"{path} is not readable (permission denied)") from None
    except IsADirectoryError:
        raise GptforgeError(f"{path} is a folder, not a text file") from None


def read_text(path: str | Path) -> str:
    """A whole text file (UTF-8, universal newlines), with the reader's clear errors for files that
    are missing, binary, not UTF-8 or empty."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"text file not found: {path}")
    text = "".join(_read_chunks(path, CHUNK_CHARS))
    if not text:
        raise GptforgeError(f"{path} is empty; give a file with some text in it")
    return text


def _count_chars(files: Sequence[Path]) -> list[int]:
    """Characters per file (a streaming pass that also validates every file)."""
    counts = []
    for path in files:
        counts.append(sum(len(chunk) for chunk in _read_chunks(path, CHUNK_CHARS)))
    return counts


# ---------------------------------------------------------------------------------------------
# Streaming tokenization


def _safe_cut(text: str) -> int:
    """The largest index p with text[p - 1] not whitespace and text[p] == " ", or 0.

    GPT-2's pre-tokenizer regex never lets a piece cross such a point (a piece may only *start*
    with a space, and whitespace runs need text[p - 1] to be whitespace) and it has no look-behind,
    so tokenizing text[:p] and text[p:] separately gives exactly the tokens of the whole."""
    p = text.rfind(" ")
    while p > 0:
        if not text[p - 1].isspace():
            return p
        p = text.rfind(" ", 0, p)
    return 0


class _TokenWriter:
    """Tokenizes a stream of text pieces into a uint16 file, a safe chunk at a time."""

    def __init__(self, path: Path, tokenizer: Tokenizer, target: Path):
        self.path, self.target = path, target  # written to path, renamed to target; errors name target
        self.tokenizer = tokenizer
        self.file = open(path, "wb")
        self.pending = ""
        self.count = 0

    def write_text(self, text: str) -> None:
        self.pending += text
        if len(self.pending) < CHUNK_CHARS:
            return
        cut = _safe_cut(self.pending)
        if cut == 0 and len(self.pending) < 16 * CHUNK_CHARS:
            return  # no safe point yet (a very long word or run of spaces): read on
        cut = cut or len(self.pending)  # pathological text without spaces: cut anyway
        self._emit(self.pending[:cut])
        self.pending = self.pending[cut:]

    def write_ids(self, ids: Sequence[int]) -> None:
        """Ids that go in as they are (the `<|endoftext|>` between documents)."""
        self.flush()
        self._write(ids)

    def flush(self) -> None:
        if self.pending:
            self._emit(self.pending)
            self.pending = ""

    def _emit(self, text: str) -> None:
        self._write(self.tokenizer.encode(text))

    def _write(self, ids: Sequence[int]) -> None:
        write_file(self.target, lambda: self.file.write(np.asarray(ids, dtype=TOKEN_DTYPE).tobytes()))
        self.count += len(ids)

    def close(self) -> None:
        """Flush and fsync: the file is renamed into place next, as durable as the meta.json naming it."""
        self.flush()
        write_file(self.target, self.file.flush)
        write_file(self.target, lambda: os.fsync(self.file.fileno()))
        self.file.close()


@dataclass(frozen=True)
class TokenizedCorpus:
    """Where a corpus's token files are and how many tokens each holds."""

    folder: Path
    train_tokens: int
    val_tokens: int

    @property
    def train_path(self) -> Path:
        return self.folder / "train.bin"

    @property
    def val_path(self) -> Path:
        return self.folder / "val.bin"

    def train(self) -> np.memmap:
        """The training tokens, (train_tokens,) uint16, memory-mapped read-only."""
        return _memmap(self.train_path, self.train_tokens)

    def val(self) -> np.memmap | None:
        return _memmap(self.val_path, self.val_tokens) if self.val_tokens else None


def _memmap(path: Path, n: int) -> np.ndarray:
    if n == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", shape=(n,))


def _fingerprint(files: Sequence[Path], val_fraction: float) -> dict:
    return {
        "version": _FORMAT_VERSION,
        "tokenizer": "gpt2",
        "val_fraction": val_fraction,
        "files": [
            {"path": str(p.resolve()), "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
            for p in files
        ],
    }


def tokenize_corpus(source: str | Path | Sequence[str | Path], folder: str | Path, *,
                    val_fraction: float = 0.1, tokenizer: Tokenizer | None = None,
                    progress: bool = False) -> TokenizedCorpus:
    """Tokenize text files into `folder/train.bin` and `folder/val.bin` (uint16), once.

    A second call with the same files (same paths, sizes and modification times) and split reuses
    the token files. Nothing larger than a chunk of text is held in memory.

    val_fraction: share of the characters, taken from the end of the corpus, that validate
    (0 for none). progress: a bar over the characters on stderr (a big corpus takes minutes).
    Raises ValueError for empty, unreadable or non-text files. Stopped part way (Ctrl-C), it leaves
    no token files: the next call starts over; so does a token file found shorter than meta.json
    says. Processes tokenizing into one folder take turns (the later ones reuse the files).
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise GptforgeError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    tokenizer = as_tokenizer(tokenizer)
    if tokenizer.vocab_size > np.iinfo(TOKEN_DTYPE).max + 1:
        raise GptforgeError(f"a vocabulary of {tokenizer.vocab_size} ids does not fit uint16 token files")
    files = find_text_files(source)
    folder = Path(folder)
    fingerprint = _fingerprint(files, float(val_fraction))
    if (corpus := _tokenized(folder, fingerprint)) is not None:
        return corpus
    total = sum(_count_chars(files))
    if total == 0:
        names = ", ".join(str(p) for p in files[:3])
        raise GptforgeError(f"the training data is empty ({names}{', ...' if len(files) > 3 else ''})")
    ensure_dir(folder)
    with exclusive_lock(folder / ".tokenize.lock"):  # another process tokenizing here: wait, then reuse its files
        if (corpus := _tokenized(folder, fingerprint)) is not None:
            return corpus
        for stale in [*folder.glob(".*.bin.*.tmp"), *folder.glob("*.bin.tmp")]:  # a killed tokenizer's
            stale.unlink(missing_ok=True)
        return _tokenize(files, folder, fingerprint, total, float(val_fraction), tokenizer, progress)


def _tokenized(folder: Path, fingerprint: dict) -> TokenizedCorpus | None:
    """The token files in `folder` when meta.json says they are of these files and split and both
    hold as many tokens as it says (a file cut short is tokenized again), else None."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        corpus = TokenizedCorpus(folder, int(meta["train_tokens"]), int(meta["val_tokens"]))
        fresh = meta.get("fingerprint") == fingerprint and all(
            path.stat().st_size == n * np.dtype(TOKEN_DTYPE).itemsize
            for path, n in ((corpus.train_path, corpus.train_tokens), (corpus.val_path, corpus.val_tokens)))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return corpus if fresh else None


def _tokenize(files: Sequence[Path], folder: Path, fingerprint: dict, total: int, val_fraction: float,
              tokenizer: Tokenizer, progress: bool) -> TokenizedCorpus:
    """The streaming pass of `tokenize_corpus` over `total` characters, under its lock."""
    split_at = int((1 - val_fraction) * total)  # the book: text[:int(0.9 * len(text))] trains

    meta_path = folder / "meta.json"
    meta_path.unlink(missing_ok=True)  # the files below are stale until meta.json is rewritten

    def writer(name: str) -> _TokenWriter:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        os.close(fd)
        return _TokenWriter(Path(tmp), tokenizer, folder / name)

    train = val = None
    bar = progress_bar(progress, total, 0, unit="char")
    bar.set_description("tokenizing")
    try:
        train, val = writer("train.bin"), writer("val.bin")
        seen = 0
        for i, path in enumerate(files):
            if i > 0:
                (train if seen < split_at else val).write_ids([tokenizer.eot_id])
            for chunk in _read_chunks(path, CHUNK_CHARS):
                if seen + len(chunk) <= split_at:
                    train.write_text(chunk)
                elif seen >= split_at:
                    val.write_text(chunk)
                else:  # the split falls in this chunk: each side is tokenized on its own
                    train.write_text(chunk[:split_at - seen])
                    train.flush()
                    val.write_text(chunk[split_at - seen:])
                seen += len(chunk)
                bar.update(len(chunk))
        train.close()
        val.close()
        os.replace(train.path, folder / "train.bin")
        os.replace(val.path, folder / "val.bin")
    except BaseException:  # an error or Ctrl-C: no half-written token files left behind
        for writer_ in (train, val):
            if writer_ is not None:
                with contextlib.suppress(OSError):  # (a full disk refuses the buffered rest again)
                    writer_.file.close()
                writer_.path.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    meta = {"fingerprint": fingerprint, "train_tokens": train.count, "val_tokens": val.count,
            "characters": total}
    atomic_write_bytes(meta_path, json.dumps(meta, indent=2).encode())
    return TokenizedCorpus(folder, train.count, val.count)


# ---------------------------------------------------------------------------------------------
# Windows and batches


class TokenWindows(torch.utils.data.Dataset):
    """Windows over a 1-D token array: item i is (input, target), each (context_length,) int64,
    input = tokens[i * stride : i * stride + T] and target shifted by one.

    With stride = context_length this is the book's `GPTDatasetV1` (chapter 2)."""

    def __init__(self, tokens: np.ndarray, context_length: int, stride: int | None = None, *,
                 name: str = "data"):
        stride = context_length if stride is None else stride
        for label, value in (("context_length", context_length), ("stride", stride)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise GptforgeError(f"{label} must be a positive integer, got {value!r}")
        if len(tokens) < context_length + 1:
            raise GptforgeError(
                f"the {name} has {len(tokens):,} tokens, shorter than one window of context_length + 1 "
                f"= {context_length + 1} tokens; use more text or a smaller context_length"
            )
        self.tokens = tokens
        self.context_length = context_length
        self.stride = stride
        # The book's range(0, len(tokens) - context_length, stride)
        self.num_windows = (len(tokens) - context_length - 1) // stride + 1

    def __len__(self) -> int:
        return self.num_windows

    def window(self, i: int) -> np.ndarray:
        """Window i as (context_length + 1,) int64: the input is [:-1], the target [1:]."""
        if not 0 <= i < self.num_windows:
            raise IndexError(f"window {i} out of range [0, {self.num_windows})")
        start = i * self.stride
        return np.asarray(self.tokens[start:start + self.context_length + 1], dtype=np.int64)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.from_numpy(self.window(i))
        return w[:-1], w[1:]

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of the given windows, each (len(indices), context_length) int64."""
        w = torch.from_numpy(np.stack([self.window(i) for i in indices]))  # (B, T + 1)
        return w[:, :-1], w[:, 1:]


def batch_indices(num_windows: int, batch_size: int, *, order: Sequence[int] | None = None,
                  drop_last: bool = False) -> list[list[int]]:
    """Window indices grouped into batches of `batch_size`, in `order` (default 0, 1, 2, ...).
    The last, shorter batch is kept unless `drop_last`, as torch's DataLoader does."""
    order = list(range(num_windows)) if order is None else list(order)
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    return [order[i:i + batch_size] for i in range(0, stop, batch_size)]


def permutation(n: int, seed: int) -> list[int]:
    """A shuffled order of range(n): torch.randperm with a generator seeded by `seed`, which is
    also what torch's `RandomSampler` produces once it has drawn `seed`."""
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.randperm(n, generator=g).tolist()


def draw_loader_seed(shuffle: bool) -> int | None:
    """Consume the global torch RNG exactly as `iter(DataLoader(...))` does with num_workers=0:
    one int64 for the iterator's base seed, then (shuffling) one for the `RandomSampler`, whose
    value is returned. This is what makes the book's chapter-5 run reproducible with our loop."""
    torch.empty((), dtype=torch.int64).random_()  # _BaseDataLoaderIter._base_seed
    if not shuffle:
        return None
    return int(torch.empty((), dtype=torch.int64).random_().item())  # RandomSampler's seed


class Loader:
    """Batches of a dataset with `len()` and `batch(indices)`, drawn like torch's
    DataLoader(batch_size, shuffle, drop_last) with num_workers=0: each pass takes its seeds from the
    global torch RNG exactly as the book's loaders do, so a run seeded like the book's sees the same
    batches and dropout masks."""

    def __init__(self, data: Any, batch_size: int, shuffle: bool = False, drop_last: bool = False):
        self.data, self.batch_size, self.shuffle, self.drop_last = data, batch_size, shuffle, drop_last

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        yield from self.batches(draw_loader_seed(self.shuffle))  # drawn when the pass starts, as torch's

    def batches(self, seed: int | None, start: int = 0) -> Iterator[Any]:
        """One pass in the order `seed` gives (what `__iter__` draws; None: in order), from batch
        `start` on: a resumed run continues an epoch where it stopped without drawing again."""
        order = permutation(len(self.data), seed) if self.shuffle else None
        for indices in batch_indices(len(self.data), self.batch_size, order=order, drop_last=self.drop_last)[start:]:
            yield self.data.batch(indices)


def corpus_digest(corpus: TokenizedCorpus) -> str:
    """A short id of the token files (for checking that a resumed run reads the same data)."""
    meta = json.loads((corpus.folder / "meta.json").read_text())
    return hashlib.sha256(json.dumps(meta["fingerprint"], sort_keys=True).encode()).hexdigest()[:16]
