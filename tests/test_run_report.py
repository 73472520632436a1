"""The run report as the trainer writes it (library.train.report_files): tiny runs through `train_network.main`,
checked against what the runs themselves saw and logged - every step's loss and group lrs as `on_step` got them,
the validation losses, the LoRA+ diagnostics in TensorBoard, the sample files on disk.

Two runs of the same seed, plain LoRA and LoRA+ ratio 16, with validation and sample prompts, are also compared
(`tools/compare_runs.py`): the page's validation table, its 'reach' step and its sample grids are checked against
the runs' own report JSONs and sample files (`check_comparison_page`, which also checks bigger runs:
`python -m tests.test_run_report RUN_1 RUN_16 COMPARE_DIR`)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

import library.train.trainer as trainer_module
import train_network
from library.report.samples import find_samples, thumbnail_jpeg
from library.train.report_files import REPORT_PROBLEM
from library.train.trainer import StepInfo
from tests.cli_args import tiny_train_argv
from tools.make_demo_dataset import make_demo_dataset

STEPS = 8
"""6 images, 2 held out: 4 trained at batch 2, 2 steps per epoch, 4 epochs."""
SAVE_EVERY, SAMPLE_EVERY, VALIDATE_EVERY, DIAGNOSTICS_EVERY = 4, 4, 2, 3
LR = 1e-3
PROMPTS = "a red square --w 64 --h 64 --s 2 --d 5\na blue circle --w 64 --h 64 --s 2 --d 6\n"
METRICS = ("norm_A", "norm_B", "delta", "update_A", "update_B")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run_report_data")
    make_demo_dataset(root, count=6, min_side=64, max_side=64, repeats=1, name="toy", seed=5)
    (root / "prompts.txt").write_text(PROMPTS)
    return root


def run_main(argv: list[str], on_step=None) -> tuple[int, list[StepInfo], str]:
    """`train_network.main(argv)` with every StepInfo collected (and `on_step(info, output_dir)` called after each
    step, when given); returns (exit code, the step infos, what it printed on stdout)."""
    seen: list[StepInfo] = []
    real_loop = trainer_module.run_loop

    def run_loop(cfg, parts, state, _=None, **options):
        def hook(info: StepInfo) -> None:
            seen.append(info)
            if on_step is not None:
                on_step(info, cfg.output.output_dir)

        return real_loop(cfg, parts, state, hook, **options)

    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout):
        patch.setattr(trainer_module, "run_loop", run_loop)
        code = train_network.main(argv)
    return code, seen, stdout.getvalue()


def argv_of(tiny_sdxl, data: Path, out: Path, *extra: str) -> list[str]:
    return tiny_train_argv(
        tiny_sdxl.single_file,
        data,
        out / "output",
        "--max_train_steps",
        str(STEPS),
        "--optimizer_type",
        "AdamW",
        "--learning_rate",
        str(LR),
        "--cache_latents",
        "--validation_split",
        "0.34",
        "--validate_every_n_steps",
        str(VALIDATE_EVERY),
        "--sample_prompts",
        str(data / "prompts.txt"),
        "--sample_every_n_steps",
        str(SAMPLE_EVERY),
        "--save_every_n_steps",
        str(SAVE_EVERY),
        "--diagnostics_every_n_steps",
        str(DIAGNOSTICS_EVERY),
        "--logging_dir",
        str(out / "logs"),
        "--output_name",
        "run",
        *extra,
    )


@pytest.fixture(scope="module")
def runs(tiny_sdxl, data, tmp_path_factory):
    """Plain LoRA and LoRA+ ratio 16, same seed: {ratio: (output folder, step infos, stdout, mid-run views)}.
    A mid-run view is what the output folder held right after each step: (step, the report JSON's steps or None,
    whether the page exists)."""
    found = {}
    for ratio in (1, 16):
        out = tmp_path_factory.mktemp(f"ratio{ratio}")
        views: list[tuple[int, list[int] | None, bool]] = []

        def look(info: StepInfo, output_dir: Path, views=views) -> None:
            report = output_dir / "run_report.json"
            steps = json.loads(report.read_text())["history"]["steps"] if report.is_file() else None
            views.append((info.step, steps, (output_dir / "run_report.html").is_file()))

        extra = ("--loraplus_lr_ratio", str(ratio)) if ratio != 1 else ()  # ratio 1: plain LoRA, no flag
        code, seen, stdout = run_main(argv_of(tiny_sdxl, data, out, *extra), look)
        assert code == 0, stdout[-2000:]
        found[ratio] = (out / "output", seen, stdout, views)
    return found


def report_of(output_dir: Path) -> dict:
    return json.loads((output_dir / "run_report.json").read_text())


# --- One run's report -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [1, 16])
def test_the_page_path_is_the_last_line_and_the_history_is_the_runs_own(runs, ratio):
    output, seen, stdout, _ = runs[ratio]
    lines = stdout.strip().splitlines()
    assert lines[-2:] == [f"LoRA saved to {output / 'run.safetensors'}", f"report: {output / 'run_report.html'}"]
    assert REPORT_PROBLEM not in stdout
    page = (output / "run_report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and f"{STEPS} steps" in page
    report = report_of(output)
    history = report["history"]
    assert history["steps"] == list(range(1, STEPS + 1)) == [info.step for info in seen]
    assert history["loss"] == pytest.approx([info.loss for info in seen], rel=1e-6)
    groups = ["textencoder", "unet"] if ratio == 1 else ["textencoder", "textencoder plus", "unet", "unet plus"]
    assert list(history["lr"]) == groups
    for group in groups:
        assert history["lr"][group] == pytest.approx([info.lrs[group] for info in seen], rel=1e-6)
    if ratio != 1:  # LoRA+: every B group at the ratio times its A group, every step
        for base in ("textencoder", "unet"):
            assert history["lr"][f"{base} plus"] == pytest.approx([ratio * lr for lr in history["lr"][base]])
    assert history["lr"]["unet"] == pytest.approx([LR] * STEPS)
    validation = [(info.step, info.validation_loss) for info in seen if info.validation_loss is not None]
    assert [step for step, _ in validation] == list(range(VALIDATE_EVERY, STEPS + 1, VALIDATE_EVERY))
    assert history["validation"] == [[step, pytest.approx(loss, rel=1e-6)] for step, loss in validation]
    assert [g["description"] for g in report["param_groups"]] == groups
    assert [g["lr"] for g in report["param_groups"]] == pytest.approx(
        [LR if " " not in g else LR * ratio for g in groups]
    )
    assert report["sample_prompts"] == ["a red square", "a blue circle"]
    assert report["settings"]["loraplus_unet_lr_ratio"] == float(ratio)
    assert (report["steps"], report["epochs"], report["steps_per_epoch"]) == (STEPS, 4, 2)


def test_a_save_refreshes_the_report_mid_run(runs):
    """Nothing before the first save (step 4); from it until the end, the report holds steps 1-4 and the page is
    there (the final report comes after the last step)."""
    _, _, _, views = runs[16]
    assert views == [(step, None, False) for step in range(1, SAVE_EVERY)] + [
        (step, list(range(1, SAVE_EVERY + 1)), True) for step in range(SAVE_EVERY, STEPS + 1)
    ]


def test_diagnostics_are_logged_at_the_flags_interval(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output, _, _, _ = runs[16]
    diagnostics = report_of(output)["history"]["diagnostics"]
    due = list(range(DIAGNOSTICS_EVERY, STEPS + 1, DIAGNOSTICS_EVERY))
    assert diagnostics["steps"] == due == [3, 6]
    assert sorted(diagnostics["series"]) == sorted(f"lora/{c}/{m}" for c in ("te1", "te2", "unet") for m in METRICS)
    (events,) = (output.parent / "logs").rglob("events.out.tfevents.*")
    logged = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
    logged.Reload()
    for name, values in diagnostics["series"].items():
        scalars = logged.Scalars(name)
        assert [s.step for s in scalars] == due, name  # the trackers got them with the step's logs
        assert values == pytest.approx([s.value for s in scalars], rel=1e-6), name
    # B starts at zero and grows; each logged update is one optimizer step's
    norm_b = diagnostics["series"]["lora/unet/norm_B"]
    assert 0 < norm_b[0] < norm_b[1] and all(0 < v < 1 for v in diagnostics["series"]["lora/unet/update_A"])


@pytest.mark.parametrize("flag, logged_at", [((), [10]), (("--diagnostics_every_n_steps", "0"), [])])
@pytest.mark.slow
def test_diagnostics_by_default_every_10_steps_and_none_at_0(tiny_sdxl, data, tmp_path, flag, logged_at):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    argv = tiny_train_argv(
        tiny_sdxl.single_file,
        data,
        tmp_path / "output",
        "--max_train_steps",
        "10",
        "--cache_latents",
        "--logging_dir",
        str(tmp_path / "logs"),
        "--output_name",
        "run",
        *flag,
    )
    code, _, _ = run_main(argv)
    assert code == 0
    diagnostics = report_of(tmp_path / "output")["history"]["diagnostics"]
    assert diagnostics["steps"] == logged_at and len(diagnostics["series"]) == (15 if logged_at else 0)
    (events,) = (tmp_path / "logs").rglob("events.out.tfevents.*")
    logged = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
    logged.Reload()
    tags = logged.Tags()["scalars"]
    assert "loss" in tags and len([tag for tag in tags if tag.startswith("lora/")]) == len(diagnostics["series"])


@pytest.mark.parametrize("broken", ["page", "json"])
def test_a_report_that_cannot_be_written_is_one_warning_line_and_the_run_ends(
    tiny_sdxl, data, tmp_path, monkeypatch, broken
):
    """Outside the test suite's strict mode: a failing page (or report JSON) is one warning line per attempt (the
    save at step 2 and the end); the run finishes with its LoRA. In strict mode the same error stops the run."""
    import library.train.report_files as report_files

    def broken_page(*args, **kwargs):
        raise RuntimeError("no figure today")

    def broken_json(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if broken == "page":
        monkeypatch.setattr(report_files, "write_run_report", broken_page)
    else:
        monkeypatch.setattr(report_files, "write_report", broken_json)
    argv = tiny_train_argv(
        tiny_sdxl.single_file,
        data,
        tmp_path / "out",
        "--max_train_steps",
        "3",
        "--save_every_n_steps",
        "2",
        "--output_name",
        "run",
        "--cache_latents",
    )
    with pytest.raises((RuntimeError, OSError)):
        train_network.main(argv)
    monkeypatch.delenv("LORAPLUS_STRICT_REPORTS")
    code, _, stdout = run_main(argv)
    assert code == 0
    target = tmp_path / "out" / ("run_report.html" if broken == "page" else "run_report.json")
    reason = "RuntimeError: no figure today" if broken == "page" else "OSError: [Errno 28] No space left on device"
    warning = f"warning: {REPORT_PROBLEM} {target}: {reason} (training is not affected)"
    assert [line for line in stdout.splitlines() if REPORT_PROBLEM in line] == [warning, warning]
    assert stdout.strip().splitlines()[-1] == f"LoRA saved to {tmp_path / 'out' / 'run.safetensors'}"  # no page
    assert (tmp_path / "out" / "run.safetensors").is_file()
    assert (tmp_path / "out" / "run_report.json").is_file() == (broken == "page")


# --- Two runs compared ----------------------------------------------------------------------------------------------
class Tables(HTMLParser):
    """Every table of a page after its nearest heading: {heading: [rows]}, a row being its cells, a cell (text,
    link, image src). Several tables under one heading (the sample grids, one per <h3>) are keyed by the <h3>."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[tuple[str, str | None, str | None]]]] = {}
        self._heading: str | None = None
        self._in_heading = False
        self._row: list | None = None
        self._cell: list | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("h2", "h3"):
            self._in_heading, self._heading = True, ""
        elif tag == "table":
            self.tables[self._heading] = []
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = ["", None, None]
        elif tag == "a" and self._cell is not None:
            self._cell[1] = attrs.get("href")
        elif tag == "img" and self._cell is not None:
            self._cell[2] = attrs.get("src")

    def handle_endtag(self, tag):
        if tag in ("h2", "h3"):
            self._in_heading = False
        elif tag in ("td", "th") and self._row is not None:
            self._row.append(tuple(self._cell))
            self._cell = None
        elif tag == "tr":
            self.tables[self._heading].append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._in_heading:
            self._heading += data
        elif self._cell is not None:
            self._cell[0] += data


