"""Optimizers by sd-scripts' `--optimizer_type` names (or any `module.Class`) and learning-rate schedules by its
`--lr_scheduler` names (transformers' / diffusers' own schedules, or any `--lr_scheduler_type module.Class`).

Every user mistake here (unknown name, bad `key=value`, a combination sd-scripts refuses or that would crash)
is a one-line `UserInputError`. The pure checks (`per_group_lr_problem`, `schedule_problem`, `optimizer_class`,
`scheduler_class`) let the config refuse a run before any model loads.

Torch is imported where a class is looked up, not at import time: the command line lists these names in --help.
"""

from __future__ import annotations

import ast
import importlib
import logging
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from library.errors import UserInputError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


# ---- sd-scripts' names -------------------------------------------------------------------------------------------

ADAPTIVE_OPTIMIZER_TYPES: tuple[str, ...] = (
    "Prodigy",
    "DAdaptation",
    "DAdaptAdamPreprint",
    "DAdaptAdam",
    "DAdaptLion",
    "DAdaptAdaGrad",
    "DAdaptAdan",
    "DAdaptAdanIP",
    "DAdaptSGD",
)
"""Optimizers that estimate one step size for all parameter groups (they cannot take LoRA+ ratios)."""

OPTIMIZER_TYPES: tuple[str, ...] = (
    "AdamW",
    "AdamW8bit",
    "PagedAdamW",
    "PagedAdamW8bit",
    "PagedAdamW32bit",
    "Lion",
    "Lion8bit",
    "PagedLion8bit",
    "SGDNesterov",
    "SGDNesterov8bit",
    "AdEMAMix8bit",
    "PagedAdEMAMix8bit",
    "Adafactor",
    *ADAPTIVE_OPTIMIZER_TYPES,
)
"""The names sd-scripts knows (any case). Any other name is a class: `module.Class`, or a bare name in torch.optim."""

SCHEDULERS: tuple[str, ...] = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "cosine_with_min_lr",
    "warmup_stable_decay",
    "inverse_sqrt",
    "piecewise_constant",
    "adafactor",
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


_BNB = "bitsandbytes.optim"
_DADAPT = "dadaptation"
OPTIMIZER_CLASSES: dict[str, tuple[str, str]] = {
    "AdamW": ("torch.optim", "AdamW"),
    "AdamW8bit": (_BNB, "AdamW8bit"),
    "PagedAdamW": (_BNB, "PagedAdamW"),
    "PagedAdamW8bit": (_BNB, "PagedAdamW8bit"),
    "PagedAdamW32bit": (_BNB, "PagedAdamW32bit"),
    "Lion": ("lion_pytorch", "Lion"),
    "Lion8bit": (_BNB, "Lion8bit"),
    "PagedLion8bit": (_BNB, "PagedLion8bit"),
    "SGDNesterov": ("torch.optim", "SGD"),
    "SGDNesterov8bit": (_BNB, "SGD8bit"),
    "AdEMAMix8bit": (_BNB, "AdEMAMix8bit"),
    "PagedAdEMAMix8bit": (_BNB, "PagedAdEMAMix8bit"),
    "Adafactor": ("transformers.optimization", "Adafactor"),
    "Prodigy": ("prodigyopt", "Prodigy"),
    "DAdaptation": (f"{_DADAPT}.experimental", "DAdaptAdamPreprint"),
    "DAdaptAdamPreprint": (f"{_DADAPT}.experimental", "DAdaptAdamPreprint"),
    "DAdaptAdam": (_DADAPT, "DAdaptAdam"),
    "DAdaptLion": (_DADAPT, "DAdaptLion"),
    "DAdaptAdaGrad": (_DADAPT, "DAdaptAdaGrad"),
    "DAdaptAdan": (_DADAPT, "DAdaptAdan"),
    "DAdaptAdanIP": (f"{_DADAPT}.experimental", "DAdaptAdanIP"),
    "DAdaptSGD": (_DADAPT, "DAdaptSGD"),
}
"""Where each sd-scripts optimizer name lives (module, class), as sd-scripts maps them."""

AdafactorMode = Literal["relative_step", "fixed_lr"] | None
"""Adafactor's step-size mode: its own relative step (lr None), a given lr, or None for any other optimizer."""


# ---- key=value arguments -----------------------------------------------------------------------------------------


