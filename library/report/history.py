"""The run's history as `<output_name>_report.json` records it, so the HTML report and the comparison read one
file the run wrote (no second bookkeeping).

Sections the trainer adds to the report (see `history_section`), all plain JSON:

    "history": {
        "version": 1,
        "steps": [1, 2, ...],                       optimizer steps, increasing
        "loss": [0.12, null, ...],                  the loss of each step (null: non-finite, the step was skipped)
        "lr": {"unet": [...], "unet plus": [...]},  each optimizer group's lr at each step (same length as steps)
        "validation": [[10, 0.118], ...],           (step, loss/validation) of every evaluation
        "diagnostics": {"steps": [10, 20],          LoRA+ diagnostics (library.train.diagnostics), their tracker
                        "series": {"lora/unet/norm_B": [...], ...}}   names, one value per diagnostic step
    },
    "settings": {"learning_rate": 1e-4, "loraplus_unet_lr_ratio": 16.0, ...},   library.train.trackers.run_hparams
    "param_groups": [{"description": "unet plus", "component": "unet", "plus": true, "lr": 0.0016, ...}],
    "sample_prompts": ["a cat", ...]                the prompt of each sample index (the grids' row labels)

A resumed run keeps the steps of the run it continues (`earlier`), so its report covers the whole training.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

HISTORY_VERSION = 1
Scalar = int | float | str | bool


class HistoryError(ValueError):
    """A history section that does not follow the schema (the message says which field and why)."""


@dataclass(frozen=True)
class Series:
    """Values against optimizer steps; NaN where a value is missing or was not finite."""

    steps: tuple[int, ...] = ()
    values: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if len(self.steps) != len(self.values):
            raise HistoryError(f"{len(self.steps)} steps but {len(self.values)} values")

    def __bool__(self) -> bool:
        return bool(self.steps)

    def last(self) -> tuple[int, float] | None:
        """The last finite (step, value), or None."""
        for step, value in zip(reversed(self.steps), reversed(self.values)):
            if math.isfinite(value):
                return step, value
        return None

    def at(self, step: int) -> float | None:
        """The value at exactly `step` (None when there is none)."""
        for s, value in zip(self.steps, self.values):
            if s == step:
                return value
        return None


@dataclass(frozen=True)
class RunHistory:
    """What the curves are drawn from, whatever the source (report JSON or TensorBoard events)."""

    loss: Series = field(default_factory=Series)
    lr: dict[str, Series] = field(default_factory=dict)
    """Per optimizer group description ("unet", "unet plus", "unet_block5 plus", ...)."""
    validation: Series = field(default_factory=Series)
    diagnostics: dict[str, Series] = field(default_factory=dict)
    """Per tracker name ("lora/unet/norm_B", ...)."""

    def is_empty(self) -> bool:
        return not (self.loss or self.validation or any(self.lr.values()) or any(self.diagnostics.values()))


# --- Writer side ----------------------------------------------------------------------------------------------------
def history_section(
    *,
    first_step: int,
    losses: Sequence[float],
    lrs: Mapping[str, Sequence[float]],
    validation: Sequence[tuple[int, float]] = (),
    diagnostics: Sequence[tuple[int, Mapping[str, float]]] = (),
    settings: Mapping[str, Scalar] | None = None,
    param_groups: Sequence[Any] = (),
    sample_prompts: Sequence[str] = (),
    earlier: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The report sections for `build_report(..., extra=...)`, from the lists the trainer keeps.

    `losses[i]` and `lrs[group][i]` belong to step `first_step + 1 + i` (`first_step` is 0, or the step a resumed
    run started from). `diagnostics` are (step, {tracker name: value}). `param_groups` are `ParamGroupInfo`s (or
    dicts, e.g. with "weight_decay" added). `earlier` is the `history` section of the report this run's output
    already had: on a resume its steps up to `first_step` are kept in front of this run's (the report then covers
    the whole training), and it is ignored when it does not parse."""
    steps = list(range(first_step + 1, first_step + 1 + len(losses)))
    for group, values in lrs.items():
        if len(values) != len(losses):
            raise HistoryError(f"lr of group {group!r} has {len(values)} values for {len(losses)} steps")
    names = sorted({name for _, values in diagnostics for name in values})
    section = {
        "version": HISTORY_VERSION,
        "steps": steps,
        "loss": [_json_float(v) for v in losses],
        "lr": {group: [_json_float(v) for v in values] for group, values in lrs.items()},
        "validation": [[int(step), _json_float(loss)] for step, loss in validation],
        "diagnostics": {
            "steps": [int(step) for step, _ in diagnostics],
            "series": {name: [_json_float(values.get(name, math.nan)) for _, values in diagnostics] for name in names},
        },
    }
    if earlier is not None and first_step > 0:
        section = _prepend_earlier(earlier, section, first_step)
    return {
        "history": section,
        "settings": dict(settings or {}),
        "param_groups": [dataclasses.asdict(g) if dataclasses.is_dataclass(g) else dict(g) for g in param_groups],
        "sample_prompts": list(sample_prompts),
    }


