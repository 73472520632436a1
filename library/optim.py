"""Optimizers (by sd-scripts' `--optimizer_type` names) and learning-rate schedules (diffusers' get_scheduler)."""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping

import torch
from diffusers.optimization import get_scheduler

from library.errors import UserInputError


def _literal(value: str):
    """'0.9' -> 0.9, '(0.9,0.99)' -> (0.9, 0.99), 'True' -> True; anything else stays a string."""
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


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
