"""Pretraining sources: llm.c token shards (read as llm.c writes them, memory-mapped, their header
checked), datasets (save_to_disk folders, parquet/JSONL files, a hub id from an offline hub cache)
tokenized as nanoGPT's prepare.py does, resumably, and their bad inputs as one line and exit 2."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gptforge import sources
from gptforge.cli import main
from gptforge.errors import GptforgeError
from gptforge.tokenizer import get_tokenizer
from gptforge.train import train

SRC = Path(__file__).resolve().parents[1] / "src"
WORDS = ("the king said that a man would go to the sea and find gold in a ship of old wood "
         "while the queen sang softly of rain and stone").split()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) + "." for _ in range(n)]


def llmc_write_datafile(path: Path, toks) -> None:
    """llm.c's dev/data/data_common.py write_datafile (GPT-2 version), as it is written there."""
    header = np.zeros(256, dtype=np.int32)
    header[0] = 20240520
    header[1] = 1
    header[2] = len(toks)
    toks_np = np.array(toks, dtype=np.uint16)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(toks_np.tobytes())


def prepare_py(texts: list[str]) -> list[int]:
    """nanoGPT's data/openwebtext/prepare.py: encode_ordinary, then <|endoftext|>, per document."""
    enc = get_tokenizer().encoding
    ids: list[int] = []
    for text in texts:
        ids += enc.encode_ordinary(text) + [enc.eot_token]
    return ids


def tiny_model(tmp_path: Path, **changes) -> Path:
    cfg = {"vocab_size": 50257, "context_length": 16, "emb_dim": 32, "n_heads": 2, "n_layers": 2,
           "drop_rate": 0.0, "qkv_bias": True, **changes}
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(cfg))
    return path


def run_options(data, model: Path, out: Path, **changes) -> dict:
    return {"data": str(data), "model": str(model), "out": str(out), "batch_size": 2, "max_steps": 3,
            "eval_every": 2, "eval_batches": 2, "sample_tokens": 0, "precision": "fp32", "progress": False,
            "seed": 1, **changes}


