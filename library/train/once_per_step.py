"""A learning-rate schedule that advances once per optimizer step, however many processes run.

accelerate steps a prepared scheduler once per process at every optimizer step (its batches are counted across
processes), so the schedules built here from sd-scripts' flags count their lengths in those steps (`optim`). A class
given by `--lr_scheduler_type` takes arguments whose meaning only the class knows (StepLR's step_size is a length,
ExponentialLR's gamma a factor per step): no scaling of them is right for every class. Wrapped in
`OncePerOptimizerStep`, it sees one step per optimizer step, exactly as with one process.
"""

from __future__ import annotations

from typing import Any

from torch.optim.lr_scheduler import LRScheduler


class OncePerOptimizerStep(LRScheduler):
    """`inner`, advanced on every `calls_per_step`-th call of `step` (the first of each optimizer step's calls). Its
    state dict is the inner one's, so a state folder reads as a one-process run's. An `LRScheduler` so that
    accelerate's `prepare` wraps and saves it like any schedule."""

    def __init__(self, inner: LRScheduler, calls_per_step: int) -> None:
        # LRScheduler.__init__ is not called: it would step the already built inner schedule once more.
        self.inner = inner
        self.calls_per_step = calls_per_step
        self.optimizer = inner.optimizer
        self._calls = 0

    def step(self, *args: Any, **kwargs: Any) -> None:
        if self._calls % self.calls_per_step == 0:
            self.inner.step(*args, **kwargs)
        self._calls += 1

    def get_last_lr(self) -> list[float]:
        return self.inner.get_last_lr()

    def get_lr(self) -> list[float]:
        return self.inner.get_lr()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)
        self._calls = 0
