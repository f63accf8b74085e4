"""`gptforge.evaluate` and `gptforge eval`: sliding-window perplexity against the loop of Hugging
Face's perplexity guide run by transformers on the HF export of the same weights, and the classifier
report against scikit-learn."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

import gptforge
from gptforge.cli import DEFAULT_MODEL, main
from gptforge.evaluate import Perplexity, perplexity, sliding_windows
from gptforge.tokenizer import get_tokenizer

transformers = pytest.importorskip("transformers")

RTOL = 1e-5


def guide_nll(hf_model, ids: list[int], stride: int) -> tuple[float, int, int]:
    """The guide's loop, verbatim but for the token count: (summed NLL, tokens the loss averaged,
    the guide's own count `num_valid_tokens - batch_size`)."""
    encodings = torch.tensor([ids])
    max_length = hf_model.config.n_positions
    seq_len = encodings.size(1)
    nll_sum, n_tokens, guide_tokens, prev_end_loc = 0.0, 0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            neg_log_likelihood = hf_model(input_ids, labels=target_ids).loss
        loss_tokens = int((target_ids[:, 1:] != -100).sum())  # what the shifted loss averaged over
        nll_sum += neg_log_likelihood.item() * loss_tokens
        n_tokens += loss_tokens
        guide_tokens += int((target_ids != -100).sum()) - target_ids.size(0)
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum, n_tokens, guide_tokens


def hf_export(model, tmp_path):
    out = gptforge.save(model, tmp_path / "hf", format="hf")
    return transformers.GPT2LMHeadModel.from_pretrained(out).eval()


def check_against_guide(model, hf_model, text: str, stride: int, batch_size: int) -> None:
    ids = get_tokenizer().encode(text)
    ours = perplexity(model, text, stride=stride, batch_size=batch_size)
    nll, tokens, guide_tokens = guide_nll(hf_model, ids, stride)
    assert ours.tokens == tokens
    assert ours.loss == pytest.approx(nll / tokens, rel=RTOL)
    assert ours.perplexity == pytest.approx(math.exp(nll / tokens), rel=RTOL)
    assert ours.bits_per_byte == pytest.approx(nll / math.log(2) / len(text.encode()), rel=RTOL)
    if stride == model.cfg.context_length:  # disjoint windows: the guide's own count is exact
        assert guide_tokens == tokens


@pytest.fixture(scope="module")
def tiny_gpt2_vocab(tiny_config):
    torch.manual_seed(0)
    return gptforge.GPTModel(tiny_config(vocab_size=50257, context_length=32)).eval()


@pytest.mark.parametrize("stride,batch_size", [(32, 4), (32, 1), (12, 5), (1, 64)])
def test_random_model_equals_the_guide_with_transformers(tiny_gpt2_vocab, tmp_path, data_dir, stride, batch_size):
    text = (data_dir / "the-verdict.txt").read_text(encoding="utf-8")[:1500]
    hf_model = hf_export(tiny_gpt2_vocab, tmp_path)
    check_against_guide(tiny_gpt2_vocab, hf_model, text if stride > 1 else text[:200], stride, batch_size)


def test_text_shorter_than_the_context_is_one_window(tiny_gpt2_vocab, tmp_path):
    text = "Every effort moves you forward, they said."
    assert len(get_tokenizer().encode(text)) < 32
    check_against_guide(tiny_gpt2_vocab, hf_export(tiny_gpt2_vocab, tmp_path), text, 32, 4)


def test_builtin_model_equals_the_guide_with_transformers(tmp_path, data_dir):
    model = gptforge.load(DEFAULT_MODEL, dtype=torch.float32)
    hf_model = hf_export(model, tmp_path)
    text = (data_dir / "tinyshakespeare.txt").read_text(encoding="utf-8")
    text = text[int(0.9 * len(text)):][:3000]  # a slice of the validation part
    for stride in (model.cfg.context_length, 100):
        check_against_guide(model, hf_model, text, stride, 4)


