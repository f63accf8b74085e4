"""Preference tuning by direct preference optimization (DPO: Rafailov et al. 2023, "Direct
Preference Optimization: Your Language Model is Secretly a Reward Model"), as the book's bonus
material does it (llms-from-scratch ch07/04): `gptforge finetune dpo` and `dpo_loss`.

A record is `{"instruction", "input" (optional), "chosen", "rejected"}`: two responses to one
prompt, the first preferred. The prompt is the instruct template's (`PromptTemplate.prompt`, the
model's own when it has one); prompt + response is tokenized as one text, as `finetune instruct`
trains, and ends with <|endoftext|>. A sequence's log-probability is the sum over its response
tokens (the end token included): the prompt's tokens (as many as the prompt alone encodes to) are
masked out.

For a pair (x, chosen, rejected), the policy pi (the model that trains) and the frozen reference
pi_ref (the model training started from):

    reward(y) = beta * (log pi(y|x) - log pi_ref(y|x))
    loss      = -log sigmoid(reward(chosen) - reward(rejected))          (mean over the pairs)

Each step logs its loss and mean chosen/rejected rewards, margin and reward accuracy (the share of
pairs whose chosen reward is higher); each evaluation the same on train and validation batches.

The reference never changes, so its log-probabilities are computed once, before the first step
(with LoRA: the model with its adapters switched off), and kept beside the records: no second copy
of the model is held, and the reference costs one forward pass over the data, not one per step. A
stopped run saves them with its training state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import PromptTemplate, check_language_model
from .data import Loader
from .errors import GptforgeError
from .finetune import (
    FinetuneOptions, book_loop, earlier_evaluations, load_for_finetuning, model_config, resolve_config,
    restore_weights, save_finetune,
)
from .instruct import ALPACA, IGNORE_INDEX, collate, respond
from .lora import adapters_disabled, apply_lora, count_trainable, has_lora
from .options import option
from .runtime import StopRequest, autocast_context
from .tables import read_table
from .tokenizer import Tokenizer, as_tokenizer
from .train import EvalFn, Run, start_run

PREFERENCE_FIELDS = ("instruction", "chosen", "rejected")
METRICS = ("loss", "chosen_reward", "rejected_reward", "reward_margin", "reward_accuracy")


# --------------------------------------------------------------------------- the loss

@dataclasses.dataclass
class DPOLoss:
    """The DPO loss of a batch of B pairs: `loss` (scalar, mean over the pairs, differentiable) and
    each pair's `chosen_rewards` and `rejected_rewards` ((B,), nats scaled by beta, detached)."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    def metrics(self) -> dict[str, float]:
        """Means over the pairs: chosen_reward, rejected_reward, reward_margin (chosen - rejected)
        and reward_accuracy (share of pairs whose chosen reward is higher)."""
        c, r = self.chosen_rewards.float(), self.rejected_rewards.float()
        return {"chosen_reward": c.mean().item(), "rejected_reward": r.mean().item(),
                "reward_margin": (c - r).mean().item(), "reward_accuracy": (c > r).float().mean().item()}


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
                    reference_rejected: torch.Tensor, beta: float = 0.1) -> DPOLoss:
    """The DPO loss from sequence log-probabilities, each (B,) (nats): the paper's equation 7,
    -log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r))), averaged over the B pairs."""
    logits = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    return DPOLoss(loss=-F.logsigmoid(beta * logits).mean(),
                   chosen_rewards=(beta * (policy_chosen - reference_chosen)).detach(),
                   rejected_rewards=(beta * (policy_rejected - reference_rejected)).detach())


