"""The run's report files, written by the main process at every checkpoint, at an interrupt and at the end:
`<output_name>_report.json` (what the run cost and what ran - `library.train.run_report` - plus its history:
every step's loss and group lrs, the validation losses, the LoRA+ diagnostics, the settings, the parameter groups
and the sample prompts, `library.report.history`) and, built from it and the sample images,
`<output_name>_report.html` (`library.report.run_page`).

The history is read from the lists the loop already keeps (`LoopState`), not from a second bookkeeping. A resumed
run keeps the steps of the report it continues, so its page covers the whole training.

A report is there to be looked at: one that cannot be written (a full disk, a figure that fails) is one warning
line, and the run - whose LoRA is what matters - goes on or ends as it would have. The test suite sets
`LORAPLUS_STRICT_REPORTS=1` (tests/conftest.py), under which that error is raised instead, so a bug in the report
fails the test that meets it rather than hiding behind the warning.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, TypeVar

from library.model.compiled import CompileState
from library.report.history import history_section
from library.report.run_page import write_run_report  # imported with the trainer: never half-done by a Ctrl-C
from library.train.grad_sync import sync_summary
from library.train.parts import LoopState, ReportBasis, RunParts
from library.train.run_config import TrainConfig
from library.train.run_report import build_report, peak_memory, write_report
from library.train.sampling import SamplingConfig

T = TypeVar("T")


def report_basis(
    sampling: SamplingConfig | None,
    settings: dict[str, Any],
    *,
    first_step: int,
    started_at: float,
    load_seconds: float,
    earlier_history: dict[str, Any] | None = None,
) -> ReportBasis:
    """The fixed part of the run's report; `sample_prompts[i]` is the prompt of sample index i."""
    prompts = sampling.prompts if sampling is not None else ()
    texts = [""] * (max((p.index for p in prompts), default=-1) + 1)
    for prompt in prompts:
        texts[prompt.index] = prompt.prompt
    return ReportBasis(dict(settings), tuple(texts), first_step, started_at, load_seconds, earlier_history)


def earlier_history(candidates: list[Path]) -> tuple[dict[str, Any] | None, str | None]:
    """(the `history` section of the first report among `candidates` that exists, a warning line when it cannot be
    read). A resumed run passes it on as `earlier`; a report without a history (or none at all) gives None."""
    for path in candidates:
        if not path.is_file():
            continue
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            return None, f"cannot read {path} ({error}): the report starts at the resumed step"
        history = report.get("history") if isinstance(report, dict) else None
        return (history if isinstance(history, dict) else None), None
    return None, None


def history_sections(parts: RunParts, state: LoopState) -> dict[str, Any]:
    """`history`, `settings`, `param_groups` and `sample_prompts` of the report (`history_section`'s schema)."""
    basis, groups = parts.report, parts.group_descriptions
    weight_decay = parts.optimizer.param_groups[0].get("weight_decay")
    return history_section(
        first_step=basis.first_step,
        losses=state.losses,
        lrs={group: [step_lrs[group] for step_lrs in state.lrs] for group in groups},
        validation=state.validation_losses,
        diagnostics=state.diagnostic_values,
        settings=basis.settings,
        param_groups=[{**asdict(info), "weight_decay": weight_decay} for info in parts.groups],
        sample_prompts=basis.sample_prompts,
        earlier=basis.earlier_history,
    )


def compile_report(compiled: CompileState | None, durations: list[float]) -> dict[str, Any] | None:
    """--torch_compile's backend, what ran (it or "eager") and why, and the first step's time (compiling happens
    in it: compare with the median); None without the flag."""
    if compiled is None:
        return None
    return {**compiled.summary(), "first_step_s": round(durations[0], 3) if durations else None}


def run_report(cfg: TrainConfig, parts: RunParts, state: LoopState) -> dict[str, Any]:
    """The content of `<output_name>_report.json` as the run stands: what it cost, what actually ran, its history."""
    accelerator, plan, loop, progress = parts.accelerator, parts.plan, cfg.loop, state.progress
    samples_per_step = loop.batch_size * loop.gradient_accumulation_steps * accelerator.num_processes
    extra = {
        "attention": plan.attention,
        "gradient_checkpointing": cfg.precision.gradient_checkpointing,
        "torch_compile": compile_report(parts.loss.compiled, state.timer.durations),
        "device": str(accelerator.device),
        "processes": accelerator.num_processes,
        "gradient_sync": sync_summary(parts.network.get_trainable_params(), accelerator.num_processes),
        "steps": progress.step,
        "epochs": progress.epochs_run,
        "steps_per_epoch": math.ceil(parts.schedule.batches_per_epoch / loop.gradient_accumulation_steps),
        "cached_latents": loop.cache_latents,
        "cached_text_encoder_outputs": loop.cache_text_encoder_outputs,
        "non_finite_steps_skipped": len(state.non_finite.skipped),
        "load_seconds": round(parts.report.load_seconds, 3),
        "total_seconds": round(time.time() - parts.report.started_at, 3),
        "memory_phases": parts.memory.report(),
        **history_sections(parts, state),
    }
    peak = peak_memory(accelerator.device)  # the run's peak RSS: its phases' highest (each resets the mark)
    peak = replace(peak, rss_bytes=max(peak.rss_bytes, parts.memory.peak()))
    return build_report(state.timer, samples_per_step, peak, plan.summary(), extra)


def write_report_files(
    cfg: TrainConfig, parts: RunParts, state: LoopState
) -> tuple[dict[str, Any] | None, Path | None]:
    """Write the report JSON, then the HTML page from it and the sample images (main process only: the others
    return (None, None)). Returns (the report, the page's path); either is None when it could not be written, after
    one warning line."""
    accelerator, saver = parts.accelerator, parts.saver
    if not accelerator.is_main_process:
        return None, None

    def write_json() -> dict[str, Any]:
        report = run_report(cfg, parts, state)
        write_report(saver.report_path, report)
        return report

    report = _tolerated(accelerator, saver.report_path, write_json)
    if report is None:
        return None, None
    page = _tolerated(
        accelerator, saver.report_page_path, lambda: write_run_report(saver.output_dir, saver.output_name)
    )
    return report, page


def _tolerated(accelerator: Any, path: Path, write: Callable[[], T]) -> T | None:
    """`write()`, or None after one warning line naming `path` when it fails (raised under STRICT_ENV)."""
    try:
        return write()
    except Exception as error:  # noqa: BLE001 - a report never costs the run
        if os.environ.get(STRICT_ENV):
            raise
        accelerator.print(f"warning: {report_problem(path, error)}")
        return None


REPORT_PROBLEM = "could not write the run report"
STRICT_ENV = "LORAPLUS_STRICT_REPORTS"
"""When set (not empty), a report that cannot be written raises instead of warning (the test suite sets it)."""


def report_problem(path: Path, error: BaseException) -> str:
    """The one line a report that could not be written gets."""
    reason = (str(error).strip().splitlines() or [""])[0][:300]
    return f"{REPORT_PROBLEM} {path}: {type(error).__name__}: {reason} (training is not affected)"
