"""Text classification with a GPT model, as the book's chapter 6: labelled texts, padded batches,
the classification head, the loss and accuracy, and `classify()` for predictions.

The data follow the book's `SpamDataset`: texts are GPT-2 tokens padded with 50256 to the longest
training text (or cut to `max_length`); validation and test texts are padded or cut to the same
length. A batch is (ids (B, L), targets (B,), lengths (B,)); `lengths` are the real tokens, so the
default pooling can read the last real token, as Hugging Face's GPT2ForSequenceClassification does,
where the book reads the last position even when it is padding (`pool="last"`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import load, resolve_device
from .config import ClassifierSpec, GPTConfig
from .data import Loader
from .errors import GptforgeError
from .metrics import progress_bar
from .options import check_value
from .model import GPTModel
from .tables import find_column, json_type, read_table, text_field
from .tokenizer import ENDOFTEXT_ID, get_tokenizer

PAD_ID = ENDOFTEXT_ID  # the book pads with <|endoftext|>

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # ids (B, L), targets (B,), lengths (B,)


@dataclasses.dataclass
class LabeledTexts:
    """Texts and their label names, read from one file."""

    texts: list[str]
    labels: list[str]
    source: str


def read_labeled(path: str | Path, text_column: str = "text", label_column: str = "label") -> LabeledTexts:
    """The (text, label) records of a CSV/TSV/JSONL/JSON file. A missing column, an empty text or an
    empty label is a GptforgeError naming the file (and record)."""
    if text_column == label_column:  # the texts would be their own labels
        raise GptforgeError(f"--text-column and --label-column are both {text_column!r}; name two columns")
    rows = read_table(path)
    text_col = find_column(rows, text_column, path, "--text-column")
    label_col = find_column(rows, label_column, path, "--label-column")
    labels = [s.strip() for s in text_field(rows, label_col, path)]
    _check_label_spelling(rows, label_col, labels, path)
    return LabeledTexts(text_field(rows, text_col, path), labels, str(path))


def _check_label_spelling(rows: Sequence[dict], column: str, labels: Sequence[str], path: str | Path) -> None:
    """Refuse labels that a reader would take for one class and we for several: JSON values of
    different types (1, "1", true) or one number written two ways (1 and 1.0, "01" and "1")."""
    first_of_type: dict[str, int] = {}  # JSON type -> first record (1-based) holding one
    for number, row in enumerate(rows, 1):
        first_of_type.setdefault(json_type(row[column]), number)
    if len(first_of_type) > 1:
        examples = ", ".join(f"{kind} {json.dumps(rows[n - 1][column])} in record {n}"
                             for kind, n in first_of_type.items())
        raise GptforgeError(f"{path}: the labels in {column!r} mix JSON types ({examples}); they would become "
                            "separate classes: write every label the same way (all strings, say)")
    spelled: dict[float, str] = {}  # number -> the first label spelling it
    for label in dict.fromkeys(labels):
        try:
            value = float(label)
        except ValueError:
            continue
        if math.isfinite(value) and spelled.setdefault(value, label) != label:
            raise GptforgeError(f"{path}: the labels {spelled[value]!r} and {label!r} are one number written two "
                                "ways; they would become two classes: write each class one way")


def label_names(labels: Sequence[str]) -> tuple[str, ...]:
    """The distinct labels in class-id order: sorted, numerically when all are integers (so the
    book's 0/1 labels keep their ids). Fewer than two is a GptforgeError."""
    distinct = set(labels)
    if len(distinct) < 2:
        raise GptforgeError(f"the training data has {len(distinct)} distinct label(s) {sorted(distinct)}; "
                            "a classifier needs at least two")
    numeric = all(s.lstrip("-").isdigit() for s in distinct)
    return tuple(sorted(distinct, key=int if numeric else str))


def label_ids(data: LabeledTexts, names: Sequence[str]) -> list[int]:
    """Class ids of `data`'s labels; labels outside `names` (never seen in training) are a
    GptforgeError listing them."""
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(data.labels) - set(index))
    if unknown:
        raise GptforgeError(f"{data.source} has labels the model was not trained on: {unknown[:10]}; "
                            f"it knows {list(names)}")
    return [index[label] for label in data.labels]