def sequence_logprobs(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each row's log-probability of its targets: inputs and targets (N, T) ids as `instruct.collate`
    makes them (targets = inputs shifted by one; -100 where a position does not count). Returns
    (N,) float32, the sum of log p(target | the tokens before) over the counted positions."""
    logits = model(inputs)  # (N, T, V)
    token_losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="none")  # (N*T,), 0 where ignored
    return -token_losses.view(targets.shape).sum(dim=1)


@torch.no_grad()
def _frozen_logprobs(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sequence_logprobs as a reference computes them: eval mode (no dropout), no gradient."""
    was_training = model.training
    model.eval()
    try:
        return sequence_logprobs(model, inputs, targets)
    finally:
        model.train(was_training)


def dpo_loss(model: nn.Module, batch: Sequence[torch.Tensor], *, beta: float = 0.1,
             reference: nn.Module | torch.Tensor | None = None) -> DPOLoss:
    """The DPO loss of `model` (any GPTModel, LoRA or not) on a batch of B preference pairs.

    batch: (inputs, targets) of 2B rows, the B chosen sequences then the B rejected ones, as
        `PreferenceData.pairs` makes them; or (inputs, targets, reference_logps (2B,)) as
        `PreferenceData.batch` makes them once the reference is computed.
    reference: the frozen reference, as a model (run in eval mode without gradients) or its (2B,)
        log-probabilities; None: batch's third tensor, else, for a model with LoRA, the same model
        with its adapters switched off (no second copy).
    Returns a DPOLoss: the loss to minimise and each pair's rewards."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
        raise GptforgeError(f"beta must be a number > 0, got {beta!r}")
    inputs, targets = batch[0], batch[1]
    if inputs.dim() != 2 or inputs.shape != targets.shape or inputs.shape[0] % 2:
        raise GptforgeError(f"a DPO batch is (inputs, targets) of the same (2B, T) shape, chosen rows then "
                            f"rejected rows; got {tuple(inputs.shape)} and {tuple(targets.shape)}")
    pairs = inputs.shape[0] // 2
    policy = sequence_logprobs(model, inputs, targets)
    if isinstance(reference, torch.Tensor):
        ref = reference
    elif isinstance(reference, nn.Module):
        ref = _frozen_logprobs(reference, inputs, targets)
    elif len(batch) > 2:
        ref = batch[2]
    elif has_lora(model):
        with adapters_disabled(model):
            ref = _frozen_logprobs(model, inputs, targets)
    else:
        raise GptforgeError("dpo_loss needs a reference: a frozen model, its log-probabilities, or a model with "
                            "LoRA adapters (its base is the reference)")
    ref = ref.to(policy.device, policy.dtype)
    return preference_loss(policy[:pairs], policy[pairs:], ref[:pairs], ref[pairs:], beta)


# --------------------------------------------------------------------------- the data

def check_preferences(records: Sequence[Any], source: str = "data") -> list[dict[str, str]]:
    """Records with strings `instruction`, `chosen` and `rejected` (and optional `input`, default
    ""), chosen different from rejected. Raises GptforgeError naming the first bad record (1-based)."""
    if not records:
        raise GptforgeError(f"{source} holds no records")
    out = []
    for n, rec in enumerate(records, 1):
        if not isinstance(rec, Mapping):
            raise GptforgeError(f"{source} record {n} is a {type(rec).__name__}, expected an object with named fields")
        for key in PREFERENCE_FIELDS:
            if not isinstance(rec.get(key), str):
                raise GptforgeError(f"{source} record {n} has no {key!r} string; every record needs 'instruction', "
                                    "'chosen' and 'rejected' ('input' is optional)")
        if not isinstance(rec.get("input", ""), (str, type(None))):
            raise GptforgeError(f"{source} record {n}: 'input' must be a string")
        if rec["chosen"] == rec["rejected"]:
            raise GptforgeError(f"{source} record {n}: 'chosen' and 'rejected' are the same text; a preference "
                                "needs two different responses")
        out.append({**rec, "input": rec.get("input") or ""})
    return out


def read_preferences(path: str | Path) -> list[dict[str, str]]:
    """Preference records (see `check_preferences`) from a file `tables.read_table` reads: a JSON
    list or JSONL whatever the suffix, or a .csv/.tsv with those columns."""
    return check_preferences(read_table(path, other_suffixes_as_json=True), str(path))


class PreferenceData:
    """Tokenized preference records, ready for batching.

    Each record becomes two sequences, prompt + chosen and prompt + rejected, the prompt's tokens
    masked out. `pairs(indices)` -> (inputs, targets), (2B, T) each as `instruct.collate` makes
    them (the B chosen rows, then the B rejected ones); `batch(indices)` adds the (2B,) reference
    log-probabilities once `reference` ((N, 2): chosen, rejected) is set.

    context_length: the model's; a sequence longer than it is an error unless `max_length` cuts it.
    max_length: cut every sequence to this many tokens (at most context_length); a prompt must
        still leave room for a response token.
    """

    def __init__(self, records: Sequence[Mapping[str, str]], context_length: int, *,
                 max_length: int | None = None, template: PromptTemplate = ALPACA,
                 tokenizer: Tokenizer | None = None, source: str = "data"):
        tokenizer = as_tokenizer(tokenizer)
        if max_length is not None and not 1 <= max_length <= context_length:
            raise GptforgeError(f"--max-length {max_length} must be between 1 and the model's context length "
                                f"{context_length}")
        self.records = list(records)
        self.max_length = max_length
        limit = max_length or context_length
        limit_name = f"--max-length {max_length}" if max_length else f"the model's context of {context_length}"
        self.prompt_lengths, self.chosen, self.rejected = [], [], []
        for n, r in enumerate(self.records, 1):
            text = template.prompt(r["instruction"], r.get("input") or "")
            prompt = tokenizer.encode(text)
            if len(prompt) > limit:
                raise GptforgeError(f"{source} record {n}: its prompt is {len(prompt)} tokens, longer than "
                                    f"{limit_name}, so no response token would count; shorten its instruction "
                                    "or input")
            self.prompt_lengths.append(len(prompt))
            # prompt and response as one text, as `finetune instruct` trained on them (and TRL reads them)
            self.chosen.append(tokenizer.encode(text + r["chosen"]))
            self.rejected.append(tokenizer.encode(text + r["rejected"]))
            longest = max(len(self.chosen[-1]), len(self.rejected[-1]))
            if max_length is None and longest > context_length:
                raise GptforgeError(f"{source} record {n} is {longest} tokens with its longer response, more than "
                                    f"the model's context of {context_length}; pass --max-length N "
                                    f"(<= {context_length}) to cut responses, or shorten the record")
        self.reference: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.records)

    def pairs(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of these records' chosen then rejected sequences, each (2B, T) int64."""
        indices = list(indices)
        items = [self.chosen[i] for i in indices] + [self.rejected[i] for i in indices]
        lengths = [self.prompt_lengths[i] for i in indices] * 2
        return collate(items, lengths, allowed_max_length=self.max_length)

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, ...]:
        """pairs(indices), and (2B,) float32 reference log-probabilities when `reference` is set."""
        indices = list(indices)
        inputs, targets = self.pairs(indices)
        if self.reference is None:
            return inputs, targets
        return inputs, targets, torch.cat([self.reference[indices, 0], self.reference[indices, 1]])