def losses(out: Path, kind: str, key: str) -> list[float]:
    return [r[key] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


# --------------------------------------------------------------------------- llm.c shards


def test_llmc_shards_train_exactly_as_the_text_they_hold(tmp_path):
    text = "\n".join(documents(120))
    corpus = tmp_path / "story.txt"
    corpus.write_text(text)
    split = int(0.9 * len(text))  # the text path's split; the shards hold the same two parts
    train_ids = get_tokenizer().encode(text[:split])
    val_ids = get_tokenizer().encode(text[split:])
    shards = tmp_path / "shards"
    shards.mkdir()
    third = len(train_ids) // 3  # windows cross the shard boundaries
    llmc_write_datafile(shards / "fineweb_train_000001.bin", train_ids[:third])
    llmc_write_datafile(shards / "fineweb_train_000002.bin", train_ids[third:2 * third])
    llmc_write_datafile(shards / "fineweb_train_000003.bin", train_ids[2 * third:])
    llmc_write_datafile(shards / "fineweb_val_000000.bin", val_ids)

    opened = sources.open_shards(sorted(shards.iterdir()), 0.1)
    assert opened.train_tokens == len(train_ids) and opened.val_tokens == len(val_ids)
    assert opened.train()[:].tolist() == train_ids and opened.val()[:].tolist() == val_ids
    mapped = sources.read_shard(shards / "fineweb_train_000001.bin")
    assert isinstance(mapped, np.memmap) and mapped.offset == 1024  # read in place, not copied

    model = tiny_model(tmp_path)
    a = train(**run_options(corpus, model, tmp_path / "text"))
    b = train(**run_options(shards, model, tmp_path / "shards-run"))
    c = train(**run_options(str(shards / "fineweb_*.bin"), model, tmp_path / "glob-run"))
    assert losses(tmp_path / "shards-run", "train", "loss") == pytest.approx(losses(tmp_path / "text", "train", "loss"), rel=1e-6)
    assert b.val_loss == pytest.approx(a.val_loss, rel=1e-6) and c.val_loss == pytest.approx(a.val_loss, rel=1e-6)
    assert not (tmp_path / "shards-run" / "data").exists()  # nothing tokenized or copied

    # resume checks the shards' identity
    train(**run_options(shards, model, tmp_path / "shards-run2", max_steps=2, checkpoint_every=1))
    train(out=str(tmp_path / "shards-run2"), resume=True, max_steps=3)
    llmc_write_datafile(shards / "fineweb_train_000003.bin", train_ids[2 * third:][::-1])
    with pytest.raises(GptforgeError, match="changed since the checkpoint"):
        train(out=str(tmp_path / "shards-run2"), resume=True, max_steps=5)


def test_without_val_shards_the_last_val_fraction_validates(tmp_path):
    ids = list(range(1000))
    llmc_write_datafile(tmp_path / "a.bin", ids[:600])
    llmc_write_datafile(tmp_path / "b.bin", ids[600:])
    opened = sources.open_shards([tmp_path / "a.bin", tmp_path / "b.bin"], 0.25)
    assert opened.train()[:].tolist() == ids[:750] and opened.val()[:].tolist() == ids[750:]
    assert opened.train()[590:610].tolist() == ids[590:610]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "gptforge", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_bad_shards_are_one_line_and_exit_2(tmp_path, capsys):
    model = tiny_model(tmp_path, vocab_size=97)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x_train_000.bin").write_bytes(np.arange(600, dtype=np.int32).tobytes())
    short = tmp_path / "short"
    short.mkdir()
    llmc_write_datafile(short / "x_train_000.bin", list(range(90)) * 5)
    with open(short / "x_train_000.bin", "ab") as f:
        f.write(b"\x00")  # one byte more than the header says
    big = tmp_path / "big"
    big.mkdir()
    llmc_write_datafile(big / "x_train_000.bin", [1, 2, 300] * 200)
    for data, message in ((bad, "not an llm.c token shard: its header starts with 0, not the magic 20240520"),
                          (short, "damaged llm.c shard"),
                          (big, "holds token id 300, beyond the model's vocab_size 97")):
        code = main(["train", "--data", str(data), "--model", str(model), "--out", str(tmp_path / "o"),
                     "--no-progress", "--max-steps", "1"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and message in err, err


# --------------------------------------------------------------------------- datasets

datasets = pytest.importorskip("datasets")


def test_saved_parquet_and_jsonl_datasets_tokenize_as_prepare_py(tmp_path):
    docs, val_docs = documents(300), documents(40, seed=1)
    expected, expected_val = prepare_py(docs), prepare_py(val_docs)
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs, "n": list(range(len(docs)))}),
                          "validation": datasets.Dataset.from_dict({"text": val_docs, "n": [0] * 40})}
                         ).save_to_disk(str(saved))
    corpus = sources.tokenize_dataset(sources.describe_source(saved), tmp_path / "t1", shard_tokens=1000)
    assert corpus.train()[:].tolist() == expected and corpus.val()[:].tolist() == expected_val
    assert len(corpus.train_shards) > 3  # several shards, read back as one

    table = datasets.Dataset.from_dict({"body": docs})
    table.to_parquet(str(tmp_path / "a.parquet"))
    parquet = sources.tokenize_dataset(sources.describe_source(tmp_path / "a.parquet"), tmp_path / "t2",
                                       column="body", val_fraction=0.2)
    n = len(expected)
    assert parquet.train()[:].tolist() == expected[:int(0.8 * n)] and parquet.val()[:].tolist() == expected[int(0.8 * n):]

    folder = tmp_path / "jsonl"
    folder.mkdir()
    for i in range(2):
        (folder / f"part{i}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[150 * i:150 * (i + 1)]))
    assert sources.describe_source(folder).kind == "files"
    capped = sources.tokenize_dataset(sources.describe_source(folder), tmp_path / "t3", max_tokens=1234, val_fraction=0)
    assert capped.train()[:].tolist() == expected[:1234]


def test_a_stopped_tokenization_goes_on_without_redoing_finished_shards(tmp_path, monkeypatch):
    docs = documents(3000)
    expected = prepare_py(docs)
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(saved))
    source = sources.describe_source(saved)

    class Stop:
        requested = True  # as after Ctrl-C: end after the next finished shard

    encoded = []
    real = sources._encode_batch
    monkeypatch.setattr(sources, "_encode_batch", lambda tok, texts, n: encoded.extend(texts) or real(tok, texts, n))
    with pytest.raises(KeyboardInterrupt, match="finished train shards kept"):
        sources.tokenize_dataset(source, tmp_path / "t", shard_tokens=5000, stop=Stop())
    first = len(encoded)
    assert 0 < first < len(docs)
    state = json.loads((tmp_path / "t" / "train.json").read_text())
    encoded.clear()
    corpus = sources.tokenize_dataset(source, tmp_path / "t", shard_tokens=5000, val_fraction=0)
    assert corpus.train()[:].tolist() == expected
    assert encoded[0] == docs[state["docs"]] and len(encoded) == len(docs) - state["docs"]  # only the rest
    encoded.clear()
    sources.tokenize_dataset(source, tmp_path / "t", shard_tokens=5000)
    assert encoded == []  # finished: nothing tokenized again