def check_comparison_page(page: Path, plain: Path, plus: Path, output_name: str = "run") -> dict:
    """Check `compare.html` of two runs (plain LoRA output folder first) against their own files: the validation
    table against their report JSONs, the 'reach' step recomputed from them, and each sample grid cell against the
    sample file of that run, step and prompt (its link, and its thumbnail byte for byte). Returns what it saw."""
    reports = [json.loads((run / f"{output_name}_report.json").read_text()) for run in (plain, plus)]
    tables = Tables(page.read_text())
    labels = ["loraplus_lr_ratio=1", f"loraplus_lr_ratio={reports[1]['settings']['loraplus_unet_lr_ratio']:g}"]

    # Validation loss at equal steps: one row per evaluated step, a column per run, from each run's history.
    (header, *rows) = tables.tables["Validation loss at equal steps"]
    assert [cell[0] for cell in header] == ["step", *labels]
    validation = [{step: loss for step, loss in report["history"]["validation"]} for report in reports]
    steps = sorted(set(validation[0]) | set(validation[1]))
    assert [int(row[0][0]) for row in rows] == steps and steps
    for row in rows:
        step = int(row[0][0])
        for cell, losses in zip(row[1:], validation):
            assert cell[0] == (f"{losses[step]:.5f}" if step in losses else ""), (step, cell)

    # Reach: the plain run's final validation loss is the target; each run's first evaluated step at or below it.
    target = reports[0]["history"]["validation"][-1][1]
    reached = [next((s for s, loss in report["history"]["validation"] if loss <= target), None) for report in reports]
    reach_rows = {row[0][0]: row[1][0] for row in tables.tables["Reaching the plain-LoRA validation loss"][1:]}
    for label, step, report in zip(labels, reached, reports):
        if step is not None:
            assert reach_rows[label] == str(step), (label, reach_rows)
        else:
            best = min(loss for _, loss in report["history"]["validation"])
            assert reach_rows[label] == f"not reached (best {best:.5f})", (label, reach_rows)
    assert reached[0] is not None  # the plain run reaches its own final loss

    # Sample grids: one per prompt, rows = runs (plain first), columns = sampling steps, every cell that run's file.
    samples = [find_samples(run, output_name) for run in (plain, plus)]
    points = sorted({point for sample in samples for point, _ in sample.images})
    grids = {heading: table for heading, table in tables.tables.items() if heading and "(seed" in heading}
    prompts = reports[0]["sample_prompts"]
    assert len(grids) == len(prompts) and points
    for index, prompt in enumerate(prompts):
        (grid,) = [table for heading, table in grids.items() if heading.startswith(prompt)]
        assert [cell[0] for cell in grid[0][1:]] == [point.label for point in points]
        assert [row[0][0] for row in grid[1:]] == labels
        for row, sample in zip(grid[1:], samples):
            for cell, point in zip(row[1:], points):
                file = sample.images[(point, index)]
                assert cell[1] == file.resolve().as_uri()
                assert base64.b64decode(cell[2].split(",", 1)[1]) == thumbnail_jpeg(file)
    return {"validation_steps": steps, "target": target, "reached": reached, "points": [p.label for p in points]}


