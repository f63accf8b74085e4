"""Pretraining data beyond text files: llm.c token shards, and datasets (a `save_to_disk` folder,
parquet / JSONL / arrow files, a hub dataset id) read through the `datasets` library.

What `--data` names decides the source (`describe_source`):
- `.bin` files (one, a folder of them or a glob): llm.c's token shards, read as they are. A shard is a
  header of 256 int32 (magic 20240520, version 1, token count) then that many uint16 tokens; it is
  memory-mapped, never copied. Shards with `val` as a word of their name (llm.c's
  `fineweb_val_000000.bin`) validate, the others train.
- a folder written by `Dataset.save_to_disk`, or `.parquet` / `.jsonl` / `.arrow` files, or a hub id
  (`HuggingFaceFW/fineweb-edu` with `data_config`, streamed): documents in `data_column`, each
  tokenized as nanoGPT's `prepare.py` does (`encode_ordinary` then `<|endoftext|>`), with tiktoken's
  threads, into llm.c shards under OUT/data, which are then read as above. A split named
  validation/val/test validates; `data_max_tokens` stops early. Finished shards are kept: a stopped
  run tokenizes only what is left when started again.
- anything else: text files, as `gptforge.data.tokenize_corpus` always did.
Without a validation part, the last `val_fraction` of the training tokens validates.
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .data import TOKEN_DTYPE, find_text_files, tokenize_corpus
from .errors import GptforgeError
from .io import atomic_write, atomic_write_bytes, ensure_dir
from .metrics import progress_bar
from .tokenizer import Tokenizer, as_tokenizer

SHARD_MAGIC = 20240520  # llm.c's data file header: magic, version, token count, then zeros
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
SHARD_TOKENS = 1 << 26  # tokens per shard we write (llm.c's fineweb.py writes 10**8)
DATASET_SUFFIXES = {".parquet": "parquet", ".jsonl": "json", ".arrow": "arrow"}
VAL_SPLITS = ("validation", "val", "test")
DATASETS_EXTRA = "the `datasets` library is needed for this --data: pip install 'gptforge[datasets]'"
_VAL_SHARD = re.compile(r"(^|[_.-])val([_.-]|$)")  # fineweb_val_000000.bin, tiny_shakespeare_val.bin
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_BATCH_DOCS = 1024  # documents encoded per call (tiktoken spreads a batch over its threads)


# ---------------------------------------------------------------------------------------------
# llm.c shards


def write_shard(path: str | Path, tokens: np.ndarray | Sequence[int]) -> None:
    """Write `tokens` (ids < 65,536) as an llm.c shard: the 1,024-byte header, then uint16 ids."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(TOKEN_DTYPE).max):
        raise GptforgeError("llm.c shards hold uint16 token ids (0 ... 65535)")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype("<u2").tobytes())

    atomic_write(Path(path), write)


