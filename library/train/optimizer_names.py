"""sd-scripts' names for `--optimizer_type` and `--lr_scheduler` (no torch import: the CLI lists them in --help)."""

from __future__ import annotations

from library.errors import UserInputError

ADAPTIVE_OPTIMIZER_TYPES: tuple[str, ...] = (
    "Prodigy", "DAdaptation", "DAdaptAdamPreprint", "DAdaptAdam", "DAdaptLion", "DAdaptAdaGrad", "DAdaptAdan",
    "DAdaptAdanIP", "DAdaptSGD",
)
"""Optimizers that estimate one step size for all parameter groups (they cannot take LoRA+ ratios)."""

OPTIMIZER_TYPES: tuple[str, ...] = (
    "AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit", "Lion", "Lion8bit", "PagedLion8bit",
    "SGDNesterov", "SGDNesterov8bit", "AdEMAMix8bit", "PagedAdEMAMix8bit", "Adafactor", *ADAPTIVE_OPTIMIZER_TYPES,
)
"""The names sd-scripts knows (any case). Any other name is a class: `module.Class`, or a bare name in torch.optim."""

SCHEDULERS: tuple[str, ...] = (
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
    "cosine_with_min_lr", "warmup_stable_decay", "inverse_sqrt", "piecewise_constant", "adafactor",
)
"""`--lr_scheduler` names (transformers' schedules, diffusers' piecewise_constant, Adafactor's proxy)."""

_OPTIMIZERS_BY_LOWER = {name.lower(): name for name in OPTIMIZER_TYPES}


def canonical_optimizer_type(value: str) -> str:
    """sd-scripts' spelling of a known optimizer in any case ('adamw8bit' -> 'AdamW8bit'); any other name is
    returned unchanged, since it names a class (`module.Class`, or a bare name looked up in torch.optim)."""
    name = value.strip()
    if not name:
        raise UserInputError("--optimizer_type is empty; give e.g. AdamW, or a class as module.Class")
    return _OPTIMIZERS_BY_LOWER.get(name.lower(), name)


def is_adaptive(optimizer_type: str) -> bool:
    return canonical_optimizer_type(optimizer_type) in ADAPTIVE_OPTIMIZER_TYPES


def canonical_scheduler(value: str) -> str:
    """A `--lr_scheduler` name in any case, or one line saying which names exist."""
    name = value.strip().lower()
    if name not in SCHEDULERS:
        raise UserInputError(
            f"--lr_scheduler: '{value}' is not supported; choose one of {', '.join(SCHEDULERS)} "
            f"(or give a class with --lr_scheduler_type module.Class)"
        )
    return name
