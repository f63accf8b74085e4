"""`gptforge finetune instruct` against the book's chapter-7 training (llms-from-scratch): the same
records, weights and seed give the losses of `train_model_simple` with `custom_collate_fn` step for
step; then the saved model, its template and the test responses; and the verb's bad inputs."""

from __future__ import annotations

import functools
import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch

from gptforge import GPTModel, load, save
from gptforge.cli import main
from gptforge.finetune import finetune_instruct
from gptforge.instruct import ALPACA, read_records
from gptforge.tokenizer import get_tokenizer

ch07 = pytest.importorskip("llms_from_scratch.ch07")
ch05 = pytest.importorskip("llms_from_scratch.ch05")
ch04 = pytest.importorskip("llms_from_scratch.ch04")
appendix_e = pytest.importorskip("llms_from_scratch.appendix_e")

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "instruct-sample.json"
BATCH, EPOCHS, EVAL_EVERY, EVAL_BATCHES = 4, 2, 3, 2


def splits(tmp_path):
    records = read_records(SAMPLE)
    parts = {"train": records[:20], "val": records[20:25], "test": records[25:]}
    for name, part in parts.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(part))
    return parts


def exercise_collate(batch, allowed_max_length=None):
    """The book's exercise 7.2 solution: custom_collate_fn, then the prompt's targets ignored."""
    lengths, items = zip(*batch)
    inputs, targets = ch07.custom_collate_fn(list(items), allowed_max_length=None)
    for row, length in enumerate(lengths):
        targets[row, :length - 1] = -100
    if allowed_max_length is not None:
        inputs, targets = inputs[:, :allowed_max_length], targets[:, :allowed_max_length]
    return inputs, targets


def book_run(parts, weights, cfg, mask_prompt, max_length, lora_rank=None):
    """The book's chapter-7 cells: loaders, AdamW(lr 5e-5, wd 0.1), train_model_simple. Returns the
    loss of every training step (recorded around calc_loss_batch) and the evaluations."""
    enc = get_tokenizer().encoding
    torch.manual_seed(123)
    model = ch04.GPTModel(cfg)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all(k.endswith("att.mask") for k in missing)
    if lora_rank:  # appendix E: freeze, seed, replace every Linear (the output head included)
        for p in model.parameters():
            p.requires_grad = False
        torch.manual_seed(123)
        appendix_e.replace_linear_with_lora(model, rank=lora_rank, alpha=16)

    def dataset(records):
        data = ch07.InstructionDataset(records, enc)
        if not mask_prompt:
            return data
        return [(len(enc.encode(ch07.format_input(r))), ids) for r, ids in zip(records, data.encoded_texts)]

    collate = (functools.partial(exercise_collate, allowed_max_length=max_length) if mask_prompt else
               functools.partial(ch07.custom_collate_fn, allowed_max_length=max_length))
    loader = functools.partial(torch.utils.data.DataLoader, batch_size=BATCH, collate_fn=collate, num_workers=0)
    torch.manual_seed(123)
    train_loader = loader(dataset(parts["train"]), shuffle=True, drop_last=True)
    val_loader = loader(dataset(parts["val"]), shuffle=False, drop_last=False)
    torch.manual_seed(123)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)
    steps = []
    original = ch05.calc_loss_batch

    def recording(*args, **kwargs):
        loss = original(*args, **kwargs)
        if torch.is_grad_enabled():
            steps.append(loss.item())
        return loss

    ch05.calc_loss_batch = recording
    try:
        train_losses, val_losses, _ = ch05.train_model_simple(
            model, train_loader, val_loader, optimizer, "cpu", num_epochs=EPOCHS, eval_freq=EVAL_EVERY,
            eval_iter=EVAL_BATCHES, start_context=ch07.format_input(parts["val"][0]), tokenizer=enc)
    finally:
        ch05.calc_loss_batch = original
    return steps, train_losses, val_losses, model


@pytest.mark.parametrize("mask_prompt, max_length, lora_rank", [(False, None, None), (True, 48, None), (False, None, 2)],
                         ids=["book", "mask-prompt", "lora"])