def _literal(value: str) -> Any:
    """'0.9' -> 0.9, '(0.9,0.99)' -> (0.9, 0.99), 'True' / 'true' -> True; anything else stays a string."""
    lowered = value.strip().lower()
    if lowered in ("true", "false", "none"):
        return {"true": True, "false": False, "none": None}[lowered]
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def parse_literals(args: Mapping[str, str] | None) -> dict[str, Any]:
    """`--optimizer_args` / `--lr_scheduler_args` strings as Python values (sd-scripts: ast.literal_eval)."""
    return {key: _literal(value) for key, value in (args or {}).items()}


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _call_for_user(what: str, hint: str, build: Callable[[], Any]) -> Any:
    """`build()`, with the library's complaint about the user's arguments turned into one line."""
    try:
        return build()
    except (TypeError, ValueError, NotImplementedError) as error:
        raise UserInputError(f"{what}: {_one_line(error)} ({hint})") from None


# ---- classes by name ---------------------------------------------------------------------------------------------


def _split_class_path(path: str, default_module: str) -> tuple[str, str]:
    """'a.b.Class' -> ('a.b', 'Class'); a bare 'Class' lives in `default_module` (as in sd-scripts)."""
    module_name, _, class_name = path.strip().rpartition(".")
    return module_name or default_module, class_name


def _import_class(module_name: str, class_name: str, flag: str) -> type:
    path = f"{module_name}.{class_name}"
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UserInputError(f"{flag} {path}: cannot import {module_name} ({_one_line(error)})") from None
    found = getattr(module, class_name, None)
    if not isinstance(found, type):
        raise UserInputError(f"{flag} {path}: module {module_name} has no class {class_name}")
    return found


def optimizer_class(optimizer_type: str) -> type[torch.optim.Optimizer]:
    """The class behind an sd-scripts name, a `module.Class` path, or a bare torch.optim class name."""
    import torch

    name = canonical_optimizer_type(optimizer_type)
    if name in OPTIMIZER_CLASSES:
        return _import_class(*OPTIMIZER_CLASSES[name], "--optimizer_type")
    if "." not in name and not isinstance(getattr(torch.optim, name, None), type):
        raise UserInputError(
            f"--optimizer_type: unknown optimizer '{name}'; choose one of {', '.join(OPTIMIZER_TYPES)}, "
            f"a torch.optim class, or a class of another library as module.Class"
        )
    return _import_class(*_split_class_path(name, "torch.optim"), "--optimizer_type")


def scheduler_class(scheduler_type: str) -> type:
    """`--lr_scheduler_type`: a `module.Class` path, or a bare name in torch.optim.lr_scheduler (as in sd-scripts)."""
    return _import_class(*_split_class_path(scheduler_type, "torch.optim.lr_scheduler"), "--lr_scheduler_type")


# ---- optimizer ---------------------------------------------------------------------------------------------------


def _nesterov_defaults(name: str, kwargs: dict[str, Any]) -> None:
    """sd-scripts: SGDNesterov is SGD with nesterov=True and, when not given, momentum 0.9."""
    if not kwargs.get("nesterov", True):
        raise UserInputError(
            f"--optimizer_type {name} always uses nesterov=True; for plain SGD use --optimizer_type SGD"
        )
    if "momentum" not in kwargs:
        logger.info("%s needs momentum: using momentum=0.9", name)
        kwargs["momentum"] = 0.9
    kwargs["nesterov"] = True  # bitsandbytes' SGD8bit accepts and ignores it, as under sd-scripts


def _adafactor_defaults(kwargs: dict[str, Any]) -> None:
    """sd-scripts: relative_step defaults to True, and warmup_init=True turns it on."""
    kwargs.setdefault("relative_step", True)
    if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
        logger.info("Adafactor: warmup_init=True needs relative_step=True; using relative_step=True")
        kwargs["relative_step"] = True


def optimizer_kwargs(optimizer_type: str, optimizer_args: Mapping[str, str] | None) -> dict[str, Any]:
    """`--optimizer_args` as Python values, with sd-scripts' per-optimizer defaults filled in."""
    name = canonical_optimizer_type(optimizer_type)
    kwargs = parse_literals(optimizer_args)
    if name in ("SGDNesterov", "SGDNesterov8bit"):
        _nesterov_defaults(name, kwargs)
    elif name == "Adafactor":
        _adafactor_defaults(kwargs)
    return kwargs


