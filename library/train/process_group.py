"""Several processes as one run: how long a process waits for the others (`--ddp_timeout`), stopping together on
Ctrl-C or SIGTERM, and the one line when another process is lost.

Launchers (torchrun, `accelerate launch`) forward Ctrl-C and SIGTERM to every process they started, but each gets
it at its own moment. A process that stopped there and then would leave the others waiting in the next collective
and save another step than they do; so in the training loop a signal is only noted (`library.train.interrupts.
noted_interrupts`) and before every batch the processes share whether any was signalled (`StopAgreement`, one
collective of one number): all stop at the same batch, drop the half-done step and save the same state together.
Launchers give them 30 s for it (torchrun's `--shutdown_timeout`) before killing them.

A process that dies closes its connections: the others' next collective fails at once, and a launcher whose
process exited non-zero stops the rest of its group. A process that hangs (or a machine that vanishes) is noticed
when a collective has waited `--ddp_timeout` minutes (torch's default without it: 30 for CPU/gloo, 10 for
GPU/NCCL, where NCCL's watchdog ends the process itself). Either way every other process stops with one line
(`lost_process_error`) instead of waiting for ever.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch

from library.errors import ProcessLostError
from library.train.interrupts import Terminated


def init_kwargs(timeout_minutes: float | None) -> dict[str, Any]:
    """The keyword arguments of `PartialState` (so of `torch.distributed.init_process_group`) for this run's
    collective timeout: none when it is torch's default."""
    return {} if timeout_minutes is None else {"timeout": timedelta(minutes=timeout_minutes)}


def accelerator_available() -> bool:
    """Whether torch sees a GPU or another accelerator (CUDA, XPU, MPS...) this process could run on."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


_SIGNAL_CODES = {"SIGINT": 1, "SIGTERM": 2}


class StopAgreement:
    """Before each batch (`checked`), every process shares whether it got a Ctrl-C or SIGTERM (`noted`, the names
    of the signals it got); when any did, all raise the first one's interrupt at that same batch."""

    def __init__(self, accelerator: Any, noted: list[str]) -> None:
        self.accelerator, self.noted = accelerator, noted

    def raise_if_any_stopped(self) -> None:
        code = _SIGNAL_CODES[self.noted[0]] if self.noted else 0
        codes = self.accelerator.gather(torch.tensor([code], device=self.accelerator.device)).tolist()
        first = next((code for code in codes if code), 0)
        if first == _SIGNAL_CODES["SIGTERM"]:
            raise Terminated()
        if first:
            raise KeyboardInterrupt()

    def checked(self, batches: Iterator[dict]) -> Iterator[dict]:
        """`batches`, with the agreement before each one is taken."""
        while True:
            self.raise_if_any_stopped()
            try:
                batch = next(batches)
            except StopIteration:
                return
            yield batch


_GLOO_PREFIX = re.compile(r"^\[[^\]]*\]\s*")  # "[.../gloo/transport/tcp/pair.cc:553] "
_BACKENDS = ("gloo", "nccl")


def lost_process_error(error: BaseException) -> ProcessLostError | None:
    """The one line for a collective that failed because another process stopped, hung or became unreachable
    (None: `error` is something else). torch raises these as `DistError`s or, from gloo, as plain RuntimeErrors
    naming the transport."""
    dist_error = getattr(torch.distributed, "DistError", ())
    text = str(error).strip()
    if not isinstance(error, dist_error) and not (
        isinstance(error, RuntimeError) and any(name in text.lower() for name in _BACKENDS)
    ):
        return None
    reason = _GLOO_PREFIX.sub("", (text.splitlines() or [type(error).__name__])[0]).split(". ")[0][:200]
    return ProcessLostError(
        f"lost contact with another process of this run ({reason}): it stopped, hung or its machine is unreachable; "
        "this process stops too. See that process's own lines; resume from the last --save_state checkpoint"
    )


def release_process_group() -> None:
    """Close the process group after a lost process: gloo's threads still wait on the lost peer and abort the
    interpreter at exit ("terminate called without an active exception") unless the group is destroyed first."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        try:
            torch.distributed.destroy_process_group()
        except Exception:  # noqa: BLE001 - already broken; exiting is all that is left
            pass
