"""NaN and infinity guards, so that a diverged run never replaces a good file with a worse one.

- In training: each optimizer step checks its loss, then the gradients of each optimizer group (one fused fp32
  norm per group, after the cross-process average so every process decides alike); `NonFiniteSteps` skips up to
  `--max_nan_steps` such steps and then stops the run with one line naming the step and where the value appeared.
- In every writer: `check_finite_for_saving` refuses tensors that hold a NaN or infinity as they would be stored
  (after the cast to the save dtype: an fp32 weight above 65504 is an infinity in fp16).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from library.errors import NonFiniteError


def first_non_finite(named: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None) -> str | None:
    """The name of the first floating-point tensor holding a NaN or infinity (each cast to `dtype` first when
    given), or None. One host sync per device, however many tensors."""
    names: list[str] = []
    flags: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
    for name, tensor in named:
        if not torch.is_tensor(tensor) or not tensor.is_floating_point():
            continue
        value = tensor.detach()
        if dtype is not None and dtype.is_floating_point:
            value = value.to(dtype)
        flags.setdefault(value.device, []).append((len(names), torch.isfinite(value).all()))
        names.append(name)
    bad = [
        index
        for group in flags.values()
        for (index, _), finite in zip(group, torch.stack([flag for _, flag in group]).tolist())
        if not finite
    ]
    return names[min(bad)] if bad else None


def check_finite_for_saving(
    tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None, target: str | os.PathLike
) -> None:
    """Refuse (NonFiniteError, one line) to write `tensors` to `target` when one holds a NaN or infinity as it
    would be stored in `dtype`, so that a broken file never replaces a good one."""
    bad = first_non_finite(tensors.items(), dtype)
    if bad is None:
        return
    cast = f" after casting to {str(dtype).removeprefix('torch.')}" if dtype is not None else ""
    hint = "; save in fp32 (--save_precision float)" if cast and first_non_finite(tensors.items()) is None else ""
    raise NonFiniteError(
        f"refusing to write {target}: {bad} holds NaN or infinite values{cast}; files written before are kept{hint}"
    )


def group_gradient_norms(param_groups: Sequence[Mapping]) -> torch.Tensor:
    """One fp32 2-norm per optimizer group over its gradients (0 for a group without any): NaN or infinite when
    one of its gradients is (or, for gradients near fp32's limit, when the norm overflows, which clipping would
    turn into the same trouble). Computed with one fused norm per group, so it costs far less than the step."""
    norms = []
    device = None
    for group in param_groups:
        grads = [p.grad for p in group["params"] if p.grad is not None]
        if not grads:
            norms.append(None)
            continue
        device = grads[0].device
        per_tensor = torch._foreach_norm(grads, 2, dtype=torch.float32)
        norms.append(torch.linalg.vector_norm(torch.stack(per_tensor)))
    if device is None:
        return torch.zeros(len(norms))
    return torch.stack([torch.zeros((), device=device) if n is None else n for n in norms])


def non_finite_source(loss: float, group_norms: Sequence[float] | None, descriptions: Sequence[str]) -> str | None:
    """Where a non-finite value first shows in a step: the loss, else the first group (optimizer order) whose
    gradient norm is not finite; None when all are finite. `group_norms` None: gradients not checked."""
    if not math.isfinite(loss):
        return f"loss ({loss})"
    for norm, description in zip(group_norms or (), descriptions):
        if not math.isfinite(norm):
            return f"gradients in parameter group '{description}' (norm {norm})"
    return None


@dataclass
class NonFiniteSteps:
    """`--max_nan_steps`: how many non-finite steps may be skipped (no update, gradients dropped) before the run
    stops; the skipped steps are counted for the run report."""

    limit: int = 0
    skipped: list[int] = field(default_factory=list)
    """Optimizer steps skipped so far (1-based step numbers)."""

    def skip_or_stop(self, step: int, source: str) -> str:
        """Count the non-finite `step`; returns the warning line for a skipped step, or raises NonFiniteError (one
        line naming the step and `source`) when it is one more than `limit` allows."""
        if len(self.skipped) >= self.limit:
            count = f" (one more than --max_nan_steps {self.limit} allows)" if self.limit else ""
            advice = "" if self.limit else ", or let such steps be skipped with --max_nan_steps N"
            raise NonFiniteError(
                f"step {step}: non-finite {source}{count}; training stopped, no final file written (files saved "
                f"before step {step} are kept): lower the learning rate, check the data{advice}"
            )
        self.skipped.append(step)
        return (
            f"warning: step {step}: non-finite {source}; step skipped ({len(self.skipped)} of at most "
            f"{self.limit}, --max_nan_steps)"
        )
