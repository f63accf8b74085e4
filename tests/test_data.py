"""Data: streaming tokenization into uint16 token files, the book's split and sliding windows,
the DataLoader's use of the global RNG, and clear errors for bad data."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from gptforge import data
from gptforge.data import TokenWindows, batch_indices, draw_loader_seed, permutation, tokenize_corpus
from gptforge.tokenizer import get_tokenizer



@pytest.fixture
def verdict(data_dir) -> Path:
    return data_dir / "the-verdict.txt"


@pytest.fixture
def shakespeare(data_dir) -> Path:
    return data_dir / "tinyshakespeare.txt"


def _encode(text: str) -> list[int]:
    return get_tokenizer().encode(text)


def test_split_and_tokens_match_the_book(tmp_path, verdict):
    text = verdict.read_text(encoding="utf-8")
    split = int(0.9 * len(text))  # the book's chapter-5 split, by characters
    corpus = tokenize_corpus(verdict, tmp_path, val_fraction=0.1)
    assert corpus.train().dtype == np.uint16
    assert corpus.train().tolist() == _encode(text[:split])
    assert corpus.val().tolist() == _encode(text[split:])
    assert len(_encode(text)) == 5145  # the seed's figure for the whole story


def test_streaming_in_small_chunks_gives_the_same_tokens_as_the_whole_text(tmp_path, monkeypatch, shakespeare):
    text = shakespeare.read_text(encoding="utf-8")[:200_000]
    src = tmp_path / "part.txt"
    src.write_text(text + "  \n\n  trailing   spaces and\n\n\nnewlines   ")
    monkeypatch.setattr(data, "CHUNK_CHARS", 997)  # hundreds of chunk boundaries
    corpus = tokenize_corpus(src, tmp_path / "tok", val_fraction=0.0)
    assert corpus.train().tolist() == _encode(src.read_text())
    assert corpus.val() is None


def test_folder_and_glob_join_documents_with_endoftext(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("First document.")
    (folder / "sub" / "b.txt").write_text("Second one here.")
    (folder / ".hidden.txt").write_text("not read")
    eot = get_tokenizer().eot_id
    expected = _encode("First document.") + [eot] + _encode("Second one here.")
    assert tokenize_corpus(folder, tmp_path / "t1", val_fraction=0).train().tolist() == expected
    assert tokenize_corpus(str(folder / "**" / "*.txt"), tmp_path / "t2", val_fraction=0).train().tolist() == expected


def test_token_files_are_reused_and_rebuilt_when_the_text_changes(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("one two three four five six seven")
    tokenize_corpus(src, tmp_path / "tok", val_fraction=0)
    stamp = (tmp_path / "tok" / "train.bin").stat().st_mtime_ns
    tokenize_corpus(src, tmp_path / "tok", val_fraction=0)
    assert (tmp_path / "tok" / "train.bin").stat().st_mtime_ns == stamp
    src.write_text("something else entirely, and longer than before")
    corpus = tokenize_corpus(src, tmp_path / "tok", val_fraction=0)
    assert corpus.train().tolist() == _encode(src.read_text())


def test_windows_and_loader_match_the_books_dataloader(verdict):
    from llms_from_scratch.ch02 import GPTDatasetV1

    text = verdict.read_text(encoding="utf-8")
    tokens = np.array(_encode(text), dtype=np.uint16)
    for max_length, stride in ((256, 256), (8, 3), (4, 1)):
        book = GPTDatasetV1(text, get_tokenizer().encoding, max_length, stride)
        ours = TokenWindows(tokens, max_length, stride)
        assert len(ours) == len(book)
        for i in (0, 1, len(book) // 2, len(book) - 1):
            x, y = ours[i]
            assert torch.equal(x, book[i][0]) and torch.equal(y, book[i][1])

    # The book's shuffled, drop_last DataLoader: same batches, and the same global RNG afterwards.
    book = GPTDatasetV1(text, get_tokenizer().encoding, 256, 256)
    ours = TokenWindows(tokens, 256)
    torch.manual_seed(123)
    loader = torch.utils.data.DataLoader(book, batch_size=2, shuffle=True, drop_last=True)
    book_batches = [x for x, _ in loader]
    book_after = torch.rand(3)
    torch.manual_seed(123)
    seed = draw_loader_seed(shuffle=True)
    ours_batches = [ours.batch(b)[0] for b in batch_indices(len(ours), 2, order=permutation(len(ours), seed), drop_last=True)]
    assert torch.equal(torch.rand(3), book_after)
    assert len(ours_batches) == len(book_batches) == 10  # 20 windows of the whole story
    assert all(torch.equal(a, b) for a, b in zip(ours_batches, book_batches))
    # An unshuffled loader draws one number (its base seed).
    torch.manual_seed(5)
    list(torch.utils.data.DataLoader(book, batch_size=2))
    after = torch.rand(2)
    torch.manual_seed(5)
    assert draw_loader_seed(shuffle=False) is None
    assert torch.equal(torch.rand(2), after)


def test_batch_indices_keep_or_drop_the_last_batch():
    assert batch_indices(5, 2) == [[0, 1], [2, 3], [4]]
    assert batch_indices(5, 2, drop_last=True) == [[0, 1], [2, 3]]
    assert batch_indices(3, 2, order=[2, 0, 1]) == [[2, 0], [1]]


def test_bad_data_gets_clear_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        tokenize_corpus(empty, tmp_path / "a")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"abc\x00\x01\x02def")
    with pytest.raises(ValueError, match="binary"):
        tokenize_corpus(binary, tmp_path / "b")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        tokenize_corpus(latin1, tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="not found"):
        tokenize_corpus(tmp_path / "missing.txt", tmp_path / "d")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(FileNotFoundError, match="no files"):
        tokenize_corpus(tmp_path / "nothing", tmp_path / "e")
    with pytest.raises(FileNotFoundError, match="no files match"):
        tokenize_corpus(str(tmp_path / "*.md"), tmp_path / "f")
    with pytest.raises(ValueError, match="val_fraction"):
        tokenize_corpus(latin1, tmp_path / "g", val_fraction=1.0)
    with pytest.raises(ValueError, match="shorter than one window"):
        TokenWindows(np.arange(10, dtype=np.uint16), context_length=10)
    with pytest.raises(ValueError, match="stride"):
        TokenWindows(np.arange(100, dtype=np.uint16), context_length=10, stride=0)


def test_tokenizing_shows_progress_and_ctrl_c_leaves_no_token_files(tmp_path, monkeypatch, capsys):
    source = tmp_path / "a.txt"
    source.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    monkeypatch.setattr(data, "CHUNK_CHARS", 64)
    tokenize_corpus(source, tmp_path / "ok", progress=True)
    assert "tokenizing" in capsys.readouterr().err  # the bar, on stderr

    calls = []

    def interrupted(self, text):  # Ctrl-C part way through the text
        calls.append(text)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(data._TokenWriter, "write_text", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tokenize_corpus(source, tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == []  # no *.tmp, no meta.json


def test_a_token_file_cut_short_is_tokenized_again(tmp_path):
    """meta.json names the token counts; a train.bin shorter than that (a full disk, a copy cut
    short) is not memory-mapped (numpy's 'mmap length is greater than file size') but rebuilt."""
    src = tmp_path / "t.txt"
    src.write_text("one two three four five six seven eight nine ten " * 20)
    first = tokenize_corpus(src, tmp_path / "tok", val_fraction=0.2)
    expected = first.train().tolist()
    with open(first.train_path, "r+b") as f:
        f.truncate(first.train_path.stat().st_size // 2)
    again = tokenize_corpus(src, tmp_path / "tok", val_fraction=0.2)
    assert again.train().tolist() == expected and again.val_tokens == first.val_tokens


def test_token_files_are_fsynced_under_unique_names_before_their_rename(tmp_path, monkeypatch):
    """Each token file is fsynced before it is renamed into place (as meta.json is), from a
    temporary name no other process shares; a fixed name left by an older, killed run is removed."""
    src = tmp_path / "t.txt"
    src.write_text("one two three four five six seven eight nine ten " * 20)
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "train.bin.tmp").write_bytes(b"\0\0")
    synced, real_fsync = [], os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    tokenize_corpus(src, folder, val_fraction=0.2)
    names = [Path(p).name for p in synced if isinstance(p, str)]
    if not names:
        pytest.skip("no /proc/self/fd to name the fsynced files")
    assert any(re.fullmatch(r"\.train\.bin\.\w{8}\.tmp", n) for n in names)
    assert any(re.fullmatch(r"\.val\.bin\.\w{8}\.tmp", n) for n in names)
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "train.bin", "val.bin"]
