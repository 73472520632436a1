"""The report's figures as PNG bytes (matplotlib, Agg backend: no display, no network, fonts shipped with
matplotlib). Each takes one or several runs as (label, history) and returns None when there is nothing to draw,
so a page shows what a run has and says what it has not.

Colours follow the runs (one per run, in the order given); line styles follow what is drawn inside a run
(raw / smoothed loss, base / plus groups, text encoders / UNet)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: never a display, whatever MPLBACKEND says
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from library.report.history import RunHistory, Series  # noqa: E402
from library.report.samples import thumbnail  # noqa: E402

Runs = Sequence[tuple[str, RunHistory]]
DPI = 100
METRICS = ("norm_A", "norm_B", "delta", "update")
"""Diagnostic panels: ||A||_F, ||B||_F, ||(alpha/r) B A||_F, and the step's update relative to the weights."""
_METRIC_TITLES = {
    "norm_A": "‖A‖ (down)",
    "norm_B": "‖B‖ (up)",
    "delta": "‖ΔW‖ = ‖(α/r)·B·A‖",
    "update": "update ‖Δ‖/‖W‖ per step: A solid, B dashed",
}
_COMPONENT_STYLES = {"te1": ":", "te2": "-.", "unet": "-"}
_COMPONENT_MARKERS = {"te1": "^", "te2": "s", "unet": "o"}


def colours(count: int) -> list[str]:
    """One colour per run (matplotlib's tab10, then tab20 for more runs)."""
    cycle = plt.get_cmap("tab10" if count <= 10 else "tab20")
    return [matplotlib.colors.to_hex(cycle(i % cycle.N)) for i in range(count)]


def smooth(values: Sequence[float], window: int) -> list[float]:
    """The trailing mean of the finite values among the last `window` (NaN where none is finite)."""
    out, total, count = [], 0.0, 0
    finite = [v if math.isfinite(v) else None for v in values]
    for i, value in enumerate(finite):
        if value is not None:
            total, count = total + value, count + 1
        if i >= window and finite[i - window] is not None:
            total, count = total - finite[i - window], count - 1
        out.append(total / count if count else math.nan)
    return out


