"""`finetune classify` against the book: on the same small data, weights and seed, the train/val
losses and the accuracies equal llms_from_scratch.ch06's `train_classifier_simple` step for step
(1e-5), with the book's recipe (last block + final norm + head) and with appendix E's LoRA."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
import torch.nn as nn

from classify_data import write_splits
from gptforge.checkpoint import load, load_training_state, save
from gptforge.errors import GptforgeError
from gptforge.finetune import finetune_classify
from gptforge.model import GPTModel
from gptforge.tokenizer import gpt2_encoding

ch04 = pytest.importorskip("llms_from_scratch.ch04")
ch06 = pytest.importorskip("llms_from_scratch.ch06")
appendix_e = pytest.importorskip("llms_from_scratch.appendix_e")

EPOCHS, EVAL_EVERY, EVAL_BATCHES, LR = 2, 2, 2, 1e-3  # a larger lr than the book's: the weights move visibly


def _base(tiny_config, tmp_path):
    """A book-shaped tiny model (the book's code takes the same dict), saved as our checkpoint."""
    cfg = tiny_config(vocab_size=50257, context_length=64, qkv_bias=False)
    torch.manual_seed(0)
    book = ch04.GPTModel(cfg)
    ours = GPTModel(cfg)
    ours.load_state_dict({k: v for k, v in book.state_dict().items() if not k.endswith(".att.mask")})
    save(ours, tmp_path / "base")
    return cfg, book


def _book_run(book, splits, lora: bool):
    """The book's chapter 6 (and appendix E) script, its seeds and order kept."""
    tok = gpt2_encoding()  # tiktoken's gpt2, built offline
    train_ds = ch06.SpamDataset(splits["train"], tok)
    val_ds = ch06.SpamDataset(splits["val"], tok, max_length=train_ds.max_length)
    test_ds = ch06.SpamDataset(splits["test"], tok, max_length=train_ds.max_length)
    torch.manual_seed(123)
    train_loader = torch.utils.data.DataLoader(train_ds, batch_size=8, shuffle=True, drop_last=True)
    val_loader = torch.utils.data.DataLoader(val_ds, batch_size=8)
    test_loader = torch.utils.data.DataLoader(test_ds, batch_size=8)
    book.eval()
    for p in book.parameters():
        p.requires_grad = False
    torch.manual_seed(123)
    book.out_head = nn.Linear(book.final_norm.scale.shape[0], 2)
    if lora:
        for p in book.parameters():
            p.requires_grad = False
        appendix_e.replace_linear_with_lora(book, rank=4, alpha=8)
    else:
        for p in list(book.trf_blocks[-1].parameters()) + list(book.final_norm.parameters()):
            p.requires_grad = True
    trainable = sum(p.numel() for p in book.parameters() if p.requires_grad)
    torch.manual_seed(123)
    optimizer = torch.optim.AdamW(book.parameters(), lr=LR, weight_decay=0.1)
    losses = ch06.train_classifier_simple(book, train_loader, val_loader, optimizer, "cpu", EPOCHS,
                                          EVAL_EVERY, EVAL_BATCHES)
    test_acc = ch06.calc_accuracy_loader(test_loader, book, "cpu")
    return losses, test_acc, trainable


@pytest.mark.parametrize("lora", [False, True], ids=["last-block", "lora"])
def test_losses_and_accuracies_equal_train_classifier_simple(tiny_config, tmp_path, lora):
    splits = write_splits(tmp_path)
    cfg, book = _base(tiny_config, tmp_path)
    (train_losses, val_losses, train_accs, val_accs, _), book_test_acc, book_trainable = _book_run(book, splits, lora)

    lora_flags = {"lora_rank": 4, "lora_alpha": 8} if lora else {}
    result = finetune_classify(
        data=str(splits["train"]), val=str(splits["val"]), test=str(splits["test"]), model=str(tmp_path / "base"),
        out=str(tmp_path / "run"), pool="last", epochs=EPOCHS, eval_every=EVAL_EVERY, eval_batches=EVAL_BATCHES,
        lr=LR, device="cpu", precision="fp32", progress=False, **lora_flags)
    step_evals = [r for r in result.history if "train_loss" in r]
    epoch_evals = [r for r in result.history if "epoch_train_acc" in r]
    assert [r["step"] for r in step_evals] == [0, 2, 4, 6, 8]
    assert [r["train_loss"] for r in step_evals] == pytest.approx(train_losses, abs=1e-5)
    assert [r["val_loss"] for r in step_evals] == pytest.approx(val_losses, abs=1e-5)
    assert [r["epoch_train_acc"] for r in epoch_evals] == pytest.approx(train_accs, abs=1e-5)
    assert [r["epoch_val_acc"] for r in epoch_evals] == pytest.approx(val_accs, abs=1e-5)
    assert result.test_accuracy == pytest.approx(book_test_acc, abs=1e-5)
    assert result.trainable_parameters == book_trainable
    assert train_losses[0] != pytest.approx(train_losses[-1], abs=1e-3)  # the run did move

    # The saved classifier predicts what the trained book model predicts.
    model = load(result.checkpoint)
    assert model.cfg.classifier.labels == ("0", "1")
    x = torch.randint(0, 50257, (3, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:, -1], book.eval()(x)[:, -1], atol=1e-5, rtol=0)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "train" for r in metrics) == EPOCHS * 5