@torch.no_grad()
def reference_logprobs(model: nn.Module, data: PreferenceData, batch_size: int = 8, *,
                       device: torch.device | str = "cpu", autocast: torch.dtype | None = None) -> torch.Tensor:
    """(len(data), 2) float32: each record's chosen and rejected log-probabilities under `model` as
    it is now, in eval mode and, with LoRA, with its adapters switched off: the DPO reference."""
    out = torch.empty(len(data), 2)
    with adapters_disabled(model):
        for start in range(0, len(data), batch_size):
            indices = list(range(start, min(start + batch_size, len(data))))
            inputs, targets = data.pairs(indices)
            with autocast_context(torch.device(device), autocast):
                logps = _frozen_logprobs(model, inputs.to(device), targets.to(device)).float().cpu()
            out[indices, 0], out[indices, 1] = logps[:len(indices)], logps[len(indices):]
    return out


# --------------------------------------------------------------------------- the verb

@dataclasses.dataclass
class DPOConfig(FinetuneOptions):
    """A preference tuning run (DPO, the book's ch07/04 recipe); the flags of `gptforge finetune dpo`."""

    data: str | None = option(None, "training records: JSON, JSONL or CSV of {instruction, input, chosen, rejected}")
    val: str | None = option(None, "validation records (loss, rewards and reward accuracy every --eval-every steps)")
    val_fraction: float = option(0.0, "hold back this share of --data as validation records", minimum=0, maximum=0.9)
    out: str = option("runs/dpo", "output folder: checkpoint/, metrics.jsonl, loss.png")
    beta: float = option(0.1, "DPO's beta: how far the policy may move from the reference (the book: 0.1)", above=0)
    max_length: int | None = option(None, "cut every prompt + response to this many tokens (default: each must "
                                    "fit the context)", minimum=1)
    trainable: str = option("all", "what trains: all (the book), or lora (adapters only; the reference is the "
                            "base without them)", choices=("all", "lora"))
    epochs: int = option(1, "passes over the training records (the book: 1)", minimum=1)
    lr: float = option(5e-6, "AdamW learning rate, constant (the book: 5e-6)", above=0)
    weight_decay: float = option(0.01, "AdamW weight decay, on every trainable parameter (the book: 0.01)",
                                 minimum=0)
    eval_every: int = option(5, "loss, rewards, margin and reward accuracy on train/val batches every this many "
                             "steps (0: never)", minimum=0)