def smoothing_window(steps: int) -> int:
    """About a twentieth of the run, at least 5 steps (a short run's curve is otherwise not smoothed at all: the
    demo's 28 steps gave a window of 1) and at most 100 (the trainer's loss/average uses 100); never more than the
    run has."""
    return max(1, min(steps, max(5, min(100, steps // 20))))


def loss_figure(runs: Runs) -> bytes | None:
    """Training loss (faint: every step; solid: smoothed) and validation loss (dashed, dots) against steps."""
    drawn = [(label, h) for label, h in runs if h.loss or h.validation]
    if not drawn:
        return None
    figure, axes = _figure()
    single = len(runs) == 1
    for colour, (label, history) in zip(colours(len(runs)), runs):
        if not (history.loss or history.validation):
            continue
        loss = history.loss
        if loss:
            window = smoothing_window(len(loss.steps))
            axes.plot(
                loss.steps,
                loss.values,
                color=colour,
                alpha=0.25 if single else 0.12,
                linewidth=0.8,
                label="loss (each step)" if single else None,
            )
            axes.plot(
                loss.steps,
                smooth(loss.values, window),
                color=colour,
                linewidth=1.8,
                label=f"loss (mean of {window} steps)" if single else label,
            )
        if history.validation:
            axes.plot(
                history.validation.steps,
                history.validation.values,
                color=colour,
                linestyle="--",
                marker="o",
                markersize=4,
                linewidth=1.4,
                label="validation loss" if single else f"{label} (validation)",
            )
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title("Loss")
    return _finish(figure, axes)


def lr_figure(runs: Runs) -> bytes | None:
    """The learning rate of every optimizer group (log scale, so LoRA+'s plus groups sit at their ratio)."""
    if not any(series for _, h in runs for series in h.lr.values()):
        return None
    figure, axes = _figure()
    single = len(runs) == 1
    group_colours = colours(max(len(h.lr) for _, h in runs))
    for colour, (_, history) in zip(colours(len(runs)), runs):
        for index, (group, series) in enumerate(history.lr.items()):
            if not series:
                continue
            axes.plot(
                series.steps,
                series.values,
                color=group_colours[index] if single else colour,
                linestyle="--" if group.endswith(" plus") else "-",
                linewidth=1.5,
                label=group if single else None,
            )
    if any(v > 0 for _, h in runs for series in h.lr.values() for v in series.values):  # warm-up starts at 0
        axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("learning rate")
    axes.set_title("Learning rate per parameter group (dashed: LoRA+ B groups)")
    if not single:
        _run_legend(axes, runs, lambda h: any(h.lr.values()), {"base (A) groups": "-", "plus (B) groups": "--"})
    return _finish(figure, axes)


def diagnostics_figure(runs: Runs) -> bytes | None:
    """LoRA+ diagnostics per component (te1, te2, unet): ‖A‖, ‖B‖, ‖ΔW‖ and the relative update per step of A
    and B. B starts at zero: at plain LoRA it grows slowly; at a too-high ratio its update stays large."""
    if not any(h.diagnostics for _, h in runs):
        return None
    figure = Figure(figsize=(11, 7), dpi=DPI, layout="constrained")
    panels = figure.subplots(2, 2).ravel()
    single = len(runs) == 1
    for colour, (_, history) in zip(colours(len(runs)), runs):
        for component in components(history):
            # One run: a colour per component. Several: a colour per run, a line style (update: a marker) per
            # component, and one legend of runs and components.
            line_colour = _component_colour(component) if single else colour
            style = "-" if single else _COMPONENT_STYLES.get(component, "-")
            marker = "." if single else _COMPONENT_MARKERS.get(component, ".")
            for axes, metric in zip(panels, METRICS):
                parts = (("A", "-"), ("B", "--")) if metric == "update" else ((None, style),)
                for part, dash in parts:
                    name = f"lora/{component}/{metric}" if part is None else f"lora/{component}/update_{part}"
                    series = history.diagnostics.get(name)
                    if series:
                        axes.plot(
                            series.steps,
                            series.values,
                            color=line_colour,
                            linestyle=dash,
                            marker=marker if metric == "update" else ".",
                            markersize=4,
                            label=component + (f" {part}" if part else "") if single else None,
                        )
    for axes, metric in zip(panels, METRICS):
        axes.set_title(_METRIC_TITLES[metric], fontsize=10)
        axes.set_xlabel("step")
        if any(line.get_ydata().size and (line.get_ydata() > 0).any() for line in axes.get_lines()):
            axes.set_yscale("log")
        axes.grid(alpha=0.3)
        if single and axes.get_lines():
            axes.legend(fontsize=7)
    if not single:
        shown = sorted(
            {c for _, h in runs for c in components(h) if c in _COMPONENT_STYLES}, key=list(_COMPONENT_STYLES).index
        )
        _run_legend(
            panels[0], runs, lambda h: bool(h.diagnostics), {c: _COMPONENT_STYLES[c] for c in shown}, figure=figure
        )
    return _png(figure)


def _run_legend(axes, runs: Runs, present, styles: dict[str, str], figure: Figure | None = None) -> None:
    """One legend entry per run drawn (`present(history)`; its colour) and one per line style (black), instead of
    runs x styles."""
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=colour, linewidth=2, label=label)
        for colour, (label, history) in zip(colours(len(runs)), runs)
        if present(history)
    ]
    handles += [Line2D([], [], color="#333", linestyle=style, label=name) for name, style in styles.items()]
    if figure is not None:
        figure.legend(handles=handles, loc="outside right upper", fontsize=8)
    else:
        axes.legend(handles=handles, fontsize=8)


def block_figure(history: RunHistory, block_weights: dict[int, float] | None = None) -> bytes | None:
    """Per UNet block (block lr weights on): ‖B‖ and ‖ΔW‖ at the last diagnostic step, bars per block, with the
    block's lr weight written over it."""
    blocks = sorted(int(c[len("unet_block") :]) for c in components(history) if c.startswith("unet_block"))
    if not blocks:
        return None
    figure, axes = _figure()
    width = 0.4
    for offset, metric in ((-width / 2, "norm_B"), (width / 2, "delta")):
        values = []
        for block in blocks:
            last = history.diagnostics.get(f"lora/unet_block{block:02d}/{metric}", Series()).last()
            values.append(last[1] if last else math.nan)
        axes.bar([b + offset for b in blocks], values, width, label=_METRIC_TITLES[metric])
    if block_weights:
        for block in blocks:
            if block in block_weights:
                axes.annotate(
                    f"w={block_weights[block]:g}",
                    (block, 0),
                    xytext=(0, -28),
                    textcoords="offset points",
                    ha="center",
                    fontsize=7,
                )
    axes.set_xticks(blocks)
    axes.set_xlabel("UNet block (sd-scripts number)")
    axes.set_title("LoRA per UNet block at the last diagnostic step")
    return _finish(figure, axes)


def sample_grid_figure(
    rows: Sequence[tuple[str, Sequence[Path | None]]], columns: Sequence[str], title: str = ""
) -> bytes | None:
    """A grid of sample images: one row per label, one column per sampling point; an empty cell where an image
    is missing. Images are shown at their own aspect, one inch and a half per cell."""
    if not rows or not columns or not any(path for _, paths in rows for path in paths):
        return None
    cell = 1.6
    figure = Figure(figsize=(1.4 + cell * len(columns), 0.6 + cell * len(rows)), dpi=DPI, layout="constrained")
    grid = figure.subplots(len(rows), len(columns), squeeze=False)
    for r, (label, paths) in enumerate(rows):
        for c, path in enumerate(paths):
            axes = grid[r][c]
            axes.set_xticks([])
            axes.set_yticks([])
            if path is not None:
                axes.imshow(thumbnail(path))
            else:
                axes.text(0.5, 0.5, "no sample", ha="center", va="center", fontsize=8, color="#888")
            if r == 0:
                axes.set_title(columns[c], fontsize=9)
            if c == 0:
                axes.set_ylabel(_wrap(label, 22), fontsize=8, rotation=0, ha="right", va="center")
    if title:
        figure.suptitle(title, fontsize=10)
    return _png(figure)


def components(history: RunHistory) -> list[str]:
    """The components with diagnostics (te1, te2, unet, unet_block05, ...), in that order."""
    found = {name.split("/")[1] for name in history.diagnostics if name.startswith("lora/") and name.count("/") == 2}
    return sorted(found, key=lambda c: (["te1", "te2", "unet"].index(c) if c in ("te1", "te2", "unet") else 3, c))


def _component_colour(component: str) -> str:
    return {"te1": "#2ca02c", "te2": "#9467bd", "unet": "#1f77b4"}.get(component, "#7f7f7f")


def _figure() -> tuple[Figure, object]:
    figure = Figure(figsize=(9, 4.5), dpi=DPI, layout="constrained")
    return figure, figure.subplots()


def _finish(figure: Figure, axes) -> bytes:
    axes.grid(alpha=0.3)
    if axes.get_legend() is None and axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8)
    return _png(figure)


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    return "\n".join(lines[:4]) + ("..." if len(lines) > 4 else "")
