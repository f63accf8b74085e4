"""Classification data, head and predictions against the book's chapter 6 (llms_from_scratch.ch06):
the same padded ids as SpamDataset, the same batches as its DataLoaders, the same losses and
accuracies as calc_loss_loader/calc_accuracy_loader; plus the bad inputs that must be one clear line."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from classify_data import write_splits
from gptforge.classifier import (
    Loader, class_logits, classify, encode_texts, label_ids, label_names, loader_accuracy, loader_metrics,
    padded_length, read_labeled, to_classifier,
)
from gptforge.config import GPTConfig
from gptforge.errors import GptforgeError
from gptforge.model import GPTModel, count_parameters
from gptforge.tokenizer import gpt2_encoding

ch06 = pytest.importorskip("llms_from_scratch.ch06")


@pytest.fixture
def splits(tmp_path):
    return write_splits(tmp_path)


def test_padded_ids_equal_the_books_spam_dataset(splits):
    tok = gpt2_encoding()  # tiktoken's gpt2, built offline
    book_train = ch06.SpamDataset(splits["train"], tok)
    book_val = ch06.SpamDataset(splits["val"], tok, max_length=book_train.max_length)
    train, val = read_labeled(splits["train"]), read_labeled(splits["val"])  # "text" finds "Text"
    length = padded_length(train.texts, None, 1024, "train.csv")
    assert length == book_train.max_length
    names = label_names(train.labels)
    assert names == ("0", "1")
    ours = encode_texts(train.texts, length, label_ids(train, names))
    assert ours.ids.tolist() == book_train.encoded_texts
    assert ours.targets.tolist() == book_train.data["Label"].tolist()
    assert encode_texts(val.texts, length).ids.tolist() == book_val.encoded_texts  # cut to the train length
    cut = encode_texts(train.texts, 5)
    assert cut.ids.tolist() == ch06.SpamDataset(splits["train"], tok, max_length=5).encoded_texts
    assert cut.lengths.max().item() == 5


def test_loaders_losses_and_accuracies_equal_the_books(splits, tiny_config):
    cfg = tiny_config(vocab_size=50257, context_length=64)
    tok = gpt2_encoding()  # tiktoken's gpt2, built offline
    book_train = ch06.SpamDataset(splits["train"], tok)
    book_val = ch06.SpamDataset(splits["val"], tok, max_length=book_train.max_length)
    torch.manual_seed(0)
    model = GPTModel(cfg).eval()
    torch.manual_seed(1)
    to_classifier(model, ["0", "1"], pool="last", max_length=book_train.max_length)
    train, val = read_labeled(splits["train"]), read_labeled(splits["val"])
    ours_train = Loader(encode_texts(train.texts, book_train.max_length, label_ids(train, ("0", "1"))), 8,
                        shuffle=True, drop_last=True)
    ours_val = Loader(encode_texts(val.texts, book_train.max_length, label_ids(val, ("0", "1"))), 8)
    loaders = (torch.utils.data.DataLoader(book_train, batch_size=8, shuffle=True, drop_last=True),
               torch.utils.data.DataLoader(book_val, batch_size=8))
    torch.manual_seed(123)
    expected = [ch06.calc_loss_loader(loaders[0], model, "cpu", 3), ch06.calc_loss_loader(loaders[1], model, "cpu"),
                ch06.calc_accuracy_loader(loaders[0], model, "cpu", 2), ch06.calc_accuracy_loader(loaders[1], model, "cpu")]
    torch.manual_seed(123)
    got = [loader_metrics(model, ours_train, 3)[0], loader_metrics(model, ours_val)[0],
           loader_accuracy(model, ours_train, 2), loader_accuracy(model, ours_val)]
    assert len(ours_train) == len(loaders[0]) and len(ours_val) == len(loaders[1])
    assert got == pytest.approx(expected, abs=1e-6)
    assert torch.rand(1).item() == pytest.approx(torch.manual_seed(123) and _book_draws(loaders))


def _book_draws(loaders) -> float:
    """The global RNG after the book's four loader passes above (ours must leave it the same)."""
    for loader in (loaders[0], loaders[1], loaders[0], loaders[1]):
        next(iter(loader))  # the sampler draws its seed on the first batch
    return torch.rand(1).item()