@dataclasses.dataclass
class EncodedTexts:
    """Padded token ids (N, L) of N texts, their real lengths (N,) and class ids (N,) (or None)."""

    ids: torch.Tensor
    lengths: torch.Tensor
    targets: torch.Tensor | None

    def __len__(self) -> int:
        return self.ids.shape[0]

    def batch(self, indices: Sequence[int]) -> Batch:
        index = torch.as_tensor(indices, dtype=torch.long)
        targets = self.targets[index] if self.targets is not None else torch.full((len(indices),), -1)
        return self.ids[index], targets, self.lengths[index]


def longest(texts: Sequence[str]) -> int:
    """Tokens of the longest text (the book's `_longest_encoded_length`)."""
    return max(len(ids) for ids in get_tokenizer().encode_batch(list(texts)))


def encode_texts(texts: Sequence[str], max_length: int, targets: Sequence[int] | None = None) -> EncodedTexts:
    """Tokenize, cut to `max_length` and pad with 50256 to it, as the book's SpamDataset."""
    return pad_ids(get_tokenizer().encode_batch(list(texts)), max_length, targets)


def pad_ids(token_rows: Sequence[Sequence[int]], max_length: int, targets: Sequence[int] | None = None) -> EncodedTexts:
    """Token id lists cut to `max_length` and padded with 50256 to it."""
    rows = [list(ids[:max_length]) for ids in token_rows]
    ids = torch.full((len(rows), max_length), PAD_ID, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    lengths = torch.tensor([max(1, len(row)) for row in rows], dtype=torch.long)
    return EncodedTexts(ids, lengths, torch.tensor(list(targets), dtype=torch.long) if targets is not None else None)


def padded_length(train_texts: Sequence[str], max_length: int | None, context_length: int, source: str) -> int:
    """The padded length of every batch: `max_length`, or the longest training text (which must
    then fit the model's context)."""
    if max_length is not None:
        if not 0 < max_length <= context_length:
            raise GptforgeError(f"--max-length must be in [1, {context_length}] (the model's context), got {max_length}")
        return max_length
    length = longest(train_texts)
    if length > context_length:
        raise GptforgeError(f"{source}: the longest text has {length} tokens, more than the model's context of "
                            f"{context_length}; pass --max-length N (N <= {context_length}) to cut texts")
    return length


def to_classifier(model: GPTModel, labels: Sequence[str], pool: str = "last-real",
                  max_length: int | None = None) -> GPTModel:
    """Turn a language model into a classifier in place: its output head becomes
    Linear(emb_dim, len(labels)) (a new one, initialised from the current torch seed, as the
    book's `model.out_head = torch.nn.Linear(...)`), and its config records the labels."""
    spec = ClassifierSpec(tuple(labels), pool, max_length)
    p = model.tok_emb.weight
    model.out_head = nn.Linear(model.cfg.emb_dim, spec.num_classes).to(device=p.device, dtype=p.dtype)
    model.cfg = model.cfg.replace(classifier=spec, tie_weights=False)
    return model


def classifier_spec(model: nn.Module) -> ClassifierSpec:
    if not isinstance(getattr(model, "cfg", None), GPTConfig):
        raise GptforgeError(f"expected a gptforge classifier (a GPTModel from `gptforge finetune classify`) or its "
                            f"checkpoint path, got {type(model).__name__}")
    spec = model.cfg.classifier
    if spec is None:
        raise GptforgeError("this model is a language model, not a classifier; train one with "
                            "`gptforge finetune classify`")
    return spec


def class_logits(model: GPTModel, ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Class logits (B, C) of padded texts ids (B, L): the head's output at the last real token
    (lengths (B,) given and pool "last-real") or at the last position (pool "last", the book)."""
    logits = model(ids)  # (B, L, C)
    if lengths is None or classifier_spec(model).pool == "last":
        return logits[:, -1, :]
    rows = torch.arange(ids.shape[0], device=ids.device)
    return logits[rows, lengths.to(ids.device) - 1]  # (B, C)


def classification_loss(model: GPTModel, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy of a batch's class logits (the book's `calc_loss_batch`)."""
    ids, targets, lengths = batch
    device = model.tok_emb.weight.device
    return F.cross_entropy(class_logits(model, ids.to(device), lengths), targets.to(device))


@torch.no_grad()
def loader_metrics(model: GPTModel, loader: Loader, num_batches: int | None = None) -> tuple[float, float]:
    """(mean batch loss, accuracy) over the first `num_batches` batches, in one pass: the loss is
    the book's `calc_loss_loader`, the accuracy comes from the same logits."""
    if len(loader) == 0:
        return float("nan"), float("nan")
    n = len(loader) if not num_batches else min(num_batches, len(loader))
    total = 0.0
    correct = seen = 0
    device = model.tok_emb.weight.device
    for i, (ids, targets, lengths) in enumerate(loader):
        if i >= n:
            break
        logits = class_logits(model, ids.to(device), lengths)
        targets = targets.to(device)
        total += F.cross_entropy(logits, targets).item()
        correct += (logits.argmax(dim=-1) == targets).sum().item()
        seen += ids.shape[0]
    return total / n, correct / seen


@torch.no_grad()
def loader_accuracy(model: GPTModel, loader: Loader, num_batches: int | None = None) -> float:
    """Share of correct predictions over the first `num_batches` batches (the book's
    `calc_accuracy_loader`)."""
    n = len(loader) if not num_batches else min(num_batches, len(loader))
    correct = seen = 0
    device = model.tok_emb.weight.device
    for i, (ids, targets, lengths) in enumerate(loader):
        if i >= n:
            break
        predicted = class_logits(model, ids.to(device), lengths).argmax(dim=-1)
        correct += (predicted == targets.to(device)).sum().item()
        seen += ids.shape[0]
    return correct / seen if seen else float("nan")


@dataclasses.dataclass
class Prediction:
    """A predicted label and the probability of every label."""

    label: str
    probabilities: dict[str, float]


@torch.no_grad()
def classify(model: GPTModel | str | Path, texts: str | Sequence[str], *, batch_size: int = 16,
             device: str | torch.device | None = None, progress: bool = False) -> list[Prediction]:
    """Predict a label for each text with a classifier (a model or a checkpoint name/path).

    Texts are tokenized, cut to the model's context (or its training `max_length`) and, for the
    book's pool="last", padded to that length as in training. Returns one Prediction per text.
    progress: a bar over the texts on stderr, where it is a terminal and there are several batches."""
    if isinstance(model, (str, Path)):
        model = load(model, device=device or "cpu")
    spec = classifier_spec(model)
    if device is not None:
        model = model.to(resolve_device(device) if isinstance(device, str) else device)
    check_value("batch_size", batch_size, "int", minimum=1)
    if not isinstance(texts, (str, Sequence)) or isinstance(texts, bytes):
        raise GptforgeError(f"texts must be a str or a list of str, got {type(texts).__name__}")
    texts = [texts] if isinstance(texts, str) else list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise GptforgeError(f"text {i + 1} must be a str, got {type(text).__name__}")
        if not text.strip():
            raise GptforgeError(f"text {i + 1} is empty; give each text some words")
    model.eval()
    limit = min(spec.max_length or model.cfg.context_length, model.cfg.context_length)
    predictions = []
    bar = progress_bar(progress and len(texts) > batch_size and sys.stderr.isatty(), len(texts), 0, unit="text")
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        tokens = get_tokenizer().encode_batch(chunk)
        length = limit if spec.pool == "last" else min(limit, max(len(t) for t in tokens))
        data = pad_ids(tokens, length)
        device_now = model.tok_emb.weight.device
        probs = class_logits(model, data.ids.to(device_now), data.lengths).float().softmax(dim=-1).cpu()
        for row in probs:
            predictions.append(Prediction(spec.labels[int(row.argmax())],
                                          {name: float(p) for name, p in zip(spec.labels, row)}))
        bar.update(len(chunk))
    bar.close()
    return predictions
