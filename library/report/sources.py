"""Runs as the report and the comparison see them, read from what a run wrote:

- an output folder: `<output_name>_report.json` (its history, settings, parameter groups and costs), else the
  older files (`<output_name>_param_groups.json`), and the sample images in `sample/`; a folder that holds
  several runs (output names) gives one run each;
- a report file `<output_name>_report.json` itself (that run only);
- a TensorBoard logging folder (`--logging_dir`, or one run's folder under it): each folder holding event files
  is one run, its curves read from the scalars the trainer logs (`loss`, `loss/validation`, `lr/<group>`,
  `lora/...`) and its settings from the HParams record.

What a run lacks (no history, no validation, no samples) is said in its `notes`, never an error: older runs and
runs without validation still compare on what they have. A file that is there but damaged is an error.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from library.errors import UserInputError
from library.report.history import (
    HistoryError,
    RunHistory,
    Scalar,
    Series,
    parse_history,
    parse_param_groups,
    parse_prompts,
    parse_settings,
)
from library.report.samples import SampleSet, find_samples, output_names_with_samples

REPORT_SUFFIX = "_report.json"
PARAM_GROUPS_SUFFIX = "_param_groups.json"
_EVENTS = "events.out.tfevents.*"


@dataclass(frozen=True)
class RunRecord:
    """One run, from whichever files it left."""

    name: str
    """Its output name, or its logging folder's path relative to the folder given."""
    source: Path
    history: RunHistory = field(default_factory=RunHistory)
    settings: dict[str, Scalar] = field(default_factory=dict)
    param_groups: list[dict[str, Any]] = field(default_factory=list)
    cost: dict[str, Any] = field(default_factory=dict)
    """The rest of the report (step time, throughput, peak memory, precision, steps, epochs)."""
    samples: SampleSet = field(default_factory=SampleSet)
    prompts: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """What this run's files do not have, one line each."""

    @property
    def steps_per_epoch(self) -> float | None:
        """The report's own figure (runs that record it), else steps / epochs of a finished run."""
        recorded = self.cost.get("steps_per_epoch")
        if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded > 0:
            return float(recorded)
        steps, epochs = self.cost.get("steps"), self.cost.get("epochs")
        return steps / epochs if isinstance(steps, int) and isinstance(epochs, int) and epochs > 0 else None


def read_runs(path: str | Path) -> list[RunRecord]:
    """Every run at `path` (see the module docstring); UserInputError when there is none or a file is damaged."""
    path = Path(path)
    if path.is_file() and path.name.endswith(REPORT_SUFFIX):
        return [read_output_run(path.parent, path.name[: -len(REPORT_SUFFIX)])]
    if not path.is_dir():
        raise UserInputError(
            f"{path} is not a folder: give a training output folder (with <output_name>_report.json),"
            " a report file, or a TensorBoard logging folder"
        )
    names = _output_names(path)
    if names:
        return [read_output_run(path, name) for name in names]
    event_folders = sorted({event.parent for event in path.rglob(_EVENTS)})
    if event_folders:
        return [read_tensorboard_run(folder, _relative_name(folder, path)) for folder in event_folders]
    raise UserInputError(
        f"no run found in {path}: it has no <output_name>_report.json, no sample images and no "
        "TensorBoard event files; give a training output folder or a logging folder"
    )


def read_output_run(output_dir: Path, output_name: str) -> RunRecord:
    """The run `output_name` of `output_dir`, from its report JSON (when there is one) and its samples."""
    report_path = output_dir / f"{output_name}{REPORT_SUFFIX}"
    notes: list[str] = []
    report = _read_json(report_path) if report_path.is_file() else None
    history, settings, groups, prompts, cost = RunHistory(), {}, [], [], {}
    if report is None:
        notes.append(f"no {report_path.name}: no curves, settings or costs (the run did not finish a report)")
    else:
        if not isinstance(report, dict):
            raise UserInputError(f"{report_path} is not a run report (a JSON object): remove it or give another run")
        try:
            if "history" in report:
                history = parse_history(report["history"])
            else:
                notes.append(f"{report_path.name} has no training history (written before reports kept one): no curves")
            settings = parse_settings(report.get("settings"))
            groups = parse_param_groups(report.get("param_groups"))
            prompts = parse_prompts(report.get("sample_prompts"))
        except HistoryError as error:
            raise UserInputError(f"{report_path} is damaged: {error}; remove it or give another run") from None
        cost = {k: v for k, v in report.items() if k not in ("history", "settings", "param_groups", "sample_prompts")}
    if not groups:
        groups_path = output_dir / f"{output_name}{PARAM_GROUPS_SUFFIX}"
        if groups_path.is_file():
            try:
                groups = parse_param_groups(_read_json(groups_path))
            except HistoryError as error:
                raise UserInputError(f"{groups_path} is damaged: {error}") from None
    samples = find_samples(output_dir, output_name)
    record = RunRecord(output_name, output_dir, history, settings, groups, cost, samples, prompts, notes)
    return _with_missing_notes(record)