def test_last_real_reads_the_last_token_not_the_padding(tiny_config):
    cfg = tiny_config(vocab_size=50257, context_length=32)
    torch.manual_seed(0)
    model = to_classifier(GPTModel(cfg).eval(), ["neg", "pos"], pool="last-real", max_length=20)
    data = encode_texts(["a short one", "a much longer text that has more tokens in it"], 20)
    with torch.no_grad():
        pooled = class_logits(model, data.ids, data.lengths)
        alone = class_logits(model, data.ids[:1, :data.lengths[0]])  # no padding at all
    torch.testing.assert_close(pooled[:1], alone)
    predictions = classify(model, ["a short one"])
    assert predictions[0].label in ("neg", "pos")
    assert sum(predictions[0].probabilities.values()) == pytest.approx(1.0)
    probs = torch.softmax(alone, -1)[0]
    assert predictions[0].probabilities["pos"] == pytest.approx(probs[1].item(), abs=1e-6)


def test_book_pool_classifies_like_classify_review(tiny_config):
    cfg = tiny_config(vocab_size=50257, context_length=32)
    torch.manual_seed(0)
    model = to_classifier(GPTModel(cfg).eval(), ["not spam", "spam"], pool="last", max_length=12)
    tok = gpt2_encoding()  # tiktoken's gpt2, built offline
    for text in ("You won a prize, call now", "See you at dinner tonight, love"):
        expected = ch06.classify_review(text, model, tok, "cpu", max_length=12)
        assert classify(model, text)[0].label == expected


def test_classifier_config_round_trips_and_counts_the_head(tiny_config):
    cfg = GPTConfig.from_dict(tiny_config())
    clf = cfg.replace(classifier={"labels": ["ham", "spam"], "pool": "last", "max_length": 7})
    data = json.loads(json.dumps(clf.to_dict()))
    assert data["classifier"] == {"labels": ["ham", "spam"], "pool": "last", "max_length": 7}
    assert GPTConfig.from_dict(data) == clf
    assert "classifier" not in cfg.to_dict()  # language models' config.json is unchanged
    model = GPTModel(clf)
    assert isinstance(model.out_head, nn.Linear) and model.out_head.bias is not None
    assert count_parameters(clf).total == sum(p.numel() for p in model.parameters())
    with pytest.raises(GptforgeError, match="two or more"):
        cfg.replace(classifier={"labels": ["only"]})
    with pytest.raises(GptforgeError, match="tied"):
        cfg.replace(tie_weights=True, classifier={"labels": ["a", "b"]})


def test_bad_inputs_are_clear_errors(tmp_path, tiny_config):
    (tmp_path / "a.csv").write_text("sentence,label\nhello there,a\n")
    with pytest.raises(GptforgeError, match=r"no column 'text'.*--text-column"):
        read_labeled(tmp_path / "a.csv")
    (tmp_path / "b.jsonl").write_text('{"text": "fine", "label": "x"}\n{"text": "  ", "label": "y"}\n')
    with pytest.raises(GptforgeError, match="record 2 has an empty 'text'"):
        read_labeled(tmp_path / "b.jsonl")
    (tmp_path / "c.jsonl").write_text('{"text": "fine", "label": "z"}\n')
    with pytest.raises(GptforgeError, match=r"labels the model was not trained on: \['z'\]"):
        label_ids(read_labeled(tmp_path / "c.jsonl"), ("x", "y"))
    with pytest.raises(GptforgeError, match="more than the model's context of 4; pass --max-length"):
        padded_length(["one two three four five six"], None, 4, "train.csv")
    with pytest.raises(FileNotFoundError):
        read_labeled(tmp_path / "missing.csv")
    model = GPTModel(tiny_config(vocab_size=50257))
    with pytest.raises(GptforgeError, match="not a classifier"):
        classify(model, ["text"])
    with pytest.raises(GptforgeError, match="at least two"):
        label_names(["a", "a"])


