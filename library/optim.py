"""Optimizers (by sd-scripts' `--optimizer_type` names) and learning-rate schedules (diffusers' get_scheduler)."""

from __future__ import annotations

import ast
import importlib
import math
from collections.abc import Mapping

import torch

from library.errors import UserInputError


def _literal(value: str):
    """'0.9' -> 0.9, '(0.9,0.99)' -> (0.9, 0.99), 'True' -> True; anything else stays a string."""
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


ADAPTIVE_OPTIMIZERS = {
    "prodigy": ("prodigyopt", "Prodigy"),
    "dadaptation": ("dadaptation", "DAdaptAdam"),
    "dadaptadam": ("dadaptation", "DAdaptAdam"),
    "dadaptlion": ("dadaptation", "DAdaptLion"),
    "dadaptadagrad": ("dadaptation", "DAdaptAdaGrad"),
    "dadaptadan": ("dadaptation", "DAdaptAdan"),
    "dadaptsgd": ("dadaptation", "DAdaptSGD"),
}
"""Optimizers that estimate one step size for all parameter groups (`--optimizer_type`, lower-cased)."""


def is_adaptive(optimizer_type: str) -> bool:
    return optimizer_type.lower() in ADAPTIVE_OPTIMIZERS


def per_group_lr_problem(optimizer_type: str, group_lrs: Mapping[str, float]) -> str | None:
    """Why `optimizer_type` cannot run these group learning rates, or None when it can.

    Prodigy and the D-Adaptation family estimate one step size (d) for the whole model and accept per-group
    learning rates only when they are equal or 0 - otherwise they raise at the first step. LoRA+ needs B's
    rate to differ from A's, so the combination is refused at start-up instead.
    """
    if not is_adaptive(optimizer_type):
        return None
    nonzero = {name: lr for name, lr in group_lrs.items() if lr != 0}
    if len(set(nonzero.values())) <= 1:
        return None
    listed = ", ".join(f"{name} {lr:g}" for name, lr in nonzero.items())
    return (
        f"--optimizer_type {optimizer_type} estimates one step size for all parameter groups and cannot take "
        f"different learning rates per group ({listed}); for LoRA+ use AdamW, AdamW8bit or Lion, or drop the "
        f"LoRA+ ratios / block lr weights and give the UNet and text encoders the same learning rate"
    )


def build_optimizer(
    optimizer_type: str, param_groups: list[dict], learning_rate: float, optimizer_args: Mapping[str, str]
) -> torch.optim.Optimizer:
    """An optimizer over LoRA parameter groups that keep their own learning rates."""
    kwargs = {key: _literal(value) for key, value in optimizer_args.items()}
    name = optimizer_type.lower()
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=learning_rate, **kwargs)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(param_groups, lr=learning_rate, **kwargs)
    if name == "lion":
        from lion_pytorch import Lion

        return Lion(param_groups, lr=learning_rate, **kwargs)
    if name in ADAPTIVE_OPTIMIZERS:
        problem = per_group_lr_problem(optimizer_type, {str(i): g["lr"] for i, g in enumerate(param_groups)})
        if problem:
            raise UserInputError(problem)
        module_name, class_name = ADAPTIVE_OPTIMIZERS[name]
        optimizer_class = getattr(importlib.import_module(module_name), class_name)
        return optimizer_class(param_groups, lr=learning_rate, **kwargs)
    raise UserInputError(f"--optimizer_type: unknown optimizer {optimizer_type}")


def warmup_steps(lr_warmup_steps: float, total_steps: int) -> int:
    """sd-scripts: a value below 1 is a ratio of the total steps."""
    if 0 < lr_warmup_steps < 1:
        return int(lr_warmup_steps * total_steps)
    return int(lr_warmup_steps)


def build_lr_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    warmup: int,
    num_cycles: int,
    power: float,
) -> torch.optim.lr_scheduler.LRScheduler:
    """diffusers' schedule by name; every group's lr follows the same curve from its own base lr."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=total_steps,
        num_cycles=num_cycles,
        power=power,
    )


def total_training_steps(
    max_train_steps: int, max_train_epochs: int | None, batches_per_epoch: int, gradient_accumulation_steps: int
) -> int:
    """Optimizer steps of the run: `--max_train_epochs` overrides `--max_train_steps`."""
    if max_train_epochs is None:
        return max_train_steps
    return max_train_epochs * math.ceil(batches_per_epoch / gradient_accumulation_steps)
