"""Several runs on one page (`tools/compare_runs.py`): their curves overlaid, each run labelled by the settings in
which the runs differ (not by folder name), the validation loss at equal steps, the step at which each run first
reaches the best plain-LoRA run's final validation loss, and the sample grids - one per prompt, rows = runs (in
the order of a chosen setting), columns = sampling points. The figures are also written as PNG files."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from library.errors import UserInputError
from library.files.atomic import write_bytes_atomic, write_text_atomic
from library.report import figures, html
from library.report.run_page import prompt_label
from library.report.samples import SamplePoint
from library.report.sources import RunRecord, read_runs

RATIO_KEYS = ("loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
"""A run is plain LoRA when both are 1 (the trainer records a ratio that is off as 1.0)."""
ALIASES = {"loraplus_lr_ratio": RATIO_KEYS}
"""A setting name the runs do not record, read from the ones that stand for it (the same value in each)."""


@dataclass(frozen=True)
class Comparison:
    runs: list[RunRecord]
    """In page order (sorted by `sort_key` when given)."""
    labels: list[str]
    """Per run: the settings in which the runs differ ("loraplus_lr_ratio=16, unet_lr=0.0002")."""
    differing: list[str]
    """The setting names the labels show."""
    sort_key: str | None = None


@dataclass(frozen=True)
class Reach:
    """When each run first reached the target validation loss (the best plain-LoRA run's final one)."""

    target: float
    plain_label: str
    steps: list[int | None]
    """Per run (page order): the first evaluated step at or below `target`, None when never."""


def compare_runs(paths: Sequence[str | Path], sort: str | None = None) -> Comparison:
    """The runs at `paths` (output folders, report files or TensorBoard logging folders; a folder with several
    runs gives each), labelled and sorted by setting `sort` (numbers in order, runs without it last)."""
    runs = [run for path in paths for run in read_runs(path)]
    if sort is not None:
        if all(setting(run, sort) is None for run in runs):
            known = sorted({key for run in runs for key in run.settings})
            raise UserInputError(
                f"--sort {sort}: no run records that setting; settings: "
                f"{', '.join(known) if known else 'none (the runs have no settings recorded)'}"
            )
        runs = sorted(runs, key=lambda run: _sort_value(setting(run, sort)))
    labels, differing = run_labels(runs)
    return Comparison(runs, labels, differing, sort)


def setting(run: RunRecord, key: str) -> object | None:
    """A run's value of `key`, or of its alias (`loraplus_lr_ratio`: the ratios, when they agree)."""
    if key in run.settings:
        return run.settings[key]
    parts = ALIASES.get(key)
    if parts and all(p in run.settings for p in parts) and len({run.settings[p] for p in parts}) == 1:
        return run.settings[parts[0]]
    return None


def run_labels(runs: Sequence[RunRecord]) -> tuple[list[str], list[str]]:
    """Labels from the settings whose values differ between runs; the two LoRA+ ratios are one
    `loraplus_lr_ratio` when every run has them equal. A run without settings, or runs that differ in no setting,
    are labelled by name; equal labels get their run's name added."""
    with_settings = [run for run in runs if run.settings]
    keys = list(dict.fromkeys(key for run in with_settings for key in run.settings))
    if all(setting(run, "loraplus_lr_ratio") is not None for run in with_settings) and with_settings:
        keys = ["loraplus_lr_ratio" if key == RATIO_KEYS[0] else key for key in keys if key != RATIO_KEYS[1]]
    differing = [key for key in keys if len({_label_value(run, key) for run in with_settings}) > 1]
    labels = []
    for run in runs:
        if run.settings and differing:
            labels.append(", ".join(f"{key}={_label_value(run, key)}" for key in differing))
        else:
            labels.append(run.name)
    counts = {label: labels.count(label) for label in labels}
    labels = [f"{label} ({_place(run)})" if counts[label] > 1 else label for label, run in zip(labels, runs)]
    return labels, differing


def _label_value(run: RunRecord, key: str) -> str:
    """A setting as a label shows it; `network_args` without the LoRA+ ratios (the trainer folds them in, and they
    have settings of their own), so runs that differ only in the ratio are not labelled twice by it."""
    value = setting(run, key)
    if key == "network_args" and isinstance(value, str):
        value = " ".join(arg for arg in value.split() if not arg.startswith("loraplus_"))
    return _format(value)


def is_plain_lora(run: RunRecord) -> bool:
    return all(isinstance(run.settings.get(key), (int, float)) and run.settings[key] == 1.0 for key in RATIO_KEYS)


def reach(comparison: Comparison) -> Reach | None:
    """Against the plain-LoRA run with the lowest final validation loss; None without such a run."""
    plain = [
        (run.history.validation.last(), label)
        for run, label in zip(comparison.runs, comparison.labels)
        if is_plain_lora(run) and run.history.validation.last() is not None
    ]
    if not plain:
        return None
    (_, target), plain_label = min(plain, key=lambda item: item[0][1])
    steps = []
    for run in comparison.runs:
        found = [s for s, v in zip(run.history.validation.steps, run.history.validation.values) if v <= target]
        steps.append(found[0] if found else None)
    return Reach(target, plain_label, steps)


def validation_rows(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per evaluated step (any run), one column per run that has a validation loss: the
    loss there, or blank."""
    runs = [(run, label) for run, label in zip(comparison.runs, comparison.labels) if run.history.validation]
    steps = sorted({s for run, _ in runs for s in run.history.validation.steps})
    rows = []
    for step in steps:
        cells = [run.history.validation.at(step) for run, _ in runs]
        rows.append([str(step), *("" if v is None else f"{v:.5f}" for v in cells)])
    return ["step", *(label for _, label in runs)], rows


def sample_points(runs: Sequence[RunRecord]) -> list[SamplePoint]:
    """Every run's sampling points, in training order (each run's epochs placed at its own steps)."""
    order: dict[SamplePoint, float] = {}
    for run in runs:
        for rank, point in enumerate(run.samples.points(run.steps_per_epoch)):
            position = (
                -1.0
                if point.number == 0
                else point.number * (run.steps_per_epoch or math.inf)
                if point.epoch
                else float(point.number)
            )
            order.setdefault(point, position if math.isfinite(position) else 1e12 + rank)
    return sorted(order, key=lambda p: (order[p], p))


def sample_grids(comparison: Comparison) -> list[tuple[str, list[tuple[str, list[Path | None]]], list[str]]]:
    """Per prompt: (prompt label, rows = (run label, image per point), point labels)."""
    runs = comparison.runs
    points = sample_points(runs)
    prompts = sorted({p for run in runs for p in run.samples.prompts})
    texts = next((run.prompts for run in runs if run.prompts), [])
    grids = []
    for prompt in prompts:
        seeds = {run.samples.seeds.get(prompt) for run in runs if prompt in run.samples.seeds}
        label = prompt_label(texts, prompt, seeds.pop() if len(seeds) == 1 else None)
        rows = [
            (lab, [run.samples.images.get((point, prompt)) for point in points])
            for run, lab in zip(runs, comparison.labels)
            if run.samples
        ]
        grids.append((label, rows, [point.label for point in points]))
    return grids


def comparison_figures(comparison: Comparison) -> dict[str, bytes]:
    """The PNG files the comparison writes (name -> bytes): loss, lr, diagnostics, one sample grid per prompt."""
    runs = list(zip(comparison.labels, (run.history for run in comparison.runs)))
    found = {
        "loss.png": figures.loss_figure(runs),
        "learning_rate.png": figures.lr_figure(runs),
        "lora_diagnostics.png": figures.diagnostics_figure(runs),
    }
    for index, (label, rows, columns) in enumerate(sample_grids(comparison)):
        found[f"samples_prompt{index:02d}.png"] = figures.sample_grid_figure(rows, columns, label)
    return {name: png for name, png in found.items() if png is not None}


def build_comparison_page(comparison: Comparison, pngs: dict[str, bytes]) -> str:
    runs, labels = comparison.runs, comparison.labels
    overview = html.table(
        ("run", "source", "steps", "final loss (mean of last 20)", "final validation loss", "what it lacks"),
        [
            (
                label,
                str(run.source) if run.name == run.source.name else f"{run.source} ({run.name})",
                _steps(run),
                _final_loss(run),
                _final_validation(run),
                "; ".join(run.notes) or "-",
            )
            for run, label in zip(runs, labels)
        ],
    )
    header, validation = validation_rows(comparison)
    sections = [
        ("Runs", html.paragraph(_labels_note(comparison)) + overview),
        ("Loss", _figure(pngs, "loss.png", "training loss (smoothed) and validation loss of each run")),
        (
            "Validation loss at equal steps",
            html.table(header, validation, numeric=range(1, len(header)))
            if validation
            else html.paragraph("No run has a validation loss."),
        ),
        ("Reaching the plain-LoRA validation loss", _reach_section(comparison)),
        ("Learning rate", _figure(pngs, "learning_rate.png", "learning rate of every group of each run")),
        ("LoRA diagnostics", _figure(pngs, "lora_diagnostics.png", "LoRA diagnostics of each run")),
        ("Samples", _samples_section(comparison)),
        ("Settings", _settings_table(comparison)),
    ]
    return html.page(
        "Run comparison",
        f"{len(runs)} runs" + (f", sorted by {comparison.sort_key}" if comparison.sort_key else ""),
        sections,
    )


def write_comparison(comparison: Comparison, out_dir: str | Path) -> Path:
    """`out_dir/compare.html` and the figures as PNG beside it; returns the page's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = comparison_figures(comparison)
    for name, png in pngs.items():
        write_bytes_atomic(out_dir / name, png, what="comparison figure")
    page = out_dir / "compare.html"
    write_text_atomic(page, build_comparison_page(comparison, pngs), what="comparison page")
    return page


def _reach_section(comparison: Comparison) -> str:
    found = reach(comparison)
    if found is None:
        return html.paragraph(
            "No plain-LoRA run (LoRA+ ratio 1) with a validation loss among these runs: nothing to measure against."
        )
    plain_index = comparison.labels.index(found.plain_label)
    plain_step = found.steps[plain_index]
    rows = []
    for run, label, step in zip(comparison.runs, comparison.labels, found.steps):
        if not run.history.validation:
            rows.append((label, "no validation loss", ""))
        elif step is None:
            best = (
                min(v for v in run.history.validation.values if math.isfinite(v))
                if any(math.isfinite(v) for v in run.history.validation.values)
                else math.nan
            )
            rows.append((label, f"not reached (best {best:.5f})", ""))
        else:
            rows.append((label, str(step), f"{plain_step / step:.2f}x" if plain_step and step else ""))
    intro = html.paragraph(
        f"Target: {found.target:.5f}, the final validation loss of the best plain-LoRA run "
        f"({found.plain_label}). Steps are those at which validation ran."
    )
    return intro + html.table(
        ("run", "first step at or below the target", "speed-up vs that run"), rows, numeric=(1, 2)
    )


def _samples_section(comparison: Comparison) -> str:
    grids = sample_grids(comparison)
    if not grids:
        return html.paragraph("No run has sample images.")
    missing = [label for run, label in zip(comparison.runs, comparison.labels) if not run.samples]
    parts = [f"<h3>{html.escape(label)}</h3>" + html.image_grid(rows, columns) for label, rows, columns in grids]
    return (html.paragraph("Runs without samples: " + "; ".join(missing)) if missing else "") + "".join(parts)


def _settings_table(comparison: Comparison) -> str:
    runs = [run for run in comparison.runs if run.settings]
    if not runs:
        return ""
    keys = list(dict.fromkeys(key for run in runs for key in run.settings))
    rows = [(key, *(_format(run.settings.get(key)) for run in comparison.runs)) for key in keys]
    return html.paragraph("Every recorded setting; the labels use those that differ.") + html.table(
        ("setting", *comparison.labels), rows
    )


def _labels_note(comparison: Comparison) -> str:
    if comparison.differing:
        return "Runs are labelled by the settings in which they differ: " + ", ".join(comparison.differing) + "."
    return "The runs differ in no recorded setting (or record none): they are labelled by name."


def _figure(pngs: dict[str, bytes], name: str, alt: str) -> str:
    return html.figure(pngs[name], alt) if name in pngs else html.paragraph("No run has this.")


def _steps(run: RunRecord) -> str:
    last = run.history.loss.last()
    return str(last[0]) if last else str(run.cost.get("steps", "-"))


def _final_loss(run: RunRecord) -> str:
    finite = [v for v in run.history.loss.values[-20:] if math.isfinite(v)]
    return f"{sum(finite) / len(finite):.5f}" if finite else "-"


def _final_validation(run: RunRecord) -> str:
    last = run.history.validation.last()
    return f"{last[1]:.5f} (step {last[0]})" if last else "-"


def _format(value: object) -> str:
    if value is None:
        return "?"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _sort_value(value: object) -> tuple[int, float, str]:
    if value is None:
        return (2, 0.0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def _place(run: RunRecord) -> str:
    return f"{run.source.name}/{run.name}" if run.source.name != run.name else run.name
