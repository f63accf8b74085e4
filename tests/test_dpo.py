"""`gptforge finetune dpo` and `gptforge.dpo_loss` against TRL's DPOTrainer on the Hugging Face
export of the same model and data (losses, rewards, margins, sequence log-probabilities); a
preference learned end to end; LoRA's reference; stop and resume; the verb's bad inputs."""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import pytest
import torch

from gptforge import GPTModel, dpo_loss, load, save
from gptforge.cli import main
from gptforge.dpo import PreferenceData, finetune_dpo, read_preferences, sequence_logprobs
from gptforge.instruct import ALPACA, respond
from gptforge.lora import apply_lora

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "preference-sample.json"
STEP_KEYS = {"loss": "loss", "chosen_reward": "rewards/chosen", "rejected_reward": "rewards/rejected",
             "reward_margin": "rewards/margins", "reward_accuracy": "rewards/accuracies"}


def _records(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture
def tiny_base(tmp_path, tiny_config):
    torch.manual_seed(0)
    return save(GPTModel(tiny_config(vocab_size=50257, context_length=128)), tmp_path / "base")


# --------------------------------------------------------------------------- against TRL and transformers

def test_steps_equal_trls_dpo_trainer_and_logprobs_equal_transformers(tmp_path, tiny_config):
    """The same tiny model (gptforge checkpoint and its HF export), 8 records, one batch of 8 per
    step, 3 steps, beta 0.1, constant lr, no weight decay, no clipping, no dropout: every step's
    loss, mean rewards, margin and reward accuracy equal TRL's; the sequence log-probabilities of
    chosen and rejected equal those computed from transformers' logits on the export."""
    trl = pytest.importorskip("trl")
    transformers = pytest.importorskip("transformers")
    datasets = pytest.importorskip("datasets")
    torch.manual_seed(0)
    base = GPTModel(tiny_config(vocab_size=50257, context_length=128))
    save(base, tmp_path / "base")
    save(base, tmp_path / "hf", format="hf")
    records = read_preferences(SAMPLE)[:8]
    (tmp_path / "prefs.json").write_text(json.dumps(records))
    steps, lr, beta = 3, 1e-3, 0.1

    finetune_dpo(data=str(tmp_path / "prefs.json"), model=str(tmp_path / "base"), out=str(tmp_path / "ours"),
                 batch_size=8, epochs=steps, lr=lr, weight_decay=0.0, beta=beta, eval_every=0, device="cpu",
                 progress=False)
    ours = _records(tmp_path / "ours", "train")

    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    dataset = datasets.Dataset.from_list([{"prompt": ALPACA.prompt(r["instruction"], r["input"]),
                                           "chosen": r["chosen"], "rejected": r["rejected"]} for r in records])
    losses = []

    class RecordingTrainer(trl.DPOTrainer):  # the loss each step minimises, unrounded
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            losses.append(loss.item())
            return loss

    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=8, num_train_epochs=steps,
                         learning_rate=lr, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
                         beta=beta, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                         max_length=None, disable_tqdm=True, dataloader_num_workers=0,
                         bf16=False, gradient_checkpointing=False)  # TRL's defaults: bf16 autocast, recomputation
    trainer = RecordingTrainer(model=hf, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    theirs = [h for h in trainer.state.log_history if "rewards/chosen" in h]
    assert len(ours) == len(theirs) == len(losses) == steps
    for step, (mine, trls, trl_loss) in enumerate(zip(ours, theirs, losses)):
        assert mine["loss"] == pytest.approx(trl_loss, abs=1e-5), step
        for key, trl_key in list(STEP_KEYS.items())[1:]:
            assert mine[key] == pytest.approx(trls[trl_key], abs=1e-5), (step, key)
    assert ours[-1]["reward_margin"] > 0.1  # the steps moved the model: the comparison is not of zeros

    # Sequence log-probabilities: ours against transformers' logits on the export (before training).
    data = PreferenceData(records, 128)
    inputs, targets = data.pairs(range(8))
    reference = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        logits = reference(inputs, attention_mask=(targets != -100) | (inputs != 50256)).logits
        token_logps = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        expected = (token_logps * (targets != -100)).sum(1)
        got = sequence_logprobs(load(tmp_path / "base").eval(), inputs, targets)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-4)
    assert theirs[0]["logps/chosen"] == pytest.approx(got[:8].mean().item(), abs=1e-4)
    assert theirs[0]["logps/rejected"] == pytest.approx(got[8:].mean().item(), abs=1e-4)