def adafactor_mode(optimizer_type: str, optimizer_args: Mapping[str, str] | None) -> AdafactorMode:
    """How `--optimizer_type Adafactor` will size its steps with these `--optimizer_args` (None: not Adafactor)."""
    if canonical_optimizer_type(optimizer_type) != "Adafactor":
        return None
    return "relative_step" if optimizer_kwargs("Adafactor", optimizer_args)["relative_step"] else "fixed_lr"


def per_group_lr_problem(
    optimizer_type: str, group_lrs: Mapping[str, float], optimizer_args: Mapping[str, str] | None = None
) -> str | None:
    """Why `optimizer_type` cannot run these group learning rates, or None when it can.

    Prodigy and the D-Adaptation family estimate one step size (d) for the whole model and accept per-group
    learning rates only when they are equal or 0 - otherwise they raise at the first step. Adafactor with
    relative_step=True ignores every lr (sd-scripts drops them with a warning). LoRA+ needs B's rate to differ
    from A's, so both are refused at start-up instead.
    """
    nonzero = {name: lr for name, lr in group_lrs.items() if lr != 0}
    if len(set(nonzero.values())) <= 1:
        return None
    listed = ", ".join(f"{name} {lr:g}" for name, lr in nonzero.items())
    if is_adaptive(optimizer_type):
        return (
            f"--optimizer_type {optimizer_type} estimates one step size for all parameter groups and cannot take "
            f"different learning rates per group ({listed}); for LoRA+ use AdamW, AdamW8bit or Lion, or drop the "
            f"LoRA+ ratios / block lr weights and give the UNet and text encoders the same learning rate"
        )
    if adafactor_mode(optimizer_type, optimizer_args) == "relative_step":
        return (
            f"--optimizer_type Adafactor with relative_step=True sets its own step size and ignores the learning "
            f"rates per group ({listed}); to keep them pass --optimizer_args relative_step=False "
            f"scale_parameter=False warmup_init=False"
        )
    return None


def _adafactor_groups(
    param_groups: list[dict], learning_rate: float | None, relative_step: bool
) -> tuple[list[dict], float | None]:
    """Relative step: the groups lose their lr (Adafactor refuses one). Fixed lr: every group needs one."""
    if relative_step:
        if learning_rate:
            logger.info(
                "Adafactor relative_step=True: --learning_rate %g is only the adafactor schedule's initial lr",
                learning_rate,
            )
        return [{key: value for key, value in group.items() if key != "lr"} for group in param_groups], None
    if any(not group.get("lr", learning_rate) for group in param_groups):
        raise UserInputError(
            "--optimizer_type Adafactor with relative_step=False needs a learning rate: give --learning_rate "
            "(sd-scripts suggests scale_parameter=False warmup_init=False and --lr_scheduler constant_with_warmup)"
        )
    return param_groups, learning_rate


def build_optimizer(
    optimizer_type: str,
    param_groups: list[dict],
    learning_rate: float | None,
    optimizer_args: Mapping[str, str] | None,
) -> torch.optim.Optimizer:
    """An optimizer over LoRA parameter groups that keep their own learning rates (`learning_rate` is the
    default for a group without one). Adafactor with relative_step=True (its default) sizes its own steps:
    it needs `--lr_scheduler adafactor` (see `build_lr_scheduler`)."""
    name = canonical_optimizer_type(optimizer_type)
    kwargs = optimizer_kwargs(name, optimizer_args)
    group_lrs = {str(i): group.get("lr", learning_rate) or 0.0 for i, group in enumerate(param_groups)}
    problem = per_group_lr_problem(name, group_lrs, optimizer_args)
    if problem:
        raise UserInputError(problem)
    lr = learning_rate
    if name == "Adafactor":
        param_groups, lr = _adafactor_groups(param_groups, learning_rate, kwargs["relative_step"])
    if name == "AdamW" and _has_half_params(param_groups) and not {"fused", "foreach"} & kwargs.keys():
        kwargs["fused"] = True  # see _has_half_params
    optimizer_cls = optimizer_class(name)
    return _call_for_user(
        f"--optimizer_type {name}", "check --optimizer_args", lambda: optimizer_cls(param_groups, lr=lr, **kwargs)
    )


