"""Peak RAM of each phase of a run (start, load, cache, set-up, train), for the run report: where memory goes.

The process's peak resident set (`run_report.peak_rss_bytes`) only says how high a run went, not when. On Linux the
kernel's high-water mark (VmHWM) is reset to the current RSS at each phase's start (writing "5" to
/proc/self/clear_refs), so each phase's number is that phase's own peak and the run's peak is their maximum. Where
the mark cannot be reset (Windows, macOS, a kernel that refuses), each phase gets the process's peak so far
("cumulative"): the first phase whose number equals the run's peak is the one that set it.

A caller of the in-process API that reads VmHWM itself after `train` sees the last phase's peak, not the run's: the
run's is in the report (`peak_memory`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from library.train.run_report import peak_rss_bytes

CLEAR_REFS = Path("/proc/self/clear_refs")
RESET_PEAK = "5"
"""clear_refs' code that resets the peak RSS (Linux >= 4.0)."""
KINDS = ("start", "load", "cache", "set-up", "train")
"""The phases a run goes through; a staged load enters "load" and "cache" more than once."""


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS; False where that is not possible."""
    try:
        CLEAR_REFS.write_text(RESET_PEAK, encoding="ascii")
    except OSError:
        return False
    return True


@dataclass
class MemoryPhases:
    """The peak RSS of every phase entered so far, in order (a phase may recur: load, cache, load, ...)."""

    per_phase: bool = False
    """True when each phase's peak is its own (the mark reset at its start), False when cumulative."""
    phases: list[tuple[str, str, int]] = field(default_factory=list)
    """(kind, what, peak RSS bytes) of every finished phase."""
    _current: tuple[str, str] | None = None

    def enter(self, kind: str, what: str = "") -> None:
        """Close the current phase (recording its peak) and start `kind` (one of `KINDS`), `what` saying more
        (e.g. the components a load reads)."""
        if kind not in KINDS:
            raise ValueError(f"unknown memory phase {kind!r} (use {list(KINDS)})")
        self._close()
        reset = reset_peak_rss()
        self.per_phase = reset and (self.per_phase or not self.phases)  # every reset so far worked
        self._current = (kind, what)

    def _close(self) -> None:
        if self._current is not None:
            self.phases.append((*self._current, peak_rss_bytes()))
            self._current = None

    def snapshot(self) -> list[tuple[str, str, int]]:
        """Every phase so far, the current one with its peak up to now."""
        current = [(*self._current, peak_rss_bytes())] if self._current is not None else []
        return [*self.phases, *current]

    def peak(self) -> int:
        """The highest peak of any phase (0 before the first)."""
        return max((peak for _, _, peak in self.snapshot()), default=0)

    def report(self) -> dict[str, Any]:
        """The run report's `memory_phases`: each phase in order, and the highest peak of each kind."""
        phases = self.snapshot()
        by_kind: dict[str, int] = {}
        for kind, _, peak in phases:
            by_kind[kind] = max(by_kind.get(kind, 0), peak)
        return {
            "method": "per phase (peak reset at each phase)" if self.per_phase else "cumulative (peak so far)",
            "phases": [{"phase": kind, "what": what, "peak_rss_bytes": peak} for kind, what, peak in phases],
            "peak_rss_bytes": by_kind,
        }
