"""The per-run report (`<output_name>_report.json`): step time, throughput, peak memory and what precision and
attention actually ran, so runs (and LoRA+ ratios) can be compared on cost as well as loss."""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

from library.files.atomic import write_text_atomic

NEAR_LIMIT = 0.9
"""Warn when a peak passes this share of the machine's (or container's) memory."""
_CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


@dataclass
class StepTimer:
    """Wall time of each optimizer step: from the end of the previous step (or `restart`) to the end of this one,
    so data loading counts and time spent saving or sampling between steps (followed by `restart`) does not."""

    durations: list[float] = field(default_factory=list)
    _last: float | None = None

    def restart(self) -> None:
        self._last = time.perf_counter()

    def step_done(self) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.durations.append(now - self._last)
        self._last = now

    def median(self) -> float | None:
        return statistics.median(self.durations) if self.durations else None


@dataclass(frozen=True)
class MemoryPeak:
    rss_bytes: int
    """This process's peak resident set (CPU RAM), loading included."""
    ram_limit_bytes: int | None
    """Physical RAM, or the container's limit when lower."""
    cuda_bytes: int | None = None
    """Peak CUDA memory allocated by tensors since the training loop started (`reset_cuda_peak`; None without a
    GPU)."""
    cuda_total_bytes: int | None = None
    """The GPU's memory."""
    cuda_reserved_bytes: int | None = None
    """Peak CUDA memory held by torch's caching allocator over the same time: what the GPU had to have free."""


def ram_limit_bytes() -> int | None:
    """Physical memory (psutil, any OS), or the Linux cgroup's memory limit when one is set and lower."""
    try:
        limit: int | None = int(psutil.virtual_memory().total)
    except (OSError, RuntimeError):
        limit = None
    for path in _CGROUP_LIMITS:
        try:
            text = path.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            continue
        if text.isdigit() and (limit is None or int(text) < limit):
            limit = int(text)
    return limit


def peak_rss_bytes() -> int:
    """This process's own peak resident memory, by what each OS offers: VmHWM from /proc on Linux (``ru_maxrss``
    of a child started from a big parent can carry the parent's peak), psutil's peak working set on Windows,
    ``ru_maxrss`` elsewhere (macOS, BSD), and the current RSS (a lower bound) when none of them is there."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    info = psutil.Process().memory_info()
    if hasattr(info, "peak_wset"):  # Windows
        return int(info.peak_wset)
    try:
        import resource  # Unix only, hence imported here
    except ImportError:
        return int(info.rss)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)  # bytes on macOS, KiB on Linux and BSD


def reset_cuda_peak(device: torch.device) -> None:
    """Start the GPU memory peaks afresh when the training loop starts, so loading and caching (which may hold
    models the steps never need) are not reported as the training's peak."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> MemoryPeak:
    rss = peak_rss_bytes()
    cuda = cuda_total = cuda_reserved = None
    if device.type == "cuda":
        cuda = torch.cuda.max_memory_allocated(device)
        cuda_reserved = torch.cuda.max_memory_reserved(device)
        cuda_total = torch.cuda.get_device_properties(device).total_memory
    return MemoryPeak(rss, ram_limit_bytes(), cuda, cuda_total, cuda_reserved)


def memory_warnings(peak: MemoryPeak) -> list[str]:
    """One line per memory that came within `NEAR_LIMIT` of its limit."""
    warnings = []
    for name, used, limit, advice in (
        ("RAM", peak.rss_bytes, peak.ram_limit_bytes, "--fp8_base, --cache_latents, --lowram"),
        (
            "GPU memory",
            peak.cuda_reserved_bytes if peak.cuda_reserved_bytes is not None else peak.cuda_bytes,
            peak.cuda_total_bytes,
            "--fp8_base, --gradient_checkpointing, --cache_text_encoder_outputs, a smaller --train_batch_size",
        ),
    ):
        if used is not None and limit and used > NEAR_LIMIT * limit:
            warnings.append(
                f"peak {name} {used / 2**30:.2f} GiB is {used / limit:.0%} of the {limit / 2**30:.2f} GiB "
                f"available: close to running out; consider {advice}"
            )
    return warnings


def build_report(
    timer: StepTimer, samples_per_step: int, peak: MemoryPeak, precision: dict[str, Any], extra: dict[str, Any]
) -> dict[str, Any]:
    """The report's content (plain JSON types)."""
    median = timer.median()
    durations = timer.durations
    return {
        "step_time_s": {
            "median": median,
            "mean": statistics.fmean(durations) if durations else None,
            "min": min(durations, default=None),
            "max": max(durations, default=None),
            "measured_steps": len(durations),
            "excludes": "saving, sampling and validation; includes data loading",
        },
        "samples_per_step": samples_per_step,
        "samples_per_s": samples_per_step / median if median else None,
        "peak_memory": {
            "rss_bytes": peak.rss_bytes,
            "rss_gib": round(peak.rss_bytes / 2**30, 3),
            "ram_limit_bytes": peak.ram_limit_bytes,
            "cuda_allocated_bytes": peak.cuda_bytes,
            "cuda_reserved_bytes": peak.cuda_reserved_bytes,
            "cuda_total_bytes": peak.cuda_total_bytes,
            "cuda_since": "the training loop started (loading and caching excluded)",
        },
        "precision": precision,
        **extra,
        "warnings": memory_warnings(peak),
    }


def write_report(path: Path, report: dict[str, Any]) -> Path:
    write_text_atomic(path, json.dumps(report, indent=2) + "\n", what="run report")
    return path