def _has_half_params(param_groups: list[dict]) -> bool:
    """fp16/bf16 LoRA weights (`--full_fp16` / `--full_bf16`). torch's default (foreach) AdamW keeps its state in the
    parameter's dtype and adds eps=1e-8 there, which rounds to 0 in fp16: a gradient that is exactly zero at the first
    step (A's, while B is still zero) makes 0/0 = NaN at the second. The fused AdamW computes in fp32 and does not."""
    import torch

    return any(
        getattr(param, "dtype", None) in (torch.float16, torch.bfloat16)
        for group in param_groups
        for param in group["params"]
    )


# ---- learning-rate schedule --------------------------------------------------------------------------------------


def _steps_or_ratio(value: float, total_steps: int) -> int:
    if 0 < value < 1:
        return int(value * total_steps)
    return int(value)


def warmup_steps(lr_warmup_steps: float, total_steps: int) -> int:
    """sd-scripts: a value below 1 is a ratio of the total steps."""
    return _steps_or_ratio(lr_warmup_steps, total_steps)


def decay_steps(lr_decay_steps: float, total_steps: int) -> int:
    """`--lr_decay_steps` (warmup_stable_decay): steps, or a ratio of the total steps when below 1."""
    return _steps_or_ratio(lr_decay_steps, total_steps)


def _adafactor_schedule_problem(name: str, mode: AdafactorMode, scheduler_type: str | None) -> str | None:
    if mode == "relative_step" and (scheduler_type or name not in ("adafactor", "constant")):
        chosen = f"--lr_scheduler_type {scheduler_type}" if scheduler_type else f"--lr_scheduler {name}"
        return (
            f"--optimizer_type Adafactor with relative_step=True sets its own step size and cannot follow {chosen}: "
            f"use --lr_scheduler adafactor, or pass --optimizer_args relative_step=False with a --learning_rate"
        )
    if name == "adafactor" and mode is None and not scheduler_type:
        return "--lr_scheduler adafactor reads Adafactor's own step size: it needs --optimizer_type Adafactor"
    return None


def _schedule_args_problem(name: str, args: Mapping[str, Any], min_lr_ratio: float | None) -> str | None:
    if name == "adafactor" and args:
        return f"--lr_scheduler adafactor takes no --lr_scheduler_args (got {', '.join(args)})"
    if name == "cosine_with_min_lr" and min_lr_ratio is None and not {"min_lr", "min_lr_rate"} & args.keys():
        return "--lr_scheduler cosine_with_min_lr needs --lr_scheduler_min_lr_ratio (e.g. 0.1)"
    if name == "piecewise_constant" and "step_rules" not in args:
        return (
            "--lr_scheduler piecewise_constant needs --lr_scheduler_args step_rules=MULT:UNTIL_STEP,...,FINAL_MULT "
            "(e.g. step_rules=1:100,0.1)"
        )
    return None


def _schedule_problem(
    name: str,
    mode: AdafactorMode,
    warmup: float,
    scheduler_type: str | None,
    args: Mapping[str, Any],
    min_lr_ratio: float | None,
) -> str | None:
    canonical = canonical_scheduler(name)
    problem = _adafactor_schedule_problem(canonical, mode, scheduler_type)
    if problem:
        return problem
    if warmup and (scheduler_type or canonical in ("constant", "adafactor", "piecewise_constant")):
        chosen = f"--lr_scheduler_type {scheduler_type}" if scheduler_type else f"--lr_scheduler {canonical}"
        return (
            f"{chosen} has no warmup (--lr_warmup_steps {warmup:g}); set --lr_warmup_steps 0 "
            f"or use --lr_scheduler constant_with_warmup"
        )
    if scheduler_type:
        return None
    proxy = mode == "relative_step"  # `constant` then means Adafactor's own schedule too
    return _schedule_args_problem("adafactor" if proxy else canonical, args, min_lr_ratio)