def read_tensorboard_run(folder: Path, name: str) -> RunRecord:
    """One TensorBoard run folder: its scalars as the history, its HParams record as the settings."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 1, "tensors": 1})
    try:
        accumulator.Reload()
    except Exception as error:  # noqa: BLE001 - tensorboard raises many kinds for a damaged file
        raise UserInputError(f"cannot read the TensorBoard events in {folder}: {error}") from None
    tags = set(accumulator.Tags().get("scalars", []))

    def series(tag: str) -> Series:
        events = {event.step: event.value for event in accumulator.Scalars(tag)}  # a rerun's repeat: the last wins
        steps = sorted(events)
        return Series(tuple(steps), tuple(float(events[s]) for s in steps))

    history = RunHistory(
        loss=series("loss") if "loss" in tags else Series(),
        lr={tag[len("lr/") :]: series(tag) for tag in sorted(tags) if tag.startswith("lr/")},
        validation=series("loss/validation") if "loss/validation" in tags else Series(),
        diagnostics={tag: series(tag) for tag in sorted(tags) if tag.startswith("lora/")},
    )
    settings = tensorboard_hparams(folder)
    notes = [] if settings else ["no HParams record in the events: no settings"]
    notes.append("a logging folder has no sample images, costs or parameter groups (give the output folder for them)")
    return _with_missing_notes(RunRecord(name, folder, history, settings, notes=notes))


def tensorboard_hparams(folder: Path) -> dict[str, Scalar]:
    """The settings the trainer stored with TensorBoard's HParams plugin (`session_start_info`), if any."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    settings: dict[str, Scalar] = {}
    for event_file in sorted(folder.glob(_EVENTS)):
        for event in EventFileLoader(str(event_file)).Load():
            for value in event.summary.value:
                if value.tag != "_hparams_/session_start_info":
                    continue
                info = HParamsPluginData.FromString(value.metadata.plugin_data.content).session_start_info
                for key, hparam in info.hparams.items():
                    kind = hparam.WhichOneof("kind")
                    settings[key] = {
                        "number_value": hparam.number_value,
                        "string_value": hparam.string_value,
                        "bool_value": hparam.bool_value,
                    }.get(kind, "")
    return settings


def _with_missing_notes(record: RunRecord) -> RunRecord:
    """`record` with a note for each part of a report it has not: curves, validation, diagnostics, samples."""
    notes = list(record.notes)
    history = record.history
    if not history.is_empty():
        if not history.validation:
            notes.append("no validation loss (the run had no --validation_split / --validation_data_dir)")
        if not history.diagnostics:
            notes.append("no LoRA diagnostics")
    if not record.samples and not any("sample images" in note for note in notes):
        notes.append("no sample images (the run had no --sample_prompts, or its sample folder is gone)")
    return RunRecord(
        record.name,
        record.source,
        history,
        record.settings,
        record.param_groups,
        record.cost,
        record.samples,
        record.prompts,
        notes,
    )


def _output_names(folder: Path) -> list[str]:
    reports = {p.name[: -len(REPORT_SUFFIX)] for p in folder.glob(f"*{REPORT_SUFFIX}")}
    groups = {p.name[: -len(PARAM_GROUPS_SUFFIX)] for p in folder.glob(f"*{PARAM_GROUPS_SUFFIX}")}
    return sorted(reports | groups | set(output_names_with_samples(folder)))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"), parse_constant=lambda c: math.nan)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserInputError(f"cannot read {path}: {error}; remove it or give another run") from None


def _relative_name(folder: Path, root: Path) -> str:
    relative = folder.relative_to(root)
    return str(relative) if str(relative) != "." else root.name