def test_a_loss_too_large_for_exp_has_an_infinite_perplexity():
    """exp overflows a float above ~709.78 nats (a diverged model): perplexity inf, not an OverflowError."""
    score = Perplexity.from_sums(nll_sum=7100.0, tokens=10, num_bytes=40)
    assert score.loss == 710.0 and score.perplexity == math.inf
    assert Perplexity.combine([score, Perplexity.from_sums(20.0, 10, 40)]).perplexity == pytest.approx(math.exp(356))


def test_windows_score_every_token_but_the_first_once():
    for n, ctx, stride in [(100, 16, 16), (100, 16, 5), (100, 16, 1), (7, 16, 3), (33, 16, 16)]:
        scored = [p for _, end, first in sliding_windows(n, ctx, stride) for p in range(first, end)]
        if stride < ctx:
            assert scored == list(range(1, n))
        else:  # disjoint: each window's first token is context only
            assert scored == [p for p in range(1, n) if p % ctx]
        assert all(end - begin <= ctx for begin, end, _ in sliding_windows(n, ctx, stride))


def test_several_texts_sum_their_scores(tiny_gpt2_vocab):
    a, b = "The quick brown fox jumps over the lazy dog. " * 3, "Once upon a time, there was a model."
    both = perplexity(tiny_gpt2_vocab, [a, b])
    pa, pb = perplexity(tiny_gpt2_vocab, a), perplexity(tiny_gpt2_vocab, b)
    assert both.tokens == pa.tokens + pb.tokens and both.bytes == len(a) + len(b)
    assert both.loss == pytest.approx((pa.loss * pa.tokens + pb.loss * pb.tokens) / both.tokens, rel=1e-12)


# --------------------------------------------------------------------------- the command line

@pytest.fixture
def tiny_checkpoint(tiny_gpt2_vocab, tmp_path):
    return gptforge.save(tiny_gpt2_vocab, tmp_path / "tiny")