def test_train_on_a_dataset_and_its_bad_inputs(tmp_path, capsys):
    docs = documents(200)
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": docs, "n": list(range(200))}).save_to_disk(str(saved))
    model = tiny_model(tmp_path)
    result = train(**run_options(saved, model, tmp_path / "run"))
    assert result.steps == 3 and result.val_loss is not None
    shards = sorted((tmp_path / "run" / "data" / "shards").glob("train_*.bin"))
    assert sources.read_shard(shards[0]).tolist() == prepare_py(docs)

    empty = tmp_path / "empty"
    datasets.Dataset.from_dict({"text": []}).save_to_disk(str(empty))
    text = tmp_path / "a.txt"
    text.write_text(" ".join(docs))
    cases = [
        (["--data", str(saved), "--data-column", "body"], "has no column 'body' (its columns: text, n)"),
        (["--data", str(saved), "--data-column", "n"], "column 'n' holds int, not text"),
        (["--data", str(empty)], "is empty"),
        (["--data", str(tmp_path / "nope.parquet")], "data not found"),
        (["--data", str(text), "--data-max-tokens", "5"], "apply to datasets"),
    ]
    capsys.readouterr()
    for args, message in cases:
        code = main(["train", *args, "--model", str(model), "--out", str(tmp_path / "o"), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and message in err, err


def test_a_missing_datasets_library_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "a.jsonl").write_text('{"text": "hello"}\n')
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(GptforgeError, match=r"pip install 'gptforge\[datasets\]'"):
        sources.tokenize_dataset(sources.describe_source(tmp_path / "a.jsonl"), tmp_path / "t")


def test_a_hub_id_streams_from_an_offline_hub_cache(tmp_path, monkeypatch):
    """The datasets cache laid out as `load_dataset("someone/tiny-stories", "sample")` leaves it
    after a download (OWNER___NAME/CONFIG/VERSION/HASH: dataset_info.json and the split's arrow
    file), read with the hub offline, as on a machine that downloaded it before."""
    from datasets.arrow_writer import ArrowWriter

    docs = documents(100)
    cache = tmp_path / "datasets-cache"
    prepared = cache / "someone___tiny-stories" / "sample" / "0.0.0" / "0123456789abcdef"
    prepared.mkdir(parents=True)
    table = datasets.Dataset.from_dict({"text": docs})
    with ArrowWriter(path=str(prepared / "tiny-stories-train.arrow")) as writer:
        writer.write_table(table.data.table)
        writer.finalize()
    split = datasets.SplitInfo("train", num_examples=len(docs), num_bytes=0, dataset_name="tiny-stories")
    datasets.DatasetInfo(features=table.features, config_name="sample", dataset_name="tiny-stories",
                         splits=datasets.SplitDict({"train": split})).write_to_directory(str(prepared))
    import huggingface_hub.constants

    for name, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("HF_DATASETS_CACHE", str(cache))):
        monkeypatch.setenv(name, value)  # as a user sets them; the libraries read them at import:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    source = sources.describe_source("someone/tiny-stories", "sample")
    assert source.kind == "hub"
    corpus = sources.tokenize_dataset(source, tmp_path / "t", data_config="sample", max_tokens=500, val_fraction=0)
    assert corpus.train()[:].tolist() == prepare_py(docs)[:500]
    assert sources.describe_source("someone/tiny-stories").kind == "hub"  # the owner/name form, no config
    with pytest.raises(GptforgeError, match="could not be loaded .*offline: is it in the hub cache"):
        sources.tokenize_dataset(sources.describe_source("someone/not-there"), tmp_path / "t2")


def test_the_new_flags_are_in_train_and_finetune_help(capsys):
    for verb in (["train"], ["finetune", "instruct"], ["finetune", "classify"]):
        assert main([*verb, "--help"]) == 0
        printed = capsys.readouterr().out
        assert "--logger" in printed and "--grad-checkpointing" in printed
        assert verb != ["train"] or ("--data-config" in printed and "--data-max-tokens" in printed)