@dataclasses.dataclass
class DPOResult:
    """What a preference run did: the checkpoint (with the prompt template), the steps, the final
    validation metrics over every validation record (val_loss, val_chosen_reward,
    val_rejected_reward, val_reward_margin, val_reward_accuracy; empty without validation records
    or when the run was stopped) and the evaluation records."""

    checkpoint: Path
    steps: int
    final: dict[str, float]
    history: list[dict[str, Any]]
    interrupted: bool = False


def _split(cfg: DPOConfig) -> tuple[list[dict], list[dict] | None]:
    """(train, val) records: --val, or the last --val-fraction of --data held back."""
    if not cfg.data:
        raise GptforgeError("no training data: pass --data FILE (JSON, JSONL or CSV preference records)")
    if cfg.val and cfg.val_fraction:
        raise GptforgeError("give --val or --val-fraction, not both")
    records = read_preferences(cfg.data)
    n_val = int(len(records) * cfg.val_fraction)
    train, val = records[:len(records) - n_val], records[len(records) - n_val:] if n_val else None
    if cfg.val:
        val = read_preferences(cfg.val)
    return train, val


@torch.no_grad()
def loader_metrics(run: Run, loader: Loader, beta: float, num_batches: int | None = None) -> dict[str, float]:
    """Loss, rewards, margin and reward accuracy (METRICS) over the first `num_batches` batches (all
    when None): the mean of each batch's means, as the book's `compute_dpo_loss_loader`."""
    n = min(num_batches or len(loader), len(loader))
    totals = dict.fromkeys(METRICS, 0.0)
    for i, batch in enumerate(loader):
        if i == n:
            break
        with autocast_context(run.device, run.autocast):
            out = dpo_loss(run.raw_model, [t.to(run.device) for t in batch], beta=beta)
        for k, v in {"loss": out.loss.item(), **out.metrics()}.items():
            totals[k] += v / n
    return totals


def _evaluator(cfg: DPOConfig, train: Loader, val: Loader | None) -> EvalFn:
    def evaluate(run: Run) -> dict[str, Any]:
        metrics = {}
        for name, loader in (("train", train), ("val", val)):
            if loader is not None:
                metrics.update({f"{name}_{k}": v for k, v in
                                loader_metrics(run, loader, cfg.beta, cfg.eval_batches or None).items()})
        return metrics
    return evaluate


def _sampler(record: Mapping[str, str], template: PromptTemplate) -> EvalFn:
    """A greedy response to one record after each epoch, as the book's DPO loop prints."""
    def sample(run: Run) -> dict[str, Any]:
        return {"sample": respond(run.raw_model, [record], template=template, max_new_tokens=50)[0]}
    return sample