def test_losses_equal_the_books_train_model_simple(tmp_path, tiny_config, mask_prompt, max_length, lora_rank, capsys):
    from gptforge.finetune import finetune_instruct

    parts = splits(tmp_path)
    cfg = tiny_config(vocab_size=50257, context_length=128)
    torch.manual_seed(0)
    base = GPTModel(cfg)
    save(base, tmp_path / "base")
    steps, train_losses, val_losses, book_model = book_run(parts, base.state_dict(), cfg, mask_prompt, max_length,
                                                           lora_rank)
    lora = {"lora_rank": lora_rank} if lora_rank else {}

    result = finetune_instruct(data=str(tmp_path / "train.json"), val=str(tmp_path / "val.json"),
                               test=str(tmp_path / "test.json"), model=str(tmp_path / "base"),
                               out=str(tmp_path / "run"), batch_size=BATCH, epochs=EPOCHS,
                               eval_every=EVAL_EVERY, eval_batches=EVAL_BATCHES, mask_prompt=mask_prompt,
                               max_length=max_length, max_new_tokens=8, progress=False, **lora)
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ours = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(ours) == len(steps) == EPOCHS * (20 // BATCH)
    assert ours == pytest.approx(steps, abs=1e-5)
    evals = [r for r in records if r["kind"] == "eval" and "train_loss" in r]
    assert [r["train_loss"] for r in evals] == pytest.approx(train_losses, abs=1e-5)
    assert [r["val_loss"] for r in evals] == pytest.approx(val_losses, abs=1e-5)

    # The saved model is the book's trained model, with the template; the test responses are its own.
    model = load(result.checkpoint)
    assert model.cfg.prompt_template == ALPACA
    x = torch.randint(0, 50257, (2, 20))
    torch.testing.assert_close(model(x), book_model.eval()(x), atol=1e-5, rtol=1e-5)
    written = json.loads(result.responses.read_text())
    assert [r["instruction"] for r in written] == [r["instruction"] for r in parts["test"]]
    assert [r["model_response"] for r in written] == [book_response(book_model, r) for r in parts["test"]]


def book_response(model, record, max_new_tokens=8):
    """The book's `generate(..., eos_id=50256)` after the prompt with its response header, cut at
    the next section and stripped (the book's `response_text`)."""
    enc = get_tokenizer()
    ids = enc.encode(ALPACA.prompt(record["instruction"], record["input"]))
    out = ch05.generate(model.eval(), torch.tensor([ids]), max_new_tokens, context_size=128, eos_id=50256)
    text = enc.decode(out[0, len(ids):].tolist())
    return text.split("###")[0].strip()


@pytest.fixture
def tiny_base(tmp_path, tiny_config):
    torch.manual_seed(0)
    return save(GPTModel(tiny_config(vocab_size=50257, context_length=128)), tmp_path / "base")


def test_cli_finetune_instruct_splits_the_data_and_saves_the_template(tmp_path, tiny_base, capsys):
    out = tmp_path / "run"
    assert main(["finetune", "instruct", "--data", str(SAMPLE), "--test-fraction", "0.1", "--val-fraction", "0.1",
                 "--model", str(tiny_base), "--out", str(out), "--epochs", "1", "--max-new-tokens", "4",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "done after 3 steps; train loss" in printed and "test responses" in printed
    # the epoch's sample is on its step's line, not under an empty one ("step 2 (epoch 1): ")
    assert re.search(r"^step 2 \(epoch 1\) sample: ", printed, re.M), printed
    assert not re.search(r"^step \d+ \(epoch \d+\):\s*$", printed, re.M), printed
    records = read_records(SAMPLE)
    written = json.loads((out / "test-responses.json").read_text())
    assert [r["output"] for r in written] == [r["output"] for r in records[24:27]]  # the book's order: train, test, val
    assert all(isinstance(r["model_response"], str) for r in written)
    assert load(out / "checkpoint").cfg.prompt_template == ALPACA


@pytest.mark.parametrize("content, extra, message", [
    ('[{"input": "x", "output": "y"}]', [], "record 1 has no 'instruction'"),
    ("", [], "is empty"),
    (json.dumps([{"instruction": "word " * 200, "output": "x"}] * 8), [], "pass --max-length"),
    (json.dumps([{"instruction": "a", "output": "b"}] * 3), [], "fewer than one batch of 8"),
    (json.dumps([{"instruction": "a", "output": "b"}] * 8), ["--max-length", "500"], "--max-length 500 must be"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, tiny_base, capsys, content, extra, message):
    data = tmp_path / "train.json"
    data.write_text(content)
    code = main(["finetune", "instruct", "--data", str(data), "--model", str(tiny_base), "--out",
                 str(tmp_path / "run"), "--no-progress", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err


def _train_records(out):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["epoch"], r["loss"]) for r in map(json.loads, lines) if r["kind"] == "train"]


def test_a_stopped_run_resumed_on_the_command_line_equals_the_uninterrupted_run(tmp_path, tiny_base, capsys):
    """A real SIGINT after step 3 (of 2 epochs of 5), then `gptforge finetune instruct --out B
    --resume` with no other flag: the losses, evaluations, test responses and weights are the
    uninterrupted run's; resuming again (finished) or where nothing was saved is one line, exit 2."""
    splits(tmp_path)
    opts = dict(data=str(tmp_path / "train.json"), val=str(tmp_path / "val.json"), test=str(tmp_path / "test.json"),
                model=str(tiny_base), batch_size=BATCH, epochs=EPOCHS, eval_every=EVAL_EVERY,
                eval_batches=EVAL_BATCHES, lr=1e-3, drop_rate=0.1, max_new_tokens=4, device="cpu", progress=False)
    full = finetune_instruct(out=str(tmp_path / "a"), **opts)
    assert not full.interrupted and full.steps == 10

    def ctrl_c(record):
        if record["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    b = tmp_path / "b"
    part = finetune_instruct(out=str(b), on_step=ctrl_c, **opts)
    assert part.interrupted and part.steps == 4
    assert part.responses is None and not (b / "test-responses.json").exists()  # answered when it finishes
    assert "continue with `gptforge finetune instruct --resume --out" in capsys.readouterr().out
    assert main(["finetune", "classify", "--out", str(b), "--resume"]) == 2  # the other verb's stopped run
    assert "is a `finetune instruct` run; resume it with `gptforge finetune instruct" in capsys.readouterr().err
    assert main(["finetune", "instruct", "--out", str(b), "--resume", "--no-progress"]) == 0
    assert "done after 10 steps" in capsys.readouterr().out

    assert _train_records(b) == _train_records(tmp_path / "a") and len(_train_records(b)) == 10
    evals = [[r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
             for out in (tmp_path / "a", b)]
    assert evals[0] == evals[1]
    assert (b / "test-responses.json").read_text() == (tmp_path / "a" / "test-responses.json").read_text()
    wa, wb = load(full.checkpoint).state_dict(), load(b / "checkpoint").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    finished = "finished; nothing to resume"
    for out, message in ((b, finished), (tmp_path / "c", "nothing to resume in")):
        assert main(["finetune", "instruct", "--out", str(out), "--resume", "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