def _prepend_earlier(earlier: Mapping[str, Any], section: dict[str, Any], first_step: int) -> dict[str, Any]:
    """`section` with the steps of `earlier` up to `first_step` in front (groups either lacks get nulls)."""
    try:
        parse_history(earlier)
    except HistoryError:
        return section
    keep = [i for i, step in enumerate(earlier["steps"]) if step <= first_step]
    n_old, n_new = len(keep), len(section["steps"])
    groups = list(dict.fromkeys([*earlier["lr"], *section["lr"]]))
    old_diag, new_diag = earlier["diagnostics"], section["diagnostics"]
    keep_diag = [i for i, step in enumerate(old_diag["steps"]) if step <= first_step]
    names = sorted({*old_diag["series"], *new_diag["series"]})
    return {
        "version": HISTORY_VERSION,
        "steps": [earlier["steps"][i] for i in keep] + section["steps"],
        "loss": [earlier["loss"][i] for i in keep] + section["loss"],
        "lr": {
            g: ([earlier["lr"][g][i] for i in keep] if g in earlier["lr"] else [None] * n_old)
            + section["lr"].get(g, [None] * n_new)
            for g in groups
        },
        "validation": [v for v in earlier["validation"] if v[0] <= first_step] + section["validation"],
        "diagnostics": {
            "steps": [old_diag["steps"][i] for i in keep_diag] + new_diag["steps"],
            "series": {
                name: (
                    [old_diag["series"][name][i] for i in keep_diag]
                    if name in old_diag["series"]
                    else [None] * len(keep_diag)
                )
                + new_diag["series"].get(name, [None] * len(new_diag["steps"]))
                for name in names
            },
        },
    }


def _json_float(value: float | None) -> float | None:
    """JSON has no NaN or infinity: a value that is not finite is written as null. Seven significant digits (what
    a float32 holds) keep the file about half the size of Python's shortest repr of a double."""
    if value is None:
        return None
    value = float(value)
    return float(f"{value:.7g}") if math.isfinite(value) else None


# --- Reader side ----------------------------------------------------------------------------------------------------
def parse_history(section: Any) -> RunHistory:
    """A `history` section checked against the schema; HistoryError names the first field that is wrong."""
    if not isinstance(section, Mapping):
        raise HistoryError(f"'history' is {type(section).__name__}, not an object")
    version = section.get("version")
    if version != HISTORY_VERSION:
        raise HistoryError(f"'history.version' is {version!r}; this version reads {HISTORY_VERSION}")
    steps = _steps(section.get("steps"), "history.steps")
    loss = _floats(section.get("loss"), "history.loss", len(steps))
    lr_section = section.get("lr")
    if not isinstance(lr_section, Mapping):
        raise HistoryError("'history.lr' must be an object of group -> list of lrs")
    lr = {str(g): Series(steps, _floats(v, f"history.lr[{g!r}]", len(steps))) for g, v in lr_section.items()}
    validation = section.get("validation")
    if not isinstance(validation, list) or any(not isinstance(v, list) or len(v) != 2 for v in validation):
        raise HistoryError("'history.validation' must be a list of [step, loss] pairs")
    val_steps = _steps([v[0] for v in validation], "history.validation steps")
    val_values = _floats([v[1] for v in validation], "history.validation losses", len(val_steps))
    diag = section.get("diagnostics")
    if not isinstance(diag, Mapping) or not isinstance(diag.get("series"), Mapping):
        raise HistoryError("'history.diagnostics' must be an object with 'steps' and 'series'")
    diag_steps = _steps(diag.get("steps"), "history.diagnostics.steps")
    diagnostics = {
        str(name): Series(diag_steps, _floats(v, f"history.diagnostics.series[{name!r}]", len(diag_steps)))
        for name, v in diag["series"].items()
    }
    return RunHistory(Series(steps, loss), lr, Series(val_steps, val_values), diagnostics)


def parse_settings(value: Any) -> dict[str, Scalar]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or any(not isinstance(v, (int, float, str, bool)) for v in value.values()):
        raise HistoryError("'settings' must be an object of names to numbers, strings or booleans")
    return {str(k): v for k, v in value.items()}


def parse_param_groups(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or any(not isinstance(g, Mapping) or "description" not in g for g in value):
        raise HistoryError("'param_groups' must be a list of objects with a 'description'")
    return [dict(g) for g in value]


def parse_prompts(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or any(not isinstance(p, str) for p in value):
        raise HistoryError("'sample_prompts' must be a list of strings")
    return list(value)


def _steps(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or any(isinstance(s, bool) or not isinstance(s, int) for s in value):
        raise HistoryError(f"'{where}' must be a list of whole step numbers")
    if any(b <= a for a, b in zip(value, value[1:])):
        raise HistoryError(f"'{where}' must increase")
    return tuple(value)


def _floats(value: Any, where: str, length: int) -> tuple[float, ...]:
    if not isinstance(value, list) or any(
        v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))) for v in value
    ):
        raise HistoryError(f"'{where}' must be a list of numbers (null for a missing value)")
    if len(value) != length:
        raise HistoryError(f"'{where}' has {len(value)} values for {length} steps")
    return tuple(math.nan if v is None else float(v) for v in value)
