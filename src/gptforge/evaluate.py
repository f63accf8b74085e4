"""Measuring a model: perplexity of a text by sliding window, and a classifier's metrics.

Perplexity follows Hugging Face's guide "Perplexity of fixed-length models": windows of
`context_length` tokens start at 0, S, 2S, ... (S = `stride`) until one reaches the end of the text;
each window scores the tokens that the previous window did not reach, each with all the left context
its window holds. The text's first token has no context and is not scored; with S = context_length
(disjoint windows) the first token of every window is not scored either, as in the guide.
The one difference from the guide's code: a window's mean loss is weighted by the number of tokens
it actually scored (the guide's `num_valid_tokens - batch_size` undercounts overlapping windows by
one each), so the result is the plain mean over all scored tokens.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GPTConfig
from .errors import GptforgeError
from .metrics import progress_bar
from .tokenizer import Tokenizer, as_tokenizer

IGNORE = -100  # target of a position that is context only (as transformers' labels)
LONG_TEXT_WINDOWS = 8  # more windows than this get a progress bar (when asked for)


def loss_perplexity(loss: float) -> float:
    """exp(loss): the perplexity of a mean loss in nats; inf where that overflows (a loss above
    ~709.78, e.g. a diverged run's), NaN for a NaN loss."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


@dataclasses.dataclass(frozen=True)
class Perplexity:
    """A text's score. loss: mean negative log-likelihood in nats per scored token;
    perplexity = exp(loss); bits_per_byte: the summed NLL in bits over the text's UTF-8 bytes;
    tokens: tokens scored; bytes: UTF-8 bytes of the text."""

    loss: float
    perplexity: float
    bits_per_byte: float
    tokens: int
    bytes: int

    @classmethod
    def from_sums(cls, nll_sum: float, tokens: int, num_bytes: int) -> Perplexity:
        """From the summed NLL (nats) over `tokens` scored tokens of a text of `num_bytes` bytes."""
        loss = nll_sum / tokens
        return cls(loss=loss, perplexity=loss_perplexity(loss), bits_per_byte=nll_sum / (math.log(2) * num_bytes),
                   tokens=tokens, bytes=num_bytes)

    @classmethod
    def combine(cls, parts: Sequence[Perplexity]) -> Perplexity:
        """Several texts as one score: NLL and counts summed (each text keeps its own windows)."""
        nll = sum(p.loss * p.tokens for p in parts)
        return cls.from_sums(nll, sum(p.tokens for p in parts), sum(p.bytes for p in parts))

    def to_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


def sliding_windows(num_tokens: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """The guide's windows over `num_tokens` tokens: (begin, end, first_scored) per window, the
    window being tokens [begin, end) and its scored tokens [first_scored, end)."""
    check_stride(stride, context_length)
    windows, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + context_length, num_tokens)
        windows.append((begin, end, max(prev_end, begin + 1)))  # token `begin` has no context here
        prev_end = end
        if end == num_tokens:
            break
    return windows


def check_stride(stride: int, context_length: int) -> None:
    """A stride must be in [1, context_length]: larger ones would skip tokens."""
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= context_length:
        raise GptforgeError(f"stride must be an integer in [1, {context_length}] (the model's context "
                            f"length), got {stride!r}")


def _batches(windows: list[tuple[int, int, int]], batch_size: int) -> Iterator[list[tuple[int, int, int]]]:
    for i in range(0, len(windows), batch_size):
        yield windows[i:i + batch_size]


@torch.no_grad()
def token_nll(model: nn.Module, ids: Sequence[int], *, stride: int | None = None, batch_size: int = 4,
              progress: bool = False) -> tuple[float, int]:
    """Summed negative log-likelihood (nats, float64) of `ids` by sliding window, and how many
    tokens it scored. `stride` defaults to the context length (disjoint windows); windows run
    `batch_size` at a time (a short last window is right-padded: causal attention never sees it)."""
    if getattr(model.cfg, "classifier", None) is not None:
        raise GptforgeError("this model is a classifier, not a language model: it has no perplexity; "
                            "evaluate it on a CSV/JSONL file of texts and labels")
    context_length = model.cfg.context_length
    stride = context_length if stride is None else stride
    if len(ids) < 2:
        raise GptforgeError(f"the text is {len(ids)} token{'s' * (len(ids) != 1)} long; perplexity needs "
                            "at least two (the first token is context only)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise GptforgeError(f"batch_size must be a positive integer, got {batch_size!r}")
    windows = sliding_windows(len(ids), context_length, stride)
    device = next(model.parameters()).device
    all_ids = torch.as_tensor(list(ids), dtype=torch.long)
    was_training = model.training
    model.eval()
    nll_sum, scored = 0.0, 0
    # a bar for long texts, on a terminal only (a log or a pipe gets just the result)
    bar = progress_bar(progress and len(windows) > LONG_TEXT_WINDOWS and sys.stderr.isatty(), len(windows), 0,
                       unit="window")
    try:
        for batch in _batches(windows, batch_size):
            width = max(end - begin for begin, end, _ in batch)
            inputs = torch.zeros(len(batch), width, dtype=torch.long)
            targets = torch.full((len(batch), width), IGNORE, dtype=torch.long)
            for row, (begin, end, first) in enumerate(batch):
                inputs[row, :end - begin] = all_ids[begin:end]
                # logits at position p - 1 predict token p, for the window's scored tokens p
                targets[row, first - begin - 1:end - begin - 1] = all_ids[first:end]
            logits = model(inputs.to(device))  # (B, T, V)
            keep = targets != IGNORE  # (B, T)
            picked = logits[keep.to(device)].float()  # (N, V): only the scored positions, in fp32
            nll_sum += F.cross_entropy(picked, targets[keep].to(device), reduction="sum").double().item()
            scored += int(keep.sum())
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return nll_sum, scored


def perplexity(model: nn.Module, text: str | Sequence[str], *, stride: int | None = None, batch_size: int = 4,
               tokenizer: Tokenizer | None = None, progress: bool = False) -> Perplexity:
    """Loss, perplexity and bits per byte of `text` (or of several texts, each with its own windows,
    summed) under `model`, by the sliding window of Hugging Face's perplexity guide.

    stride: tokens between window starts, in [1, context_length] (default: the context length,
    disjoint windows); smaller strides give each token more context and cost more forward passes.
    batch_size: windows per forward pass. progress: a tqdm bar over the windows.
    """
    if not isinstance(getattr(model, "cfg", None), GPTConfig):
        raise GptforgeError(f"perplexity needs a gptforge GPTModel (load one with gptforge.load), got "
                            f"{type(model).__name__}")
    if not isinstance(text, str):
        if isinstance(text, bytes) or not isinstance(text, Sequence):
            raise GptforgeError(f"text must be a str or a list of str, got {type(text).__name__}")
        bad = [type(t).__name__ for t in text if not isinstance(t, str)]
        if bad:
            raise GptforgeError(f"text must be a str or a list of str, got a list holding a {bad[0]}")
        if not text:
            raise GptforgeError("no texts given")
        return Perplexity.combine([perplexity(model, t, stride=stride, batch_size=batch_size,
                                              tokenizer=tokenizer, progress=progress) for t in text])
    if not text:
        raise GptforgeError("the text is empty; perplexity needs at least two tokens")
    tokenizer = as_tokenizer(tokenizer)
    ids = tokenizer.encode(text)
    if max(ids) >= model.cfg.vocab_size:
        raise GptforgeError(f"the text has token ids up to {max(ids)}, outside the model's vocabulary of "
                            f"{model.cfg.vocab_size}; this model does not read GPT-2 text")
    nll_sum, tokens = token_nll(model, ids, stride=stride, batch_size=batch_size, progress=progress)
    return Perplexity.from_sums(nll_sum, tokens, len(text.encode("utf-8")))


# --------------------------------------------------------------------------- classifiers

@dataclasses.dataclass(frozen=True)
class ClassificationReport:
    """A classifier's scores on labelled examples. Per class (in `label_names` order): precision,
    recall, F1 (0.0 where undefined, as scikit-learn's zero_division=0) and support (true examples);
    `confusion[i][j]` counts examples of true class i predicted as class j."""

    label_names: tuple[str, ...]
    accuracy: float
    precision: tuple[float, ...]
    recall: tuple[float, ...]
    f1: tuple[float, ...]
    support: tuple[int, ...]
    confusion: tuple[tuple[int, ...], ...]

    @property
    def macro_f1(self) -> float:
        """The unweighted mean of the per-class F1 scores."""
        return sum(self.f1) / len(self.f1)

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "macro_f1": self.macro_f1, "examples": sum(self.support),
                "classes": {name: {"precision": p, "recall": r, "f1": f, "support": n}
                            for name, p, r, f, n in zip(self.label_names, self.precision, self.recall,
                                                        self.f1, self.support)},
                "confusion": {"labels": list(self.label_names), "matrix": [list(row) for row in self.confusion]}}

    def format(self) -> str:
        """A plain-text table: per-class scores, accuracy, then the confusion matrix."""
        width = max(12, *(len(n) for n in self.label_names))
        lines = [f"{'class':<{width}}  {'precision':>9}  {'recall':>9}  {'f1':>9}  {'support':>8}"]
        for name, p, r, f, n in zip(self.label_names, self.precision, self.recall, self.f1, self.support):
            lines.append(f"{name:<{width}}  {p:>9.4f}  {r:>9.4f}  {f:>9.4f}  {n:>8}")
        lines.append(f"{'accuracy':<{width}}  {self.accuracy:>9.4f}  ({sum(self.support)} examples, "
                     f"macro F1 {self.macro_f1:.4f})")
        lines.append("")
        lines.append("confusion matrix (rows: true, columns: predicted)")
        cell = max(6, *(len(n) for n in self.label_names))
        lines.append(f"{'':<{width}}  " + "  ".join(f"{n:>{cell}}" for n in self.label_names))
        for name, row in zip(self.label_names, self.confusion):
            lines.append(f"{name:<{width}}  " + "  ".join(f"{c:>{cell}}" for c in row))
        return "\n".join(lines)


def _label_indices(labels: Sequence[int | str], label_names: Sequence[str], what: str) -> list[int]:
    """Labels given as class indices or names -> indices; anything else is an error naming it, and
    so is a mix of the two (with labels named "0", "1"..., index 1 and name "1" differ)."""
    index = {name: i for i, name in enumerate(label_names)}
    kinds = {isinstance(label, str) for label in labels}
    if len(kinds) > 1:
        name = next(label for label in labels if isinstance(label, str))
        number = next(label for label in labels if not isinstance(label, str))
        raise GptforgeError(f"{what} labels mix class names ({name!r}) and indices ({number!r}); give one kind")
    out = []
    for label in labels:
        if isinstance(label, str):
            if label not in index:
                raise GptforgeError(f"{what} label {label!r} is not one of the classes {list(label_names)}")
            out.append(index[label])
        elif isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(label_names):
            raise GptforgeError(f"{what} label {label!r} is not a class index in [0, {len(label_names)})")
        else:
            out.append(label)
    return out


def classification_report(y_true: Sequence[int | str], y_pred: Sequence[int | str],
                          label_names: Sequence[str]) -> ClassificationReport:
    """Accuracy, per-class precision/recall/F1 and the confusion matrix of predictions `y_pred`
    against `y_true` (class indices or names from `label_names`, one per example; lists, or 1-D
    tensors or arrays)."""
    y_true, y_pred = (y.tolist() if hasattr(y, "tolist") else y for y in (y_true, y_pred))
    for name, value in (("y_true", y_true), ("y_pred", y_pred), ("label_names", label_names)):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):  # a str would be split into letters
            raise GptforgeError(f"{name} must be a list, got {type(value).__name__}")
    label_names = tuple(str(n) for n in label_names)
    if not label_names or len(set(label_names)) != len(label_names):
        raise GptforgeError(f"label_names must be distinct and not empty, got {list(label_names)}")
    if len(y_true) != len(y_pred) or not y_true:
        raise GptforgeError(f"need as many predictions as true labels, at least one (got {len(y_true)} "
                            f"true and {len(y_pred)} predicted)")
    true, pred = _label_indices(y_true, label_names, "true"), _label_indices(y_pred, label_names, "predicted")
    k = len(label_names)
    confusion = [[0] * k for _ in range(k)]
    for t, p in zip(true, pred):
        confusion[t][p] += 1
    hits = [confusion[i][i] for i in range(k)]
    support = [sum(row) for row in confusion]
    predicted = [sum(confusion[t][j] for t in range(k)) for j in range(k)]
    precision = [h / n if n else 0.0 for h, n in zip(hits, predicted)]
    recall = [h / n if n else 0.0 for h, n in zip(hits, support)]
    f1 = [2 * p * r / (p + r) if p + r else 0.0 for p, r in zip(precision, recall)]
    return ClassificationReport(label_names, sum(hits) / len(true), tuple(precision), tuple(recall), tuple(f1),
                                tuple(support), tuple(tuple(row) for row in confusion))


def evaluate_classifier(model: nn.Module, paths: str | Path | Sequence[str | Path], *, text_column: str = "text",
                        label_column: str = "label", batch_size: int = 16,
                        progress: bool = False) -> ClassificationReport:
    """The classification report of a classifier (from `gptforge finetune classify`) on labelled
    texts: CSV/TSV/JSONL/JSON file(s) with a text and a label column, all files as one test set.
    A label the model was not trained on is a GptforgeError naming it. progress: as `classify`'s."""
    from .classifier import classifier_spec, classify, label_ids, read_labeled

    spec = classifier_spec(model)
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    texts, true = [], []
    for path in paths:
        data = read_labeled(path, text_column, label_column)
        true += label_ids(data, spec.labels)  # checked for every file before any prediction
        texts += data.texts
    predicted = [p.label for p in classify(model, texts, batch_size=batch_size, progress=progress)]
    return classification_report(true, predicted, spec.labels)
