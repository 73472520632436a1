"""Ranking the runs of a LoRA+ sweep (`tools/loraplus_sweep.py`) and choosing the one to recommend.

Every run of a sweep trains the same number of steps on the same data, seed, noise and validation batches, so
their deterministic validation losses compare point by point. Two rankings:
- by the validation loss at the last step (equal steps for all);
- by speed: the first evaluated step at which a run reaches the best plain-LoRA run's final validation loss
  (plain LoRA = ratio 1), the "same result in fewer steps" LoRA+ promises.
The recommended run is the one with the lowest final validation loss (ties: the one that got there first). A run
that diverged (NaN) ranks last and is never recommended.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SweepPoint:
    """One run's settings and what it measured."""

    name: str
    learning_rate: float
    ratio: float
    optimizer: str | None = None
    """--optimizer_type when the sweep varies it (None: the command's own)."""
    validation: list[tuple[int, float]] = field(default_factory=list)
    """(step, validation loss) of every evaluation."""
    diverged: bool = False

    @property
    def final_loss(self) -> float | None:
        return self.validation[-1][1] if self.validation and not self.diverged else None

    @property
    def final_step(self) -> int | None:
        return self.validation[-1][0] if self.validation else None

    def first_step_at_or_below(self, target: float) -> int | None:
        if self.diverged:
            return None
        return next((step for step, loss in self.validation if loss <= target), None)

    def label(self) -> str:
        text = f"lr {self.learning_rate:g}, ratio {self.ratio:g}"
        return f"{text}, {self.optimizer}" if self.optimizer else text


@dataclass(frozen=True)
class Ranking:
    by_loss: list[SweepPoint]
    """Lowest final validation loss first; diverged runs and runs without a validation loss last."""
    target: float | None
    """The best plain-LoRA (ratio 1) run's final validation loss (None: no plain-LoRA run finished)."""
    target_run: SweepPoint | None
    reach: dict[str, int | None]
    """Per run name: the first evaluated step at or below `target` (None: never, or no target)."""
    by_speed: list[SweepPoint]
    """Runs that reached `target`, fewest steps first (ties: lower final loss)."""

    @property
    def best(self) -> SweepPoint | None:
        return self.by_loss[0] if self.by_loss and self.by_loss[0].final_loss is not None else None


def rank(points: Sequence[SweepPoint]) -> Ranking:
    """Both rankings of the finished runs `points`."""

    def loss_key(point: SweepPoint) -> tuple[float, float]:
        loss = point.final_loss
        reached = reach.get(point.name)
        return (math.inf if loss is None else loss, math.inf if reached is None else reached)

    plain = [p for p in points if p.ratio == 1 and p.final_loss is not None]
    target_run = min(plain, key=lambda p: p.final_loss) if plain else None
    target = target_run.final_loss if target_run is not None else None
    reach = {p.name: (p.first_step_at_or_below(target) if target is not None else None) for p in points}
    by_loss = sorted(points, key=loss_key)
    by_speed = sorted((p for p in points if reach[p.name] is not None), key=lambda p: (reach[p.name], loss_key(p)))
    return Ranking(by_loss, target, target_run, reach, by_speed)


def ranking_table(ranking: Ranking) -> str:
    """The ranking as a plain-text table (markdown), one row per run in loss order."""
    header = "| rank | run | final validation loss | at step | steps to reach plain LoRA's best |"
    lines = [header, "|---|---|---|---|---|"]
    for place, point in enumerate(ranking.by_loss, start=1):
        loss = "diverged (NaN)" if point.diverged else _number(point.final_loss)
        reached = ranking.reach.get(point.name)
        reach_text = "-" if ranking.target is None else ("not reached" if reached is None else str(reached))
        lines.append(f"| {place} | {point.label()} | {loss} | {point.final_step or '-'} | {reach_text} |")
    return "\n".join(lines)


def recommendation_lines(ranking: Ranking) -> list[str]:
    """What the sweep found, in a few sentences (the command is added by the caller)."""
    best = ranking.best
    if best is None:
        return ["no run finished with a validation loss: nothing to recommend (see the runs' logs)"]
    lines = [f"recommended: {best.label()}: validation loss {best.final_loss:.6g} at step {best.final_step}"]
    if ranking.target_run is None:
        lines.append("no plain-LoRA run (ratio 1) to compare with: add 1 to --ratios to see what LoRA+ gains")
        return lines
    plain = ranking.target_run
    if best is plain:
        lines.append(
            "plain LoRA (ratio 1) was best here: on this data and budget LoRA+ did not beat it; "
            "keep ratio 1 or try lower ratios / learning rates"
        )
        return lines
    gain = (plain.final_loss - best.final_loss) / plain.final_loss if plain.final_loss else 0.0
    reached = ranking.reach.get(best.name)
    lines.append(
        f"best plain LoRA: {plain.label()}: {plain.final_loss:.6g} at step {plain.final_step}; "
        f"the recommended run is {_percent(gain)} lower"
        + (f" and reached that loss at step {reached} of {plain.final_step}" if reached is not None else "")
    )
    return lines


def _percent(fraction: float) -> str:
    """12.3%, or two significant digits for small gaps (0.011%): validation losses often differ in the 4th digit."""
    return f"{fraction:.1%}" if abs(fraction) >= 0.01 else f"{fraction * 100:.2g}%"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"