def test_prompt_tokens_are_masked_and_each_response_ends_with_the_end_token():
    records = [{"instruction": "Name a colour.", "input": "", "chosen": "Blue.", "rejected": "No idea at all."}]
    data = PreferenceData(records, 1024)
    inputs, targets = data.pairs([0])
    prompt = data.prompt_lengths[0]
    for row, response in ((0, "Blue."), (1, "No idea at all.")):
        counted = targets[row][targets[row] != -100].tolist()
        from gptforge.tokenizer import get_tokenizer
        assert get_tokenizer().decode(counted) == response + "<|endoftext|>"
        assert inputs[row, :prompt].tolist() == get_tokenizer().encode(ALPACA.prompt("Name a colour."))


# --------------------------------------------------------------------------- the loss in Python, LoRA's reference

def test_dpo_loss_on_a_lora_model_uses_the_base_without_adapters_as_reference(tiny_config):
    torch.manual_seed(0)
    base = GPTModel(tiny_config(vocab_size=50257, context_length=128)).eval()
    policy = GPTModel(base.cfg).eval()
    policy.load_state_dict(base.state_dict())
    apply_lora(policy, rank=2, alpha=4.0)
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:  # a trained adapter: the policy differs from its base
                p.normal_(0, 0.05)
    batch = PreferenceData(read_preferences(SAMPLE)[:4], 128).pairs(range(4))
    implicit = dpo_loss(policy, batch, beta=0.1)
    explicit = dpo_loss(policy, batch, beta=0.1, reference=base)
    torch.testing.assert_close(implicit.loss, explicit.loss)
    torch.testing.assert_close(implicit.chosen_rewards, explicit.chosen_rewards)
    assert implicit.chosen_rewards.abs().max() > 1e-3  # the adapters changed the policy
    implicit.loss.backward()  # the gradient reaches the adapters only
    assert all((p.grad is not None) == p.requires_grad for p in policy.parameters())
    same = dpo_loss(base, batch, beta=0.1, reference=base)  # policy == reference: loss log 2, rewards 0
    assert same.loss.item() == pytest.approx(0.6931472, abs=1e-6)
    with pytest.raises(Exception, match="needs a reference"):
        dpo_loss(base, batch)


# --------------------------------------------------------------------------- end to end

WORDS = ("apple river stone cloud tiger lamp garden window rocket violin candle forest pencil harbor "
         "mirror planet basket ladder island button").split()
ANSWERS = ("yes", "no", "maybe", "never")


def _question(rng: random.Random) -> str:
    return f"Is the {rng.choice(WORDS)} near the {rng.choice(WORDS)}?"


def _yes_records(n: int, rng: random.Random) -> list[dict]:
    """Questions; the chosen answer is always 'yes', the rejected one another of ANSWERS."""
    return [{"instruction": _question(rng), "input": "", "chosen": "yes", "rejected": rng.choice(ANSWERS[1:])}
            for _ in range(n)]