def read_shard(path: str | Path) -> np.memmap:
    """An llm.c shard's tokens, (n,) uint16, memory-mapped read-only (no copy). The header is
    checked: its magic, its version, and that the file holds the tokens it announces."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise GptforgeError(f"{path} is not an llm.c token shard: {size} bytes, shorter than its 1,024-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise GptforgeError(f"{path} is not an llm.c token shard: its header starts with {int(header[0])}, "
                            f"not the magic {SHARD_MAGIC}")
    if header[1] != SHARD_VERSION:
        raise GptforgeError(f"{path} is an llm.c shard of version {int(header[1])}; only version "
                            f"{SHARD_VERSION} (uint16 tokens) is read")
    count = int(header[2])
    if count < 0 or size != HEADER_BYTES + 2 * count:
        raise GptforgeError(f"{path} is a damaged llm.c shard: its header announces {count:,} tokens, "
                            f"the file holds {(size - HEADER_BYTES) / 2:,.1f}")
    if count == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))


class ShardTokens:
    """Several token arrays read as one (n,) uint16 sequence without joining them: `len()` and
    slices `[a:b]` (a copy of just that range), which is all `TokenWindows` asks of its tokens.
    `part(a, b)` is a view of the tokens a ... b - 1."""

    def __init__(self, arrays: Sequence[np.ndarray], start: int = 0, stop: int | None = None):
        self.arrays = [a for a in arrays if len(a)]
        self.starts = [0]
        for a in self.arrays:
            self.starts.append(self.starts[-1] + len(a))
        self.start = start
        self.stop = self.starts[-1] if stop is None else stop
        self.dtype = np.dtype(TOKEN_DTYPE)

    def __len__(self) -> int:
        return self.stop - self.start

    def part(self, start: int, stop: int) -> ShardTokens:
        return ShardTokens(self.arrays, self.start + start, self.start + stop) if stop > start else \
            ShardTokens([])

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("ShardTokens takes slices [a:b]")
        a, b, _ = key.indices(len(self))
        a, b = a + self.start, max(a, b) + self.start
        pieces = []
        i = bisect.bisect_right(self.starts, a) - 1
        while a < b and i < len(self.arrays):
            lo = a - self.starts[i]
            hi = min(b, self.starts[i + 1]) - self.starts[i]
            pieces.append(self.arrays[i][lo:hi])
            a = self.starts[i] + hi
            i += 1
        if len(pieces) == 1:
            return np.asarray(pieces[0])
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=TOKEN_DTYPE)

    def tolist(self) -> list[int]:
        return self[:].tolist()


@dataclass
class ShardCorpus:
    """Token shards as a corpus: what `TokenizedCorpus` offers the training loop (`train()`,
    `val()`, `train_tokens`, `val_tokens`) plus `digest()` (the data's identity, for resume) and
    `check_vocab(vocab_size)`."""

    train_shards: list[Path]
    val_shards: list[Path]
    val_fraction: float
    identity: Any  # what the digest is made of

    def __post_init__(self) -> None:
        train = ShardTokens([read_shard(p) for p in self.train_shards])
        self._train, self._val = train, None
        if self.val_shards:
            self._val = ShardTokens([read_shard(p) for p in self.val_shards])
        elif self.val_fraction:
            split = int((1 - self.val_fraction) * len(train))
            self._train, self._val = train.part(0, split), train.part(split, len(train))
        self.train_tokens = len(self._train)
        self.val_tokens = len(self._val) if self._val is not None else 0

    def train(self) -> ShardTokens:
        return self._train

    def val(self) -> ShardTokens | None:
        return self._val if self.val_tokens else None

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:16]

    def check_vocab(self, vocab_size: int) -> None:
        """Refuse shards holding a token id the model has no embedding for."""
        for path in self.train_shards + self.val_shards:
            tokens = read_shard(path)
            if len(tokens) and int(tokens.max()) >= vocab_size:
                raise GptforgeError(f"{path} holds token id {int(tokens.max())}, beyond the model's vocab_size "
                                    f"{vocab_size}; train a model with a larger vocabulary on it")


def _file_identity(paths: Iterable[Path]) -> list[dict]:
    return [{"path": str(p.resolve()), "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in paths]


def open_shards(files: Sequence[Path], val_fraction: float) -> ShardCorpus:
    """llm.c shards as a corpus: those with `val` in their file name validate (llm.c's
    `fineweb_val_*`), the rest train in name order; without val shards the last `val_fraction`
    of the tokens validates."""
    val = [p for p in files if _VAL_SHARD.search(p.name)]
    train = [p for p in files if p not in val]
    if not train:
        raise GptforgeError(f"only validation shards given ({', '.join(p.name for p in val[:3])}); add training shards")
    corpus = ShardCorpus(train, val, val_fraction, {"shards": _file_identity(files), "val_fraction": val_fraction})
    if corpus.train_tokens == 0:
        raise GptforgeError(f"the token shards {', '.join(p.name for p in train[:3])} hold no tokens")
    return corpus


# ---------------------------------------------------------------------------------------------
# What --data names


@dataclass(frozen=True)
class Source:
    """kind: 'text', 'shards', 'saved' (a save_to_disk folder), 'files' (parquet/JSONL/arrow) or
    'hub'; `files` for the file kinds, `name` as given."""

    kind: str
    name: str
    files: tuple[Path, ...] = ()


def describe_source(data: Any, data_config: str | None = None) -> Source:
    """What `--data` names (see the module's docstring). A list is text files or shards."""
    if isinstance(data, (list, tuple)):
        files = find_text_files(data)
        kind = "shards" if all(p.suffix == ".bin" for p in files) else "text"
        return Source(kind, ", ".join(map(str, data)), tuple(files))
    text = str(data)
    path = Path(text).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").exists()  # what save_to_disk writes
                          or ((path / "state.json").exists() and (path / "dataset_info.json").exists())):
        return Source("saved", text, (path,))
    if path.exists() or glob.has_magic(text):
        files = find_text_files(text)
        if all(p.suffix == ".bin" for p in files):
            return Source("shards", text, tuple(files))
        suffixes = {p.suffix for p in files}
        if suffixes <= set(DATASET_SUFFIXES):
            if len(suffixes) > 1:
                raise GptforgeError(f"--data {text} mixes {', '.join(sorted(suffixes))} files; give one format")
            return Source("files", text, tuple(files))
        return Source("text", text, tuple(files))
    if data_config is not None or (_HUB_ID.match(text) and Path(text).suffix == "" and "/" in text):
        return Source("hub", text)
    find_text_files(text)  # raises its 'data not found' message
    raise AssertionError("unreachable")


def _import_datasets(source: Source) -> Any:
    try:
        import datasets
    except ImportError:
        where = f" ({source.name} is no local file or folder: a hub dataset id?)" if source.kind == "hub" else ""
        raise GptforgeError(DATASETS_EXTRA + where) from None
    return datasets


def _load(source: Source, data_config: str | None) -> tuple[dict[str, Any], bool]:
    """The source's splits as {name: Dataset or IterableDataset}, and whether they are streamed."""
    datasets = _import_datasets(source)
    quiet = not datasets.utils.are_progress_bars_disabled()
    if quiet:  # its bars would stand above our one-line errors; ours shows the tokenizing
        datasets.disable_progress_bars()
    try:
        if source.kind == "saved":
            loaded = _load_saved(datasets, source)
        elif source.kind == "files":
            builder = DATASET_SUFFIXES[source.files[0].suffix]
            loaded = datasets.load_dataset(builder, data_files=[str(p) for p in source.files], split="train")
        else:
            loaded = datasets.load_dataset(source.name, data_config, streaming=True)
    except GptforgeError:
        raise
    except (FileNotFoundError, ConnectionError) as err:
        hint = " (offline: is it in the hub cache?)" if os.environ.get("HF_DATASETS_OFFLINE") == "1" \
            or os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        if source.kind == "hub":  # perhaps a mistyped local path
            hint = f" (it is no local file or folder either){hint}"
        raise GptforgeError(f"the dataset {source.name!r} could not be loaded{hint}: "
                            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    except ValueError as err:  # an unknown config name, a bad file
        raise GptforgeError(f"the dataset {source.name!r} could not be loaded: {str(err).splitlines()[0]}") from None
    except Exception as err:  # pyarrow and the hub raise their own types for unreadable files
        if type(err).__module__.split(".")[0] not in ("pyarrow", "datasets", "huggingface_hub", "json"):
            raise
        raise GptforgeError(f"the dataset {source.name!r} could not be read: {str(err).splitlines()[0]}") from None
    finally:
        if quiet:
            datasets.enable_progress_bars()
    splits = dict(loaded) if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)) \
        else {"train": loaded}
    return splits, source.kind == "hub"