def schedule_problem(
    lr_scheduler: str,
    *,
    optimizer_type: str,
    optimizer_args: Mapping[str, str] | None,
    warmup: float = 0,
    scheduler_type: str | None = None,
    scheduler_args: Mapping[str, str] | None = None,
    min_lr_ratio: float | None = None,
) -> str | None:
    """Why this schedule cannot run (a combination sd-scripts refuses, or one that would crash), or None.

    Needs no model and no optimizer, so the config can refuse a run before anything loads. `warmup` is
    `--lr_warmup_steps` as given (steps or ratio); only whether it is 0 matters here.
    """
    mode = adafactor_mode(optimizer_type, optimizer_args)
    return _schedule_problem(
        lr_scheduler, mode, warmup, scheduler_type or None, parse_literals(scheduler_args), min_lr_ratio
    )


def _optimizer_adafactor_mode(optimizer: torch.optim.Optimizer) -> AdafactorMode:
    if type(optimizer).__name__ != "Adafactor" or "relative_step" not in optimizer.defaults:
        return None
    return "relative_step" if optimizer.defaults["relative_step"] else "fixed_lr"


def _library_kwargs(
    name: str,
    *,
    total_steps: int,
    warmup: int,
    num_cycles: int,
    power: float,
    decay: int,
    min_lr_ratio: float | None,
    timescale: int | None,
) -> dict[str, Any]:
    """The arguments sd-scripts gives transformers' schedule function `name` from its flags (num_cycles / 2 for
    the min-lr and WSD cosines: a cycle there is a full cosine wave, in transformers half a wave)."""
    if name == "constant":
        return {}
    if name == "constant_with_warmup":
        return {"num_warmup_steps": warmup}
    if name == "inverse_sqrt":
        return {"num_warmup_steps": warmup, "timescale": timescale}
    if name == "warmup_stable_decay":
        return {
            "num_warmup_steps": warmup,
            "num_stable_steps": total_steps - warmup - decay,
            "num_decay_steps": decay,
            "num_cycles": num_cycles / 2,
            "min_lr_ratio": min_lr_ratio or 0.0,
        }
    min_lr = {} if min_lr_ratio is None else {"min_lr_rate": min_lr_ratio}
    extra = {
        "cosine_with_restarts": {"num_cycles": num_cycles},
        "polynomial": {"power": power},
        "cosine_with_min_lr": {"num_cycles": num_cycles / 2, **min_lr},
    }.get(name, {})
    return {"num_warmup_steps": warmup, "num_training_steps": total_steps, **extra}


def _transformers_schedule(name: str) -> Callable[..., torch.optim.lr_scheduler.LRScheduler]:
    """transformers' own function for schedule `name` (sd-scripts calls these directly: `get_scheduler` drops
    `timescale` and wires warmup_stable_decay differently across transformers versions)."""
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    try:
        return TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
    except (ValueError, KeyError):
        raise UserInputError(
            f"--lr_scheduler {name}: the installed transformers has no such schedule; upgrade transformers"
        ) from None


def _adafactor_schedule(
    optimizer: torch.optim.Optimizer, name: str, initial_lr: float
) -> torch.optim.lr_scheduler.LRScheduler:
    """transformers' proxy that reports Adafactor's own step sizes (it needs a gradient in every group)."""
    from transformers.optimization import AdafactorSchedule

    if name != "adafactor":
        logger.info("Adafactor with relative_step=True: --lr_scheduler %s follows its own step size", name)
    return AdafactorSchedule(optimizer, initial_lr)


