"""Tokenizing throughput of each `--data` source, against nanoGPT's `prepare.py` on the same data.

    python benchmarks/bench_sources.py [--mb 20]

The documents are tinyshakespeare's paragraphs (../shared/data), repeated to about --mb MB of text,
written as a parquet file, a JSONL file, a `save_to_disk` folder and one text file. Timed:
- gptforge on each dataset form (`sources.tokenize_dataset`: tiktoken's threads over batches of
  documents, llm.c shards written as it goes), and on the text file (`data.tokenize_corpus`);
- nanoGPT's data/openwebtext/prepare.py approach on the parquet file: `load_dataset`, then
  `dataset.map(encode_ordinary + eot, num_proc=N)`, then the ids written into one np.memmap;
- opening the shards written (`sources.open_shards`: headers checked, memory-mapped).
Both sides produce the same tokens (checked). Prints MB/s of text and the ratio, with the CPU.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from gptforge import sources
from gptforge.cpu import cpu_name
from gptforge.data import tokenize_corpus
from gptforge.tokenizer import get_tokenizer

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def nanogpt_prepare(parquet: Path, out: Path, num_proc: int) -> np.ndarray:
    """nanoGPT's prepare.py, on a local parquet file instead of the hub's OpenWebText."""
    import datasets

    enc = get_tokenizer().encoding
    dataset = datasets.load_dataset("parquet", data_files=str(parquet), split="train")

    def process(example):
        ids = enc.encode_ordinary(example["text"])
        ids.append(enc.eot_token)
        return {"ids": ids, "len": len(ids)}

    tokenized = dataset.map(process, remove_columns=["text"], desc="tokenizing the splits", num_proc=num_proc)
    arr_len = np.sum(tokenized["len"], dtype=np.uint64)
    arr = np.memmap(out, dtype=np.uint16, mode="w+", shape=(arr_len,))
    total_batches = min(1024, len(tokenized))
    idx = 0
    for batch_idx in range(total_batches):
        batch = tokenized.shard(num_shards=total_batches, index=batch_idx, contiguous=True).with_format("numpy")
        arr_batch = np.concatenate(batch["ids"])
        arr[idx: idx + len(arr_batch)] = arr_batch
        idx += len(arr_batch)
    arr.flush()
    return arr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=20)
    args = parser.parse_args()
    import datasets

    datasets.disable_progress_bars()
    threads = os.cpu_count() or 1
    paragraphs = [p for p in SHAKESPEARE.read_text().split("\n\n") if p.strip()]
    size = sum(len(p.encode()) for p in paragraphs)
    docs = paragraphs * max(1, round(args.mb * 1e6 / size))
    mb = sum(len(d.encode()) for d in docs) / 1e6
    print(f"CPU: {cpu_name()}, {threads} cores; {len(docs):,} documents, {mb:.1f} MB of text")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        table = datasets.Dataset.from_dict({"text": docs})
        table.to_parquet(str(tmp / "docs.parquet"))
        table.to_json(str(tmp / "docs.jsonl"))
        table.save_to_disk(str(tmp / "saved"))
        (tmp / "docs.txt").write_text("\n\n".join(docs))

        start = time.perf_counter()
        reference = nanogpt_prepare(tmp / "docs.parquet", tmp / "nanogpt.bin", threads)
        t_nano = time.perf_counter() - start
        print(f"nanoGPT prepare.py (map, num_proc={threads}):  {mb / t_nano:6.2f} MB/s  ({t_nano:.1f} s, "
              f"{len(reference):,} tokens)")
        for name, path in (("parquet", "docs.parquet"), ("JSONL", "docs.jsonl"), ("save_to_disk", "saved")):
            start = time.perf_counter()
            corpus = sources.tokenize_dataset(sources.describe_source(tmp / path), tmp / f"out-{name}",
                                              val_fraction=0, threads=threads)
            seconds = time.perf_counter() - start
            same = len(corpus.train()) == len(reference) and np.array_equal(corpus.train()[:], reference)
            print(f"gptforge {name:<13} ({threads} threads):     {mb / seconds:6.2f} MB/s  ({seconds:.1f} s, "
                  f"{t_nano / seconds:.2f}x nanoGPT; same tokens: {same})")
        start = time.perf_counter()
        text = tokenize_corpus(tmp / "docs.txt", tmp / "out-text", val_fraction=0)
        seconds = time.perf_counter() - start
        print(f"gptforge text file (one thread):       {mb / seconds:6.2f} MB/s  ({seconds:.1f} s, "
              f"{text.train_tokens:,} tokens)")
        shards = sorted((tmp / "out-parquet").glob("train_*.bin"))
        start = time.perf_counter()
        opened = sources.open_shards(shards, 0)
        print(f"opening {len(shards)} llm.c shard(s), {opened.train_tokens:,} tokens: "
              f"{(time.perf_counter() - start) * 1e3:.1f} ms (memory-mapped, no copy)")


if __name__ == "__main__":
    main()