def test_classifier_checkpoint_loads_converts_and_checks_its_sums(tiny_config, tmp_path, capsys):
    from gptforge.checkpoint import load, save
    from gptforge.cli import main

    torch.manual_seed(0)
    model = to_classifier(GPTModel(tiny_config(vocab_size=50257)).eval(), ["neg", "neu", "pos"], max_length=9)
    save(model, tmp_path / "clf")
    assert main(["convert", str(tmp_path / "clf"), "--to", "gptforge", "--out", str(tmp_path / "copy")]) == 0
    assert main(["info", str(tmp_path / "copy")]) == 0
    assert "output head" in capsys.readouterr().out
    x = torch.randint(0, 50257, (2, 9))
    copy = load(tmp_path / "copy")
    assert copy.cfg.classifier == model.cfg.classifier
    with torch.no_grad():
        torch.testing.assert_close(copy(x), model(x), atol=0, rtol=0)
    assert [p.label for p in classify(copy, ["one", "two"])] == [p.label for p in classify(model, ["one", "two"])]
    weights = tmp_path / "copy" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(GptforgeError, match="fails its checksum"):
        load(tmp_path / "copy")
    assert main(["convert", str(tmp_path / "clf"), "--to", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert "GPT2ForSequenceClassification" in capsys.readouterr().err


def test_a_classifier_is_refused_where_tokens_are_predicted(tiny_config, tmp_path, capsys):
    """Its head scores labels: generate printed label ids as tokens, train and finetune instruct
    ended in cross_entropy's IndexError, convert --to gguf wrote a GGUF llama.cpp would misread.
    Each is now one line naming the classifier, exit 2. (serve serves it for /classify, where
    generating is a 400: tests/test_serve_endpoints.py.)"""
    from gptforge.checkpoint import save
    from gptforge.cli import main

    model = to_classifier(GPTModel(tiny_config(vocab_size=50257)).eval(), ["neg", "pos"], max_length=9)
    save(model, tmp_path / "clf")
    clf = str(tmp_path / "clf")
    (tmp_path / "text.txt").write_text("Every effort moves you. " * 40)
    (tmp_path / "ins.json").write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "hi"}] * 4))
    for argv in (["generate", "hi", "--model", clf],
                 ["train", "--model", clf, "--data", str(tmp_path / "text.txt"), "--out", str(tmp_path / "run"),
                  "--no-progress"],
                 ["finetune", "instruct", "--model", clf, "--data", str(tmp_path / "ins.json"),
                  "--out", str(tmp_path / "ins"), "--no-progress"],
                 ["convert", clf, "--to", "gguf", "--out", str(tmp_path / "clf.gguf")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "classifier" in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "clf.gguf").exists()


def test_classify_names_bad_texts_batch_sizes_and_models(tiny_config):
    from gptforge import classify

    model = to_classifier(GPTModel(tiny_config(vocab_size=50257)).eval(), ["neg", "pos"])
    for size in (0, -1, 1.5):  # -1 returned no predictions at all; 0 and 1.5 were errors from range()
        with pytest.raises(GptforgeError, match="batch_size must be an integer >= 1"):
            classify(model, ["a text"], batch_size=size)
    with pytest.raises(GptforgeError, match="texts must be a str or a list of str"):
        classify(model, 5)
    with pytest.raises(GptforgeError, match="text 2 must be a str"):
        classify(model, ["a text", 5])
    with pytest.raises(GptforgeError, match="expected a gptforge classifier"):
        classify(None, "a text")  # was 'this model is a language model'
    with pytest.raises(GptforgeError, match="unknown device 'gpu'"):
        classify(model, "a text", device="gpu")