def test_cli_json_equals_the_python_api(tiny_checkpoint, tiny_gpt2_vocab, tmp_path, capsys):
    text = "It was a dark and stormy night; the rain fell in torrents. " * 4
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    assert main(["eval", "--model", str(tiny_checkpoint), "--data", str(tmp_path / "a.txt"),
                 "--stride", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = perplexity(tiny_gpt2_vocab, text, stride=8)
    assert out["stride"] == 8 and out["model"] == str(tiny_checkpoint)
    assert out["tokens"] == expected.tokens and out["bytes"] == expected.bytes
    for key in ("loss", "perplexity", "bits_per_byte"):
        assert out[key] == pytest.approx(getattr(expected, key), rel=1e-6)


def test_cli_table_has_a_row_per_file_and_a_total(tiny_checkpoint, tmp_path, capsys):
    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text(f"Text {name}, a few words long, for the table.", encoding="utf-8")
    assert main(["eval", "--model", str(tiny_checkpoint), "--data", str(tmp_path / "a.txt"),
                 str(tmp_path / "b.txt")]) == 0
    out = capsys.readouterr().out
    assert "a.txt" in out and "b.txt" in out and "total" in out and "perplexity" in out


@pytest.mark.parametrize("mode", [["--dtype", "bfloat16"], ["--quantize", "int8"]])
def test_cli_dtype_and_quantize_cost_little_perplexity(tiny_checkpoint, tiny_gpt2_vocab, tmp_path, capsys, mode):
    text = "It was a dark and stormy night; the rain fell in torrents. " * 4
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    assert main(["eval", "--model", str(tiny_checkpoint), "--data", str(tmp_path / "a.txt"), "--json", *mode]) == 0
    out = json.loads(capsys.readouterr().out)
    fp32 = perplexity(tiny_gpt2_vocab, text)
    assert out["loss"] != fp32.loss  # a different computation ran
    assert out["loss"] == pytest.approx(fp32.loss, rel=2e-2)


@pytest.mark.parametrize("content,extra,message", [
    (b"", [], "empty"),
    (b"caf\xe9 au lait", [], "UTF-8"),
    (b"Hi", [], "two"),
    (b"some ordinary text here", ["--stride", "33"], "stride"),
    (b"some ordinary text here", ["--stride", "0"], "stride"),
    (b"some ordinary text here", ["--batch-size", "0"], "batch"),
    (b"some ordinary text here", ["--text-column", "sms"], "--text-column and --label-column are for a classifier"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tiny_checkpoint, tmp_path, capsys, content, extra, message):
    (tmp_path / "bad.txt").write_bytes(content)
    assert main(["eval", "--model", str(tiny_checkpoint), "--data", str(tmp_path / "bad.txt"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_cli_missing_file_is_exit_2(tiny_checkpoint, tmp_path, capsys):
    assert main(["eval", "--model", str(tiny_checkpoint), "--data", str(tmp_path / "nope.txt")]) == 2
    assert capsys.readouterr().err.count("\n") == 1



# --------------------------------------------------------------------------- classifier metrics

def test_classification_report_equals_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    from gptforge.evaluate import classification_report

    gen = torch.Generator().manual_seed(0)
    names = ["ham", "spam", "eggs", "never"]  # "never" is neither true nor predicted: all zeros
    y_true = torch.randint(0, 3, (200,), generator=gen).tolist()
    y_pred = [t if torch.rand(1, generator=gen).item() < 0.6 else int(torch.randint(0, 3, (1,), generator=gen))
              for t in y_true]
    y_pred[:5] = [3] * 5  # a class predicted but never true
    report = classification_report(y_true, y_pred, names)
    labels = list(range(4))
    p, r, f, s = metrics.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    assert report.accuracy == pytest.approx(metrics.accuracy_score(y_true, y_pred), abs=1e-12)
    assert report.precision == pytest.approx(tuple(p), abs=1e-12)
    assert report.recall == pytest.approx(tuple(r), abs=1e-12)
    assert report.f1 == pytest.approx(tuple(f), abs=1e-12)
    assert report.support == tuple(int(n) for n in s)
    assert [list(row) for row in report.confusion] == metrics.confusion_matrix(y_true, y_pred, labels=labels).tolist()
    assert report.macro_f1 == pytest.approx(metrics.f1_score(y_true, y_pred, labels=labels, average="macro",
                                                             zero_division=0), abs=1e-12)
    by_name = classification_report([names[i] for i in y_true], [names[i] for i in y_pred], names)
    assert by_name == report
    assert "confusion matrix" in report.format() and json.dumps(report.to_dict())


def test_classification_report_refuses_unknown_labels():
    from gptforge.evaluate import classification_report

    with pytest.raises(ValueError, match="'maybe' is not one of the classes"):
        classification_report(["yes", "maybe"], ["yes", "no"], ["no", "yes"])
    with pytest.raises(ValueError, match="class index"):
        classification_report([0, 2], [0, 1], ["no", "yes"])
    with pytest.raises(ValueError, match="as many predictions"):
        classification_report([0, 1], [0], ["no", "yes"])
    # index 1 is the class "2" here, the name "1" the class "1": a mix of the two is refused
    with pytest.raises(ValueError, match=r"true labels mix class names \('1'\) and indices \(1\)"):
        classification_report([1, "1"], [0, 0], ["1", "2"])


# --------------------------------------------------------------------------- `gptforge eval` on a classifier

LABELS = ["ham", "spam", "eggs"]


@pytest.fixture
def classifier_checkpoint(tiny_config, tmp_path):
    """A tiny untrained 3-class classifier: its predictions are arbitrary but fixed, which is all
    the report needs."""
    from gptforge.classifier import to_classifier

    torch.manual_seed(0)
    model = to_classifier(gptforge.GPTModel(tiny_config(vocab_size=50257, context_length=32)), LABELS)
    return gptforge.save(model, tmp_path / "clf")


def _labelled(path, rows) -> str:
    path.write_text("text,label\n" + "".join(f'"{t}",{label}\n' for t, label in rows), encoding="utf-8")
    return str(path)


def test_cli_classifier_report_equals_scikit_learn_on_classify(classifier_checkpoint, tmp_path, capsys):
    metrics = pytest.importorskip("sklearn.metrics")
    words = ["free", "prize", "call", "now", "see", "you", "at", "the", "park", "cake", "tea", "later"]
    gen = torch.Generator().manual_seed(1)
    rows = [(" ".join(words[int(i)] for i in torch.randint(0, len(words), (2 + k % 7,), generator=gen)), LABELS[k % 3])
            for k in range(30)]
    a, b = _labelled(tmp_path / "a.csv", rows[:18]), _labelled(tmp_path / "b.csv", rows[18:])
    assert main(["eval", "--model", str(classifier_checkpoint), "--data", a, b, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    predicted = [p.label for p in gptforge.classify(str(classifier_checkpoint), [t for t, _ in rows])]
    true = [label for _, label in rows]
    p, r, f, s = metrics.precision_recall_fscore_support(true, predicted, labels=LABELS, zero_division=0)
    assert out["accuracy"] == pytest.approx(metrics.accuracy_score(true, predicted), abs=1e-12)
    for i, name in enumerate(LABELS):
        cls = out["classes"][name]
        assert (cls["precision"], cls["recall"], cls["f1"], cls["support"]) == pytest.approx((p[i], r[i], f[i], s[i]))
    assert out["confusion"]["matrix"] == metrics.confusion_matrix(true, predicted, labels=LABELS).tolist()
    assert main(["eval", "--model", str(classifier_checkpoint), "--data", a, b]) == 0
    table = capsys.readouterr().out
    assert "confusion matrix" in table and all(name in table for name in LABELS)


def test_cli_classifier_report_shows_progress_on_a_terminal_only(classifier_checkpoint, tmp_path, capsys,
                                                                  monkeypatch):
    path = _labelled(tmp_path / "t.csv", [(f"text number {k}", LABELS[k % 3]) for k in range(40)])
    argv = ["eval", "--model", str(classifier_checkpoint), "--data", path, "--batch-size", "8", "--json"]
    assert main(argv) == 0
    piped = capsys.readouterr()
    assert piped.err == ""  # a log or a pipe gets just the result
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(argv) == 0
    shown = capsys.readouterr()
    assert "40/40" in shown.err and "text" in shown.err  # the bar over the texts, 5 batches
    assert json.loads(shown.out) == json.loads(piped.out)


@pytest.mark.parametrize("rows,extra,message", [
    ([("a fine day", "ham"), ("win money", "maybe")], [], "'maybe'"),
    ([("a fine day", "ham")], ["--label-column", "category"], "category"),
    ([("a fine day", "ham")], ["--stride", "8"], "classifier"),
])
def test_cli_classifier_bad_input_is_one_line_and_exit_2(classifier_checkpoint, tmp_path, capsys, rows, extra, message):
    path = _labelled(tmp_path / "t.csv", rows)
    assert main(["eval", "--model", str(classifier_checkpoint), "--data", path, *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_perplexity_names_a_wrong_model_text_or_tokenizer(tiny_gpt2_vocab):
    for text in (5, None, b"some bytes", ["fine text", 5]):  # were TypeErrors from deep inside
        with pytest.raises(gptforge.GptforgeError, match="text must be a str or a list of str"):
            perplexity(tiny_gpt2_vocab, text)
    for model in ("gpt2-124m", None):  # were AttributeErrors: no attribute 'cfg'
        with pytest.raises(gptforge.GptforgeError, match="perplexity needs a gptforge GPTModel"):
            perplexity(model, "some text")
    with pytest.raises(gptforge.GptforgeError, match="tokenizer must be"):
        perplexity(tiny_gpt2_vocab, "some text", tokenizer="gpt2")


def test_classification_report_takes_lists_tensors_and_refuses_strings():
    from gptforge import classification_report

    report = classification_report(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), ["a", "b"])  # was a RuntimeError
    assert report.confusion == ((1, 0), (1, 1))
    with pytest.raises(gptforge.GptforgeError, match="label_names must be a list"):
        classification_report([0], [1], "ab")  # was taken as the labels 'a' and 'b'
    for bad in (None, (label for label in [0])):
        with pytest.raises(gptforge.GptforgeError, match="y_true must be a list"):
            classification_report(bad, [0], ["a", "b"])
