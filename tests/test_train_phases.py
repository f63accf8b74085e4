"""The training phases driven by a caller's own model, batches, loss and evaluation (what the
finetuning verbs build on), and the initialisation every from-scratch preset starts from."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from gptforge.config import PRESETS, preset
from gptforge.model import GPTModel
from gptforge.train import TrainConfig, fit, start_run


def _classifier(tiny_config) -> GPTModel:
    """A tiny GPT with a 2-class head; only the last block, the final norm and the head train (the book's ch06 recipe)."""
    torch.manual_seed(0)
    model = GPTModel(tiny_config(drop_rate=0.0))
    model.out_head = torch.nn.Linear(model.cfg.emb_dim, 2)
    for p in model.parameters():
        p.requires_grad = False
    for module in (model.trf_blocks[-1], model.final_norm, model.out_head):
        for p in module.parameters():
            p.requires_grad = True
    return model


def _last_token_loss(model, batch):
    x, labels = batch
    return F.cross_entropy(model(x)[:, -1, :], labels)


def test_phases_train_a_custom_head_with_frozen_parameters_untouched(tiny_config, tmp_path):
    model = _classifier(tiny_config)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 97, (8, 16), generator=gen)
    labels = (x[:, -1] % 2)  # learnable from the last token alone
    batches = [(x[:4], labels[:4]), (x[4:], labels[4:])]
    saved = []

    def save_model(m, directory, training_state):
        saved.append((directory, training_state["step"], sorted(training_state)))

    @torch.no_grad()
    def accuracy(run):
        logits = run.model(x)[:, -1, :]
        return {"val_loss": F.cross_entropy(logits, labels).item(),
                "val_accuracy": (logits.argmax(-1) == labels).float().mean().item()}

    cfg = TrainConfig(out=str(tmp_path), lr=1e-2, schedule="constant", eval_every=2, progress=False,
                      precision="fp32", checkpoint_every=0, device="cpu")
    run = start_run(cfg, model, total_steps=6, save_model=save_model)
    result = fit(run, lambda run: [batches[run.step % 2]], _last_token_loss, accuracy, lambda: {"position": 7})

    assert result.steps == 6 and not result.interrupted
    for name, before in frozen.items():
        assert torch.equal(dict(model.named_parameters())[name], before), name
        assert dict(model.named_parameters())[name].grad is None
    assert any(not torch.equal(dict(model.named_parameters())[n], b) for n, b in trainable.items())
    optimized = {id(p) for g in run.optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}
    assert set(run.optimizer.state) == {p for p in model.parameters() if p.requires_grad}

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4, 5]
    assert all(0 <= r["val_accuracy"] <= 1 for r in evals)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert [r["tokens_seen"] for r in records if r["kind"] == "train"] == [64 * (i + 1) for i in range(6)]
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert saved == [(tmp_path / "checkpoint", 6, sorted(saved[0][2]))]
    assert {"position", "optimizer", "rng", "step", "tokens_seen"} <= set(saved[0][2])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_from_scratch_presets_start_near_uniform_loss(name):
    """GPT-2's init (gpt2-*) and the book's (book-124m) both start at ~ln(vocab): logits near zero.
    A gpt2-* preset with PyTorch's default init and its tied N(0, 1) embedding starts at ~200."""
    cfg = preset(name)
    if name not in ("gpt2-124m", "book-124m"):
        cfg = cfg.replace(n_layers=2)  # the width and the init are the preset's; depth only costs time
    torch.manual_seed(0)
    model = GPTModel(cfg.replace(drop_rate=0.0)).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = model(x[:, :-1], targets=x[:, 1:]).item()
    assert abs(loss - math.log(cfg.vocab_size)) < 0.5, loss
    if name == "book-124m":
        assert cfg.init == "torch"  # the book's init: the seed's exact figures
        assert model.tok_emb.weight.std().item() == pytest.approx(1.0, rel=0.05)
    else:
        assert cfg.init == "gpt2"
        assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)