def test_comparing_plain_lora_with_ratio_16(runs, tmp_path, capsys):
    """tools/compare_runs.py on the two runs, sorted by the ratio: the page's tables and grids are the runs' own."""
    from tools.compare_runs import main as compare_main

    plain, plus = runs[1][0], runs[16][0]
    assert compare_main([str(plus), str(plain), "--sort", "loraplus_lr_ratio", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'compare.html'}" in out
    seen = check_comparison_page(tmp_path / "compare.html", plain, plus)
    assert seen["validation_steps"] == [2, 4, 6, 8] and seen["points"] == ["step 4", "step 8"]
    # the figures as PNG files, one sample grid per prompt
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "learning_rate.png",
        "lora_diagnostics.png",
        "loss.png",
        "samples_prompt00.png",
        "samples_prompt01.png",
    ]


def test_the_comparison_check_sees_a_wrong_cell(runs, tmp_path, capsys):
    """check_comparison_page fails on a page whose validation value or sample image is not the run's own."""
    from tools.compare_runs import main as compare_main

    plain, plus = runs[1][0], runs[16][0]
    assert compare_main([str(plain), str(plus), "--sort", "loraplus_lr_ratio", "--out", str(tmp_path)]) == 0
    page = tmp_path / "compare.html"
    text = page.read_text()
    loss = report_of(plus)["history"]["validation"][0][1]
    page.write_text(text.replace(f">{loss:.5f}<", f">{loss + 0.001:.5f}<", 1))
    with pytest.raises(AssertionError):
        check_comparison_page(page, plain, plus)
    samples = find_samples(plus, "run")
    first, second = sorted(samples.images.values())[:2]
    page.write_text(text.replace(first.resolve().as_uri(), second.resolve().as_uri(), 1))
    with pytest.raises(AssertionError):
        check_comparison_page(page, plain, plus)


if __name__ == "__main__":  # check a comparison of bigger runs: RUN_1 RUN_16 COMPARE_DIR [OUTPUT_NAME]
    print(
        check_comparison_page(Path(sys.argv[3]) / "compare.html", Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[4:])
    )