def _load_saved(datasets: Any, source: Source) -> Any:
    """`load_from_disk`, with a saved dataset of no rows (which it cannot load: it has no arrow
    files) named as empty."""
    folder = source.files[0]
    states = [folder / "state.json"] if (folder / "state.json").exists() else sorted(folder.glob("*/state.json"))
    try:
        if states and all(not json.loads(p.read_text()).get("_data_files") for p in states):
            raise GptforgeError(f"the dataset {source.name!r} is empty (it holds no data files)")
    except (OSError, json.JSONDecodeError):
        pass  # not our business: load_from_disk says what is wrong
    return datasets.load_from_disk(str(folder))


def _pick_splits(splits: dict[str, Any], name: str) -> tuple[str, str | None]:
    val = next((s for s in VAL_SPLITS if s in splits), None)
    train = "train" if "train" in splits else next((s for s in splits if s != val), None)
    if train is None:
        raise GptforgeError(f"the dataset {name!r} has only a {val!r} split; it needs one to train on")
    return train, val


# ---------------------------------------------------------------------------------------------
# Tokenizing documents into shards, resumably


def _encode_batch(tokenizer: Tokenizer, texts: list[str], threads: int) -> list[list[int]]:
    """Each text's ids (no special tokens), the batch split into one part per thread: tiktoken
    encodes outside the GIL. (Its own encode_ordinary_batch hands each text to the pool on its own,
    which costs more than it gains for documents of a few KB: 3x slower here.)"""
    encoding = getattr(tokenizer, "encoding", None)
    encode = encoding.encode_ordinary if encoding is not None else tokenizer.encode
    if threads <= 1 or len(texts) < 2 * threads:
        return [encode(t) for t in texts]
    size = -(-len(texts) // threads)
    parts = [texts[i:i + size] for i in range(0, len(texts), size)]
    with ThreadPoolExecutor(len(parts)) as pool:
        return [ids for part in pool.map(lambda part: [encode(t) for t in part], parts) for ids in part]


def _document_batches(dataset: Any, column: str, name: str, skip: int) -> Iterator[list[str]]:
    """The texts of `column` in batches of up to _BATCH_DOCS (read a batch at a time: datasets
    formats single rows slowly), after the first `skip` documents; a missing column or a value that
    is not text is one clear error."""
    columns = getattr(dataset, "column_names", None)
    if columns is not None and column not in columns:
        raise GptforgeError(f"the dataset {name!r} has no column {column!r} (its columns: "
                            f"{', '.join(columns)}); choose one with --data-column")
    if skip:
        dataset = dataset.skip(skip) if hasattr(dataset, "skip") else dataset.select(range(skip, len(dataset)))
    for batch in dataset.iter(batch_size=_BATCH_DOCS):
        if column not in batch:
            raise GptforgeError(f"the dataset {name!r} has no column {column!r} (its columns: "
                                f"{', '.join(batch)}); choose one with --data-column")
        texts = batch[column]
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise GptforgeError(f"the dataset {name!r}'s column {column!r} holds {type(texts[bad]).__name__}, not text; "
                                "choose a text column with --data-column")
        yield texts


def _tokenize_split(dataset: Any, *, column: str, name: str, folder: Path, prefix: str, tokenizer: Tokenizer,
                    max_tokens: int | None, threads: int, progress: bool, shard_tokens: int,
                    stop: Any = None) -> list[Path]:
    """Tokenize one split into `folder/{prefix}_NNNNNN.bin` shards, resumably: `folder/{prefix}.json`
    records the finished shards and how many documents they hold, and a new call goes on from there."""
    state_path = folder / f"{prefix}.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"shards": [], "docs": 0, "tokens": 0}
    if state.get("done"):
        return [folder / s for s in state["shards"]]
    total = len(dataset) if hasattr(dataset, "__len__") else None
    bar = progress_bar(progress, max_tokens, state["tokens"], unit="tok")
    bar.set_description(f"tokenizing {prefix}" + ("" if total is None else f" ({total:,} documents)"))
    pending: list[np.ndarray] = []
    pending_tokens = pending_docs = 0

    def flush() -> None:
        nonlocal pending, pending_tokens, pending_docs
        if not pending_tokens:
            return
        shard = f"{prefix}_{len(state['shards']):06d}.bin"
        write_shard(folder / shard, np.concatenate(pending))
        state["shards"].append(shard)
        state["docs"] += pending_docs
        state["tokens"] += pending_tokens
        atomic_write_bytes(state_path, json.dumps(state).encode())  # a finished shard is never redone
        pending, pending_tokens, pending_docs = [], 0, 0

    eot = tokenizer.eot_id
    done = False
    try:
        for texts in _document_batches(dataset, column, name, state["docs"]):
            if done:
                break
            for ids in _encode_batch(tokenizer, texts, threads):
                ids.append(eot)
                tokens = np.asarray(ids, dtype=TOKEN_DTYPE)
                if max_tokens and state["tokens"] + pending_tokens + len(tokens) >= max_tokens:
                    tokens = tokens[:max_tokens - state["tokens"] - pending_tokens]
                    done = True
                pending.append(tokens)
                pending_tokens += len(tokens)
                pending_docs += 1
                bar.update(len(tokens))
                if done:
                    break
                if pending_tokens >= shard_tokens:
                    flush()
                    if stop is not None and stop.requested:  # Ctrl-C: keep what is finished, and go
                        raise KeyboardInterrupt(
                            f"{len(state['shards'])} finished {prefix} shards kept in {folder}; the same command "
                            "goes on from there")
        flush()
    finally:
        bar.close()
    state["done"] = True
    atomic_write_bytes(state_path, json.dumps(state).encode())
    return [folder / s for s in state["shards"]]


def tokenize_dataset(source: Source, folder: str | Path, *, data_config: str | None = None, column: str = "text",
                     max_tokens: int | None = None, val_fraction: float = 0.1, tokenizer: Tokenizer | None = None,
                     threads: int | None = None, progress: bool = False,
                     shard_tokens: int = SHARD_TOKENS, stop: Any = None) -> ShardCorpus:
    """Tokenize a dataset source (kind 'saved', 'files' or 'hub') into llm.c shards in `folder`
    and return them as a corpus. A call with the same source and options reuses finished shards
    (and goes on after the last one when a previous call was stopped); other options start over.

    column: the text column. max_tokens: stop the training split after this many tokens (and the
    validation split, when the dataset has one, at the same bound). threads: tiktoken's encoding
    threads (default: the CPUs). Raises GptforgeError for a missing column, non-text values, an
    empty dataset, or when `datasets` is not installed."""
    tokenizer = as_tokenizer(tokenizer)
    if tokenizer.vocab_size > np.iinfo(TOKEN_DTYPE).max + 1:
        raise GptforgeError(f"a vocabulary of {tokenizer.vocab_size} ids does not fit uint16 token shards")
    folder = Path(folder)
    identity = {"kind": source.kind, "name": source.name, "config": data_config, "column": column,
                "max_tokens": max_tokens, "tokenizer": "gpt2", "format": SHARD_VERSION,
                "files": _file_identity(source.files) if source.kind == "files" else None,
                "saved": _file_identity(sorted(p for p in source.files[0].rglob("*") if p.is_file()))
                if source.kind == "saved" else None}
    meta_path, done_path = folder / "source.json", folder / "done.json"
    same = meta_path.exists() and json.loads(meta_path.read_text()) == identity
    if same and done_path.exists():  # all tokenized: no need to open the dataset (or reach the hub)
        done = json.loads(done_path.read_text())
        return _shard_corpus([folder / s for s in done["train"]], [folder / s for s in done["val"]],
                             val_fraction, identity)
    if not same:
        for old in list(folder.glob("*.bin")) + list(folder.glob("*.json")):
            old.unlink()  # another source or other options: its shards do not apply
    ensure_dir(folder)
    atomic_write_bytes(meta_path, json.dumps(identity).encode())
    splits, _ = _load(source, data_config)
    train_name, val_name = _pick_splits(splits, source.name)
    kw = dict(column=column, name=source.name, folder=folder, tokenizer=tokenizer, max_tokens=max_tokens,
              threads=threads or os.cpu_count() or 1, progress=progress, shard_tokens=shard_tokens,
              stop=stop)
    train = _tokenize_split(splits[train_name], prefix="train", **kw)
    val = _tokenize_split(splits[val_name], prefix="val", **kw) if val_name is not None else []
    if not train:
        raise GptforgeError(f"the dataset {source.name!r} is empty (no documents in its {train_name!r} split)")
    atomic_write_bytes(done_path, json.dumps({"train": [p.name for p in train], "val": [p.name for p in val]}).encode())
    return _shard_corpus(train, val, val_fraction, identity)


def _shard_corpus(train: list[Path], val: list[Path], val_fraction: float, identity: dict) -> ShardCorpus:
    return ShardCorpus(train, val, val_fraction, {**identity, "val_fraction": val_fraction,
                                                  "shards": _file_identity(train + val)})


# ---------------------------------------------------------------------------------------------
# The training loop's entry


def prepare_data(cfg: Any, folder: str | Path, progress: bool = False, stop: Any = None) -> Any:
    """The corpus of a TrainConfig's `data` (any source above), tokenized into `folder` where it
    needs tokenizing: a `TokenizedCorpus` for text files, a `ShardCorpus` otherwise."""
    data_config, column = getattr(cfg, "data_config", None), getattr(cfg, "data_column", "text")
    max_tokens = getattr(cfg, "data_max_tokens", None)
    source = describe_source(cfg.data, data_config)
    if source.kind == "text":
        if data_config is not None or column != "text" or max_tokens is not None:
            raise GptforgeError("--data-config, --data-column and --data-max-tokens apply to datasets (a hub id, "
                                f"a save_to_disk folder, parquet/JSONL/arrow files), not to the text files {source.name}")
        return tokenize_corpus(cfg.data, folder, val_fraction=cfg.val_fraction, progress=progress)
    if source.kind == "shards":
        if max_tokens is not None or data_config is not None:
            raise GptforgeError("--data-config and --data-max-tokens apply to datasets, not to token shards")
        return open_shards(list(source.files), cfg.val_fraction)
    return tokenize_dataset(source, Path(folder) / "shards", data_config=data_config, column=column,
                            max_tokens=max_tokens, val_fraction=cfg.val_fraction, progress=progress, stop=stop)


def check_vocab(corpus: Any, vocab_size: int, tokenizer_vocab: int) -> None:
    """The model must embed every id of the data: for shards, their largest id; for text tokenized
    here, every GPT-2 id."""
    if isinstance(corpus, ShardCorpus) and corpus.identity.get("kind") is None:
        corpus.check_vocab(vocab_size)  # shards made elsewhere: their own ids decide
    elif corpus.train_tokens and vocab_size < tokenizer_vocab:
        raise GptforgeError(f"the model's vocab_size {vocab_size} is smaller than GPT-2's {tokenizer_vocab} "
                            "token ids; use vocab_size >= 50257")
