"""`<output_dir>/<output_name>_report.html`: one run on one page - loss (raw, smoothed, validation), the learning
rate of every parameter group, the LoRA+ diagnostics, the sample images (prompts down, sampling points across),
the parameter groups, the settings that ran, and the step time and peak memory - all read from the run's
`<output_name>_report.json` and `sample/` folder (`library.report.sources`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from library.files.atomic import write_text_atomic
from library.report import figures, html
from library.report.sources import RunRecord, read_output_run

REPORT_HTML_SUFFIX = "_report.html"


def write_run_report(output_dir: str | Path, output_name: str) -> Path:
    """Build the run's HTML report from its files and write it atomically beside them; returns its path.

    Called at each save and at the end of training (after `<output_name>_report.json` is written), so the page
    always shows the run up to its last save."""
    output_dir = Path(output_dir)
    target = output_dir / f"{output_name}{REPORT_HTML_SUFFIX}"
    write_text_atomic(target, build_run_page(read_output_run(output_dir, output_name)), what="run report page")
    return target


def build_run_page(run: RunRecord) -> str:
    history = run.history
    runs = [(run.name, history)]
    sections = [
        ("What this report lacks", html.notes(run.notes)),
        ("Loss", _figure(figures.loss_figure(runs), "training and validation loss against steps")),
        ("Learning rate", _figure(figures.lr_figure(runs), "learning rate of every parameter group")),
        ("LoRA diagnostics", _diagnostics(run)),
        ("Samples", sample_table(run)),
        ("Parameter groups", param_group_table(run.param_groups)),
        ("Settings", settings_table(run.settings)),
        ("Cost", cost_table(run.cost)),
    ]
    return html.page(f"Run report: {run.name}", _summary(run), sections)


def _summary(run: RunRecord) -> str:
    parts = [str(run.source)]
    last = run.history.loss.last()
    if last:
        parts.append(f"{last[0]} steps")
    if run.cost.get("steps") is not None and not last:
        parts.append(f"{run.cost['steps']} steps")
    val = run.history.validation.last()
    if val:
        parts.append(f"validation loss {val[1]:.4g} at step {val[0]}")
    return " - ".join(parts)


def _figure(png: bytes | None, alt: str) -> str:
    return html.figure(png, alt) if png else ""


def _diagnostics(run: RunRecord) -> str:
    main = figures.diagnostics_figure([(run.name, run.history)])
    if main is None:
        return ""
    text = html.paragraph(
        "Frobenius norms of A (lora_down) and B (lora_up) and of the weight change ΔW = (α/r)·B·A per component, "
        "and each logged step's update relative to the weights (‖ΔA‖/‖A‖, ‖ΔB‖/‖B‖). B starts at zero: at plain "
        "LoRA (ratio 1) ‖B‖ and ‖ΔW‖ grow slowly; with a LoRA+ ratio B's update is larger by about the ratio; a "
        "B update that stays large while the loss does not fall says the ratio is too high."
    )
    blocks = figures.block_figure(run.history, block_weights(run.param_groups, run.settings))
    return text + html.figure(main, "LoRA diagnostics") + (html.figure(blocks, "LoRA per UNet block") if blocks else "")


def block_weights(groups: list[dict[str, Any]], settings: Mapping[str, Any]) -> dict[int, float] | None:
    """Each UNet block's lr weight (its base group's lr / the UNet lr), when the groups are split by block."""
    unet_lr = settings.get("unet_lr")
    if not isinstance(unet_lr, (int, float)) or not unet_lr:
        return None
    weights = {
        int(g["block"]): float(g["lr"]) / unet_lr
        for g in groups
        if g.get("block") is not None and not g.get("plus") and isinstance(g.get("lr"), (int, float))
    }
    return weights or None


def sample_table(run: RunRecord) -> str:
    """Prompts down, sampling points across (an empty cell where an image is missing)."""
    samples = run.samples
    if not samples:
        return ""
    points = samples.points(run.steps_per_epoch)
    rows = [
        (
            prompt_label(run.prompts, index, samples.seeds.get(index)),
            [samples.images.get((point, index)) for point in points],
        )
        for index in samples.prompts
    ]
    return html.image_grid(rows, [point.label for point in points])


def prompt_label(prompts: list[str], index: int, seed: int | None) -> str:
    text = prompts[index] if index < len(prompts) else f"prompt {index}"
    return f"{text} (seed {seed})" if seed is not None else text


def param_group_table(groups: list[dict[str, Any]]) -> str:
    if not groups:
        return ""
    rows = [
        (
            g.get("component", ""),
            "-" if g.get("block") is None else g["block"],
            "plus (B)" if g.get("plus") else "base",
            g.get("tensors", ""),
            _count(g.get("parameters")),
            _number(g.get("lr")),
            _number(g.get("weight_decay")),
        )
        for g in groups
    ]
    return html.table(
        ("component", "block", "group", "tensors", "parameters", "lr", "weight decay"), rows, numeric=(3, 4, 5, 6)
    )


def settings_table(settings: Mapping[str, Any]) -> str:
    if not settings:
        return ""
    return html.table(("setting", "value"), [(k, _number(v)) for k, v in settings.items()])


def cost_table(cost: Mapping[str, Any]) -> str:
    """Step time, throughput, peak memory and what ran, from the report's own fields."""
    if not cost:
        return ""
    rows: list[tuple[str, str]] = []
    step = cost.get("step_time_s") or {}
    if step.get("median") is not None:
        rows.append(
            (
                "step time (median)",
                f"{step['median'] * 1000:.1f} ms over {step.get('measured_steps')} steps ({step.get('excludes', '')})",
            )
        )
    if cost.get("samples_per_s") is not None:
        rows.append(("throughput", f"{cost['samples_per_s']:.2f} samples/s ({cost.get('samples_per_step')} per step)"))
    memory = cost.get("peak_memory") or {}
    if memory.get("rss_bytes") is not None:
        rows.append(("peak RAM (process)", _gib(memory["rss_bytes"], memory.get("ram_limit_bytes"))))
    if memory.get("cuda_allocated_bytes") is not None:
        rows.append(("peak GPU memory (tensors)", _gib(memory["cuda_allocated_bytes"], memory.get("cuda_total_bytes"))))
    if memory.get("cuda_reserved_bytes") is not None:
        rows.append(("peak GPU memory (reserved)", _gib(memory["cuda_reserved_bytes"], memory.get("cuda_total_bytes"))))
    sync = cost.get("gradient_sync") or {}
    collectives = sync.get("collectives_per_step")
    if collectives:
        rows.append(
            (
                "gradient sync",
                f"{sync.get('tensors')} tensors ({sync.get('bytes', 0) / 2**20:.1f} MiB) averaged over processes in "
                f"{collectives} collective{'s' if collectives != 1 else ''} per step",
            )
        )
    rows.extend(memory_phase_rows(cost.get("memory_phases")))
    for key, value in (cost.get("precision") or {}).items():
        rows.append((f"precision: {key}", str(value)))
    for key in (
        "attention",
        "gradient_checkpointing",
        "device",
        "processes",
        "steps",
        "epochs",
        "cached_latents",
        "cached_text_encoder_outputs",
        "non_finite_steps_skipped",
        "load_seconds",
        "total_seconds",
    ):
        if key in cost:
            rows.append((key.replace("_", " "), str(cost[key])))
    rows.extend(("warning", line) for line in cost.get("warnings") or [])
    return html.table(("", ""), rows) if rows else ""


def memory_phase_rows(phases: Any) -> list[tuple[str, str]]:
    """One row per phase of the run (load, cache, set-up, train, in order) with its peak RAM and what it did."""
    if not isinstance(phases, Mapping) or not isinstance(phases.get("phases"), list):
        return []
    cumulative = not str(phases.get("method", "")).startswith("per phase")
    rows = []
    for phase in phases["phases"]:
        if not isinstance(phase, Mapping) or not isinstance(phase.get("peak_rss_bytes"), int):
            continue
        what = f" ({phase['what']})" if phase.get("what") else ""
        label = f"peak RAM: {phase.get('phase')}{what}{' (peak so far)' if cumulative else ''}"
        rows.append((label, _gib(phase["peak_rss_bytes"], None)))
    return rows


def _gib(used: int, limit: int | None) -> str:
    text = f"{used / 2**30:.2f} GiB"
    return f"{text} of {limit / 2**30:.1f} GiB" if limit else text


def _number(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else _number(value)