def _records(out, kind):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.mark.parametrize("trainable, stop_at", [("last-block", 2), ("lora", 4)], ids=["mid-epoch", "lora-epoch-end"])
def test_a_stopped_run_resumed_equals_the_uninterrupted_run(tiny_config, tmp_path, trainable, stop_at):
    """Ctrl-C (a real SIGINT) after step `stop_at`, then `resume=True` with no other option: every
    step's loss, every evaluation and the final weights equal a run that was never stopped (dropout
    on, evaluations drawing from the global RNG, the shuffled order across an epoch boundary)."""
    splits = write_splits(tmp_path)
    _base(tiny_config, tmp_path)
    opts = dict(data=str(splits["train"]), val=str(splits["val"]), test=str(splits["test"]),
                model=str(tmp_path / "base"), pool="last", epochs=EPOCHS, eval_every=3, eval_batches=EVAL_BATCHES,
                lr=LR, drop_rate=0.1, trainable=trainable, device="cpu", precision="fp32", progress=False)
    full = finetune_classify(out=str(tmp_path / "a"), **opts)
    assert not full.interrupted and full.steps == EPOCHS * 5
    assert load_training_state(full.checkpoint) is None  # finished: the model only

    def ctrl_c(record):
        if record["step"] == stop_at:
            os.kill(os.getpid(), signal.SIGINT)  # the real handler: finish the step, save, stop

    part = finetune_classify(out=str(tmp_path / "b"), on_step=ctrl_c, **opts)
    assert part.interrupted and part.steps == stop_at + 1
    # stopped: it ends at once, without the final passes over all the data (for a finished run)
    assert (part.train_accuracy, part.val_accuracy, part.test_accuracy) == (None, None, None)
    position = load_training_state(tmp_path / "b" / "checkpoint")["position"]
    assert (position["epoch"], position["batch"]) == (0, stop_at + 1)  # 5 batches an epoch: 5 is its end
    with pytest.raises(GptforgeError, match="--lr cannot change on --resume"):
        finetune_classify(out=str(tmp_path / "b"), resume=True, lr=1.0)
    rest = finetune_classify(out=str(tmp_path / "b"), resume=True, progress=False)
    assert not rest.interrupted and rest.steps == full.steps

    a, b = tmp_path / "a", tmp_path / "b"
    assert [r["step"] for r in _records(b, "train")] == list(range(full.steps))
    assert _records(a, "train") == _records(b, "train")
    assert _records(a, "eval") == _records(b, "eval") and rest.history == full.history
    assert (rest.train_accuracy, rest.val_accuracy, rest.test_accuracy) == \
        (full.train_accuracy, full.val_accuracy, full.test_accuracy)
    wa, wb = load(full.checkpoint).state_dict(), load(rest.checkpoint).state_dict()
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    with pytest.raises(GptforgeError, match=r"finished; nothing to resume"):
        finetune_classify(out=str(b), resume=True)
    with pytest.raises(GptforgeError, match="nothing to resume in .*no checkpoint/ there"):
        finetune_classify(out=str(tmp_path / "c"), resume=True)
    with pytest.raises(GptforgeError, match="already holds a run .*continue it with `gptforge finetune classify"):
        finetune_classify(out=str(a), **opts)
