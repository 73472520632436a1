"""Ctrl-C and SIGTERM stop a run the same way.

SIGTERM is what `docker stop`, job schedulers and cloud pre-emption send. For the duration of a run it raises
`Terminated`, a KeyboardInterrupt, so it takes Ctrl-C's path: in the training loop the half-done step is dropped
and the LoRA and a resumable state of the last finished step are saved; before the loop (loading, caching) the run
says what it was doing and that nothing was saved. Either way the trainer raises `TrainingInterrupted`, which is a
KeyboardInterrupt too: in-process callers (tests, sweep tools) stop as they would on Ctrl-C, and only the script
entry turns it into exit code 130 (SIGINT) or 143 (SIGTERM) without a traceback.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from library.errors import EXIT_INTERRUPTED, EXIT_TERMINATED


class Terminated(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM while `sigterm_interrupts` is active."""


def signal_name(interrupt: BaseException) -> str:
    return (
        "SIGTERM"
        if isinstance(interrupt, Terminated) or getattr(interrupt, "signal_name", "") == "SIGTERM"
        else "SIGINT"
    )


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """For the body, SIGTERM raises `Terminated` (a KeyboardInterrupt) in the main thread; the previous handler
    is put back afterwards. Nothing changes where there is no SIGTERM or off the main thread (signal handlers
    can only be set there)."""
    sigterm = getattr(signal, "SIGTERM", None)
    if sigterm is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum, frame):
        raise Terminated()

    previous = signal.signal(sigterm, raise_terminated)
    try:
        yield
    finally:
        signal.signal(sigterm, previous)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM arriving in the body are held, and handed to their Python handlers at its end (so they
    raise KeyboardInterrupt / `Terminated` there): the body runs whole or not at all. For short critical sections
    only (an optimizer update and its bookkeeping). Signals that are ignored or left to the OS stay so; nothing
    changes off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def hold(signum, frame):
        received.append(signum)

    previous = {}
    for sig in (signal.SIGINT, getattr(signal, "SIGTERM", None)):
        if sig is not None and callable(handler := signal.getsignal(sig)):
            previous[sig] = handler
            signal.signal(sig, hold)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        previous[received[0]](received[0], None)


@contextlib.contextmanager
def noted_interrupts() -> Iterator[list[str]]:
    """For the body, Ctrl-C and SIGTERM raise nothing: each is noted, by name ("SIGINT", "SIGTERM"), in the list
    yielded, for the caller to act on at a point of its choosing (several processes stop together at a batch that
    they agree on, `library.train.process_group`). Signals that are ignored or left to the OS stay so; nothing
    changes off the main thread."""
    noted: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield noted
        return
    sigterm = getattr(signal, "SIGTERM", None)

    def note(signum, frame):
        noted.append("SIGTERM" if signum == sigterm else "SIGINT")

    previous = {}
    for sig in (signal.SIGINT, sigterm):
        if sig is not None and callable(handler := signal.getsignal(sig)):
            previous[sig] = handler
            signal.signal(sig, note)
    try:
        yield noted
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


NOTHING_SAVED = "no LoRA or state was saved"


@dataclass
class Phase:
    """What the run is doing now, for the line an interrupt prints."""

    doing: str = "starting"
    outcome: str = NOTHING_SAVED
    """What a stop now leaves behind (e.g. "...; latents cached to disk so far are kept and reused")."""

    def enter(self, doing: str, outcome: str = NOTHING_SAVED) -> None:
        self.doing, self.outcome = doing, outcome


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the run. In the training loop the LoRA file and the resumable state of the last
    finished step were saved (`lora_path`, `state_path`, `step`; with several processes, by all of them together);
    before it, `phase` says what was interrupted and nothing was saved."""

    def __init__(
        self,
        lora_path: Path | None = None,
        state_path: Path | None = None,
        step: int | None = None,
        *,
        signal_name: str = "SIGINT",
        phase: str | None = None,
        outcome: str = NOTHING_SAVED,
        is_main_process: bool = True,
        num_processes: int = 1,
    ) -> None:
        where = f"after step {step}" if phase is None else f"while {phase}"
        super().__init__(f"interrupted ({signal_name}) {where}")
        self.lora_path, self.state_path, self.step = lora_path, state_path, step
        self.signal_name, self.phase, self.outcome = signal_name, phase, outcome
        self.is_main_process = is_main_process
        """Only the main process reports (every process raises)."""
        self.num_processes = num_processes
        """A resume needs as many processes as saved the state."""

    @classmethod
    def during(cls, phase: Phase, interrupt: BaseException, is_main_process: bool = True) -> TrainingInterrupted:
        """An interrupt outside the training loop (loading, caching, writing the final files)."""
        return cls(
            signal_name=signal_name(interrupt),
            phase=phase.doing,
            outcome=phase.outcome,
            is_main_process=is_main_process,
        )

    @property
    def exit_code(self) -> int:
        return EXIT_TERMINATED if self.signal_name == "SIGTERM" else EXIT_INTERRUPTED

    def report_lines(self) -> list[str]:
        """What was saved (or that nothing was), for stderr; the CLI adds the command that continues."""
        if not self.is_main_process:
            return []
        if self.phase is not None:
            return [f"interrupted ({self.signal_name}) while {self.phase}: {self.outcome}"]
        lines = [
            f"interrupted ({self.signal_name}) after step {self.step}: "
            + (f"LoRA saved to {self.lora_path}" if self.lora_path is not None else "no LoRA saved")
        ]
        if self.state_path is None:
            lines.append("no resumable state was saved: restart, or resume from the last --save_state checkpoint")
        return lines