def finetune_dpo(config: DPOConfig | None = None, /, *,
                 on_step: Callable[[dict[str, Any]], None] | None = None, **options: Any) -> DPOResult:
    """Tune a model on preferences with DPO; the Python twin of `gptforge finetune dpo`.

    `finetune_dpo(data="prefs.json", val_fraction=0.1, model="runs/instruct/checkpoint",
    out="runs/dpo")`; options are DPOConfig's fields. Writes OUT/checkpoint (with the prompt
    template in its config; with LoRA an adapter checkpoint naming its base), OUT/metrics.jsonl
    (each step: loss and its batch's rewards; each evaluation: train_/val_ loss, chosen_reward,
    rejected_reward, reward_margin, reward_accuracy) and OUT/loss.png.
    `finetune_dpo(out="runs/dpo", resume=True)` continues a stopped run exactly.
    on_step: called with each step's metrics record (after the update)."""
    cfg, saved = resolve_config(DPOConfig, "dpo", config, options)
    base_cfg = model_config(cfg)
    check_language_model(base_cfg, cfg.model)  # preferences are between texts
    template = base_cfg.prompt_template or ALPACA
    train, val = _split(cfg)
    context = base_cfg.context_length
    train_data = PreferenceData(train, context, max_length=cfg.max_length, template=template, source=cfg.data)
    val_data = None if val is None else PreferenceData(val, context, max_length=cfg.max_length, template=template,
                                                       source=cfg.val or "validation records")
    loader = Loader(train_data, cfg.batch_size, shuffle=True, drop_last=True)
    if len(loader) == 0:
        raise GptforgeError(f"{len(train)} training records are fewer than one batch of {cfg.batch_size}; "
                            "lower --batch-size or add records")
    val_loader = Loader(val_data, cfg.batch_size) if val_data is not None else None
    model = load_for_finetuning(cfg)
    model.cfg = model.cfg.replace(prompt_template=template)
    if cfg.trainable == "lora":  # as appendix E: seed, then the adapters (apply_lora freezes the rest)
        torch.manual_seed(cfg.seed)
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_scaling)
    if saved is not None:
        restore_weights(model, cfg.out)
    trainable, total = count_trainable(model)
    torch.manual_seed(cfg.seed)  # as the book, before the optimizer and loop (a resumed run: its saved RNG)
    with StopRequest() as stop:
        run = start_run(cfg.train_config(), model, cfg.epochs * len(loader), saved_state=saved, stop=stop,
                        on_step=on_step)
        run.progress.write(f"trainable parameters: {trainable:,} of {total:,} ({cfg.trainable})")
        datasets = [d for d in (train_data, val_data) if d is not None]
        if saved is not None:
            reference = saved["reference_logps"]
        else:  # the model as it starts: what the policy is compared with at every step
            reference = torch.cat([reference_logprobs(run.raw_model, d, cfg.batch_size, device=run.device,
                                                      autocast=run.autocast) for d in datasets])
        first = 0
        for d in datasets:
            d.reference, first = reference[first:first + len(d)], first + len(d)

        def step_loss(model: nn.Module, batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
            out = dpo_loss(model, batch, beta=cfg.beta)
            return out.loss, out.metrics()

        position = dict(saved["position"]) if saved is not None else {}
        history = earlier_evaluations(run) if saved is not None else []
        history += book_loop(run, loader, step_loss, _evaluator(cfg, loader, val_loader), cfg.eval_every,
                             cfg.epochs, _sampler((val or train)[0], template), position)
        run.progress.close()
        model = run.raw_model.eval()
        ckpt = save_finetune(run, cfg, "dpo", position, {"reference_logps": reference})
    final = {}
    if val_loader is not None and not run.interrupted:  # a stopped run ends now
        final = {f"val_{k}": v for k, v in loader_metrics(run, val_loader, cfg.beta).items()}
        run.metrics.log({"kind": "final", "step": run.step, **final})
    run.metrics.plot(force=True)
    return DPOResult(ckpt, run.step, final, history, run.interrupted)
