"""The two places the run reaches into private parts of accelerate and torch, because no public call does the job.

Each is one small function that says why. `tests/test_private_apis.py` runs both against the installed versions
and fails with a message naming the library and what changed, so an upgrade that moves them is caught by the
tests, not by a user's run.
"""

from __future__ import annotations

from typing import Any

from accelerate.state import AcceleratorState


def reset_accelerator_state() -> None:
    """Forget the mixed-precision setting of this process's previous `Accelerator`, so the next run sets its own.

    accelerate keeps one process-wide `AcceleratorState` and refuses a second `Accelerator` with another
    `mixed_precision` ("restart your runtime"); a process that trains more than once (tests, sweeps calling `train`
    in turn) needs each run to choose. accelerate has no public reset (its own tests call this private one). The
    distributed part (`PartialState`: ranks, device, process group) is kept, so this is safe under multi-GPU.
    """
    AcceleratorState._reset_state(reset_partial_state=False)


def allow_fp16_gradients(accelerator: Any) -> None:
    """--full_fp16 on a GPU: the LoRA weights (so their gradients) are fp16, which torch's GradScaler refuses to
    unscale ("Attempting to unscale FP16 gradients") unless its private `_unscale_grads_` is told that fp16
    gradients are expected; torch has no public switch for it (sd-scripts makes the same change). Only this
    accelerator's scaler instance is changed; without a scaler (no fp16 mixed precision) nothing is done."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None:
        return
    unscale = scaler._unscale_grads_
    scaler._unscale_grads_ = lambda optimizer, inv_scale, found_inf, allow_fp16: unscale(
        optimizer, inv_scale, found_inf, True
    )