def build_lr_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    warmup: int = 0,
    num_cycles: int = 1,
    power: float = 1.0,
    decay: int = 0,
    min_lr_ratio: float | None = None,
    timescale: int | None = None,
    scheduler_type: str | None = None,
    scheduler_args: Mapping[str, str] | None = None,
    initial_lr: float = 0.0,
    num_processes: int = 1,
) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule `name` built by the library that defines it; every group's lr follows the same curve from
    its own base lr. `total_steps`, `warmup`, `decay`, `timescale`: optimizer steps; `scheduler_args`:
    `--lr_scheduler_args` strings (they override what the flags give); `scheduler_type`: a class that replaces
    `name`; `initial_lr`: what the adafactor schedule reports before the first step (sd-scripts passes
    `--learning_rate`).

    `num_processes`: accelerate steps a prepared schedule once per process at every optimizer step, so every length
    is counted in those steps (`_scaled_lengths`): the flags', the transformers lengths among `scheduler_args`, the
    piecewise_constant step rules. A `scheduler_type` class, whose arguments only it understands, is advanced once
    per optimizer step instead (`OncePerOptimizerStep`). Either way N processes follow one process's curve."""
    args = parse_literals(scheduler_args)
    mode = _optimizer_adafactor_mode(optimizer)
    problem = _schedule_problem(name, mode, warmup, scheduler_type or None, args, min_lr_ratio)
    if problem:
        raise UserInputError(problem)
    if scheduler_type:
        scheduler_cls = scheduler_class(scheduler_type)
        scheduler = _call_for_user(
            f"--lr_scheduler_type {scheduler_type}",
            "check --lr_scheduler_args",
            lambda: scheduler_cls(optimizer, **args),
        )
        if num_processes == 1:
            return scheduler
        from library.train.once_per_step import OncePerOptimizerStep

        return OncePerOptimizerStep(scheduler, num_processes)
    name = canonical_scheduler(name)
    if name == "adafactor" or mode == "relative_step":
        return _adafactor_schedule(optimizer, name, initial_lr)
    args = _scaled_lengths(name, args, num_processes)
    if name == "piecewise_constant":
        from diffusers.optimization import get_scheduler as diffusers_get_scheduler

        return _call_for_user(
            f"--lr_scheduler {name}",
            "check --lr_scheduler_args",
            lambda: diffusers_get_scheduler(name, optimizer, **args),
        )
    if name == "warmup_stable_decay" and warmup + decay > total_steps:
        raise UserInputError(
            f"--lr_scheduler warmup_stable_decay: {warmup} warmup + {decay} decay steps exceed the "
            f"run's {total_steps} steps; lower --lr_warmup_steps or --lr_decay_steps"
        )
    schedule = _transformers_schedule(name)
    n = num_processes
    kwargs = (
        _library_kwargs(
            name,
            total_steps=total_steps * n,
            warmup=warmup * n,
            num_cycles=num_cycles,
            power=power,
            decay=decay * n,
            min_lr_ratio=min_lr_ratio,
            # transformers' default (the warmup, else 10,000 steps) made explicit, so it is scaled too
            timescale=timescale if n == 1 else (timescale or warmup or 10_000) * n,
        )
        | args
    )
    return _call_for_user(f"--lr_scheduler {name}", "check --lr_scheduler_args", lambda: schedule(optimizer, **kwargs))


LENGTH_ARGS = ("num_warmup_steps", "num_training_steps", "num_stable_steps", "num_decay_steps", "timescale")
"""The arguments of transformers' schedule functions that count steps."""


def _scaled_lengths(name: str, args: dict[str, Any], steps_per_step: int) -> dict[str, Any]:
    """`--lr_scheduler_args` with every length counted in schedule steps, `steps_per_step` of them per optimizer
    step: the transformers lengths (`LENGTH_ARGS`), and piecewise_constant's step rules."""
    if steps_per_step == 1:
        return args
    scaled = dict(args)
    for key in LENGTH_ARGS:
        if isinstance(scaled.get(key), (int, float)) and not isinstance(scaled[key], bool):
            scaled[key] = scaled[key] * steps_per_step
    if name == "piecewise_constant" and isinstance(scaled.get("step_rules"), str):
        scaled["step_rules"] = scaled_step_rules(scaled["step_rules"], steps_per_step)
    return scaled


def scaled_step_rules(rules: str, factor: int) -> str:
    """diffusers' piecewise_constant rules `MULT:UNTIL_STEP,...,FINAL_MULT` with every step multiplied by `factor`
    ("1:100,0.1" -> "1:200,0.1" for 2); rules it cannot read are left for diffusers to refuse."""
    parts = rules.split(",")
    scaled = []
    for rule in parts[:-1]:
        multiplier, sep, until = rule.partition(":")
        if not sep or not until.strip().lstrip("-").isdigit():
            return rules
        scaled.append(f"{multiplier}:{int(until) * factor}")
    return ",".join([*scaled, parts[-1]])


def total_training_steps(
    max_train_steps: int, max_train_epochs: int | None, batches_per_epoch: int, gradient_accumulation_steps: int
) -> int:
    """Optimizer steps of the run: `--max_train_epochs` overrides `--max_train_steps`."""
    if max_train_epochs is None:
        return max_train_steps
    return max_train_epochs * math.ceil(batches_per_epoch / gradient_accumulation_steps)