def test_a_preference_is_learned_end_to_end(tmp_path, tiny_base, capsys):
    """The recipe on a random tiny model: instruction finetuning on questions answered at random
    with one of ANSWERS, then DPO on pairs whose chosen answer is always 'yes'. Validation reward
    accuracy goes from 0 (policy = reference) to 100%, and the greedy answer to new questions
    becomes 'yes' (the instruction-tuned model's is not)."""
    rng = random.Random(0)
    sft = [{"instruction": _question(rng), "input": "", "output": rng.choice(ANSWERS)} for _ in range(64)]
    (tmp_path / "sft.json").write_text(json.dumps(sft))
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _yes_records(32, rng)))
    val = _yes_records(16, rng)
    with open(tmp_path / "val.csv", "w", newline="") as f:  # CSV reads as well
        import csv
        writer = csv.DictWriter(f, fieldnames=["instruction", "input", "chosen", "rejected"])
        writer.writeheader()
        writer.writerows(val)
    assert main(["finetune", "instruct", "--data", str(tmp_path / "sft.json"), "--model", str(tiny_base),
                 "--out", str(tmp_path / "sft"), "--lr", "3e-3", "--eval-every", "0", "--no-progress"]) == 0
    out = tmp_path / "run"
    assert main(["finetune", "dpo", "--data", str(tmp_path / "train.jsonl"), "--val", str(tmp_path / "val.csv"),
                 "--model", str(tmp_path / "sft" / "checkpoint"), "--out", str(out), "--epochs", "2", "--lr", "1e-3",
                 "--beta", "0.5", "--eval-every", "4", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "done after 8 steps; val loss" in printed and "reward accuracy 100.0%" in printed, printed
    steps = _records(out, "train")
    assert steps[0]["reward_accuracy"] == 0.0 and steps[0]["loss"] == pytest.approx(0.6931472)  # policy == reference
    assert steps[-1]["reward_accuracy"] == 1.0
    evals = [r for r in _records(out, "eval") if "val_reward_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 4]
    assert evals[-1]["val_reward_accuracy"] == 1.0 and evals[-1]["val_reward_margin"] > evals[0]["val_reward_margin"]
    final = _records(out, "final")[0]
    assert final["val_reward_accuracy"] == 1.0 and final["val_loss"] < 0.3
    assert (out / "loss.png").exists()

    tuned = load(out / "checkpoint")
    assert tuned.cfg.prompt_template == ALPACA
    before = respond(load(tmp_path / "sft" / "checkpoint"), val, max_new_tokens=4)
    after = respond(tuned, val, max_new_tokens=4)
    assert before.count("yes") < 8, before
    assert after.count("yes") >= 14, after


# --------------------------------------------------------------------------- stop and resume

def test_a_stopped_run_resumed_equals_the_uninterrupted_run(tmp_path, tiny_base, capsys):
    records = read_preferences(SAMPLE)
    (tmp_path / "train.json").write_text(json.dumps(records[:16]))
    (tmp_path / "val.json").write_text(json.dumps(records[16:20]))
    opts = dict(data=str(tmp_path / "train.json"), val=str(tmp_path / "val.json"), model=str(tiny_base),
                batch_size=4, epochs=2, eval_every=3, eval_batches=1, lr=1e-3, device="cpu", progress=False)
    full = finetune_dpo(out=str(tmp_path / "a"), **opts)
    assert full.steps == 8 and not full.interrupted

    def ctrl_c(record):
        if record["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    part = finetune_dpo(out=str(tmp_path / "b"), on_step=ctrl_c, **opts)
    assert part.interrupted and part.steps == 3 and part.final == {}
    assert "continue with `gptforge finetune dpo --resume --out" in capsys.readouterr().out
    assert main(["finetune", "dpo", "--out", str(tmp_path / "b"), "--resume", "--no-progress"]) == 0
    assert "done after 8 steps" in capsys.readouterr().out
    for kind in ("train", "eval", "final"):
        strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs]  # noqa: E731
        assert strip(_records(tmp_path / "b", kind)) == strip(_records(tmp_path / "a", kind)), kind
    wa, wb = load(tmp_path / "a" / "checkpoint").state_dict(), load(tmp_path / "b" / "checkpoint").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_lora_run_saves_an_adapter_and_learns(tmp_path, tiny_base):
    rng = random.Random(1)
    (tmp_path / "train.json").write_text(json.dumps(_yes_records(16, rng)))
    result = finetune_dpo(data=str(tmp_path / "train.json"), val_fraction=0.25, model=str(tiny_base),
                          out=str(tmp_path / "run"), lora_rank=4, lr=1e-3, beta=0.5, batch_size=4, epochs=3,
                          eval_every=0, device="cpu", progress=False)
    steps = _records(tmp_path / "run", "train")
    assert steps[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)  # B = 0: the policy starts as its reference
    assert result.final["val_reward_accuracy"] == 1.0
    config = json.loads((result.checkpoint / "config.json").read_text())
    assert "lora" in config  # an adapter checkpoint naming its base


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("records, extra, message", [
    ([{"instruction": "a", "chosen": "b"}] * 8, [], "record 1 has no 'rejected' string"),
    ([{"instruction": "a", "rejected": "b"}] * 8, [], "record 1 has no 'chosen' string"),
    ([{"instruction": "a", "chosen": "b", "rejected": "c"}, {"instruction": "a", "chosen": "b", "rejected": "b"}], [],
     "record 2: 'chosen' and 'rejected' are the same text"),
    ([{"instruction": "word " * 200, "chosen": "b", "rejected": "c"}] * 8, [],
     "its prompt is 231 tokens, longer than the model's context of 128"),
    ([{"instruction": "a", "chosen": "word " * 200, "rejected": "c"}] * 8, [], "pass --max-length N"),
    ([{"instruction": "a", "chosen": "b", "rejected": "c"}] * 3, [], "fewer than one batch of 8"),
    ([{"instruction": "a", "chosen": "b", "rejected": "c"}] * 8, ["--val-fraction", "0.2", "--val", "x.json"],
     "give --val or --val-fraction, not both"),
    ([{"instruction": "a", "chosen": "b", "rejected": "c"}] * 8, ["--beta", "0"], "argument --beta: expected a number > 0"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, tiny_base, capsys, records, extra, message):
    data = tmp_path / "prefs.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "run"
    code = main(["finetune", "dpo", "--data", str(data), "--model", str(tiny_base), "--out", str(out),
                 "--no-progress", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_a_classifier_model_is_refused(tmp_path, tiny_config, capsys):
    from gptforge.classifier import to_classifier

    torch.manual_seed(0)
    classifier = save(to_classifier(GPTModel(tiny_config(vocab_size=50257, context_length=128)), ["a", "b"],
                                    pool="last-real", max_length=20), tmp_path / "clf")
    out = tmp_path / "run"
    assert main(["finetune", "dpo", "--data", str(SAMPLE), "--model", str(classifier), "--out", str(out),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a classifier" in err and "not a language model" in err, err
    assert not out.exists()
