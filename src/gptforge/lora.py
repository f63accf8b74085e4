"""LoRA, as the book's appendix E writes it: `LoRALayer`, `LinearWithLoRA`, and the functions that
put them into a model, count what trains, and merge them back into plain Linear layers.

`LoRALayer` holds A (in_dim, rank), initialised like a Linear weight (kaiming_uniform with
a=sqrt(5)), and B (rank, out_dim), zeros, so a fresh adapter changes nothing. Its output is
`scale * (x @ A @ B)`, where the scale is `alpha` (the book, the default here) or `alpha / rank`
(peft, litgpt and the LoRA paper: changing the rank then does not change the step size).

`apply_lora(model, rank, alpha)` freezes every parameter of the model and wraps each targeted
`nn.Linear` (by default every one, the output head included, as the book's
`replace_linear_with_lora`); only the A and B matrices then train.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn

from .errors import GptforgeError

SCALINGS = ("book", "peft")
DEFAULT_SCALING = "book"
ALL_TARGETS = "all"


class LoRALayer(nn.Module):
    """The low-rank update `scale * (x @ A @ B)`: x (..., in_dim) -> (..., out_dim).

    scaling "book" uses scale = alpha (the book's appendix E); "peft" uses alpha / rank."""

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float, scaling: str = DEFAULT_SCALING):
        super().__init__()
        check_lora_options(rank, alpha, scaling)
        self.A = nn.Parameter(torch.empty(in_dim, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as a Linear weight, like the book
        self.B = nn.Parameter(torch.zeros(rank, out_dim))
        self.alpha = alpha
        self.rank = rank
        self.scaling = scaling
        self.scale = alpha if scaling == "book" else alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.A.dtype:
            return self.scale * (x @ self.A @ self.B)
        return (self.scale * (x.to(self.A.dtype) @ self.A @ self.B)).to(x.dtype)  # fp32 adapters on a bf16 base

    def delta_weight(self) -> torch.Tensor:
        """The update as a Linear weight: (out_dim, in_dim), so that x @ delta.T == forward(x)."""
        return self.scale * (self.A @ self.B).T


class LinearWithLoRA(nn.Module):
    """A frozen `nn.Linear` plus a trainable `LoRALayer`: linear(x) + lora(x)."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, scaling: str = DEFAULT_SCALING):
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha, scaling)
        self.enabled = True  # False: the base layer alone (`adapters_disabled`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.linear(x)
        return self.linear(x) + self.lora(x)

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped layer's (frozen) weight, for code that reads `layer.weight`."""
        return self.linear.weight

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing the same function (weight + the LoRA update)."""
        lin = self.linear
        # skip_init: no random initialisation, so merging (also inside generate) draws nothing from
        # the global RNG, which a training run's batch order and dropout depend on.
        out = torch.nn.utils.skip_init(nn.Linear, lin.in_features, lin.out_features, bias=lin.bias is not None,
                                       device=lin.weight.device, dtype=lin.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(lin.weight + self.lora.delta_weight().to(lin.weight.dtype))
            if lin.bias is not None:
                out.bias.copy_(lin.bias)
        out.weight.requires_grad_(lin.weight.requires_grad)
        return out


def check_lora_options(rank: int, alpha: float, scaling: str) -> None:
    """Raise GptforgeError for a rank < 1, a non-finite alpha or an unknown scaling."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise GptforgeError(f"--lora-rank must be an integer >= 1, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise GptforgeError(f"--lora-alpha must be a finite number, got {alpha!r}")
    if scaling not in SCALINGS:
        raise GptforgeError(f"--lora-scaling must be one of {', '.join(SCALINGS)}, got {scaling!r}")


def parse_targets(targets: str | Sequence[str] | None) -> tuple[str, ...]:
    """`--lora-targets` as a tuple of names: "all" (default), or comma-separated module names or
    dotted paths (e.g. "W_query,W_value", "att", "trf_blocks.11", "out_head")."""
    if targets is None:
        return (ALL_TARGETS,)
    parts = targets.split(",") if isinstance(targets, str) else list(targets)
    names = tuple(p.strip() for p in parts if p.strip())
    if not names:
        raise GptforgeError("--lora-targets is empty; use 'all' or names like W_query,W_value")
    return names


def _targeted(name: str, targets: tuple[str, ...]) -> bool:
    """Whether the module at dotted path `name` is named by a target (a whole path component
    sequence: 'att' matches trf_blocks.0.att.W_query, 'W_q' matches nothing)."""
    if ALL_TARGETS in targets:
        return True
    padded = f".{name}."
    return any(f".{t}." in padded for t in targets)


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: str | Sequence[str] | None = None,
               scaling: str = DEFAULT_SCALING) -> list[str]:
    """Freeze every parameter of `model` and wrap each targeted nn.Linear in a LinearWithLoRA, in
    place, visiting modules in the book's order (so a torch seed gives the book's A matrices).
    Returns the dotted names of the wrapped layers; none matching `targets` is a GptforgeError."""
    check_lora_options(rank, alpha, scaling)
    names = parse_targets(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped: list[str] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():  # the book's recursion order
            path = f"{prefix}{child_name}"
            if isinstance(child, nn.Linear) and _targeted(path, names):
                setattr(module, child_name, LinearWithLoRA(child, rank, alpha, scaling).to(child.weight.device))
                wrapped.append(path)
            elif not isinstance(child, LinearWithLoRA):
                visit(child, path + ".")

    visit(model, "")
    if not wrapped:
        raise GptforgeError(f"--lora-targets {','.join(names)} names no Linear layer of the model; "
                            "use 'all' or names like W_query, W_value, ff, out_head")
    return wrapped


def lora_layers(model: nn.Module) -> dict[str, LinearWithLoRA]:
    """The model's LinearWithLoRA modules by dotted name (empty for a plain model)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LinearWithLoRA)}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LinearWithLoRA) for m in model.modules())


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, `model` computes as its base without the adapters (every LinearWithLoRA
    gives its wrapped layer's output alone): the frozen reference of preference tuning, with no
    second copy of the weights."""
    layers = list(lora_layers(model).values())
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.enabled = True


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LinearWithLoRA by a plain nn.Linear with the update added to its weight, in
    place; returns the model, whose outputs are unchanged (up to float rounding)."""
    shared = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if ".linear." not in name}
    for name, layer in lora_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.merged())
        cfg = getattr(model, "cfg", None)
        if id(layer.linear.weight) in shared and getattr(cfg, "tie_weights", False):
            model.cfg = cfg.replace(tie_weights=False)  # a tied head plus its update is a head of its own
    return model


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) distinct parameters; shared tensors (a tied head) are counted once."""
    trainable = total = 0
    for p in model.parameters():  # parameters() yields a shared tensor once
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total
