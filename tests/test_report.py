"""The run report and the comparison (library.report): the history schema, the readers, labels, the tables, and
the pages built from synthetic runs (tests/report_runs.py) - no training, no browser (see test_report_browser)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from library.errors import UserInputError
from library.report.compare import compare_runs, reach, validation_rows, write_comparison
from library.report.history import HistoryError, history_section, parse_history
from library.report.run_page import write_run_report
from library.report.samples import SamplePoint, find_samples, parse_sample_name
from library.report.sources import read_runs
from tests.report_runs import PROMPTS, make_run


# --- History schema ---------------------------------------------------------------------------------------------------
def test_history_round_trips_with_nan_as_null():
    section = history_section(
        first_step=0,
        losses=[0.5, math.nan, 0.3],
        lrs={"unet": [1e-4] * 3, "unet plus": [16e-4] * 3},
        validation=[(2, 0.4)],
        diagnostics=[(2, {"lora/unet/norm_B": 0.1})],
        settings={"unet_lr": 1e-4},
        sample_prompts=["a cat"],
    )
    text = json.dumps(section, allow_nan=False)  # strict JSON: a NaN must have become null
    history = parse_history(json.loads(text)["history"])
    assert history.loss.steps == (1, 2, 3) and history.loss.values[0] == 0.5 and math.isnan(history.loss.values[1])
    assert history.lr["unet plus"].values == (16e-4,) * 3
    assert history.validation.steps == (2,) and history.diagnostics["lora/unet/norm_B"].values == (0.1,)


def test_values_are_kept_to_seven_significant_digits():
    section = history_section(first_step=0, losses=[0.123456789123], lrs={"unet": [1.23456789e-4]})
    assert json.dumps(section["history"]["loss"]) == "[0.1234568]" and section["history"]["lr"]["unet"] == [1.234568e-4]


def test_lr_of_another_length_than_the_losses_is_refused():
    with pytest.raises(HistoryError, match="'unet' has 2 values for 3 steps"):
        history_section(first_step=0, losses=[1.0, 1.0, 1.0], lrs={"unet": [1.0, 1.0]})


def test_a_resumed_run_keeps_the_steps_before_it_resumed():
    first = history_section(
        first_step=0,
        losses=[0.5, 0.4, 0.3, 0.2],
        lrs={"unet": [1.0] * 4},
        validation=[(2, 0.45), (4, 0.25)],
        diagnostics=[(2, {"lora/unet/norm_B": 0.1})],
    )
    # resumed from the state of step 2: steps 3-4 run again, with a new group
    second = history_section(
        first_step=2,
        losses=[0.31, 0.21],
        lrs={"unet": [2.0] * 2, "unet plus": [3.0] * 2},
        validation=[(4, 0.26)],
        earlier=first["history"],
    )
    history = parse_history(second["history"])
    assert history.loss.steps == (1, 2, 3, 4) and history.loss.values == (0.5, 0.4, 0.31, 0.21)
    assert history.lr["unet"].values == (1.0, 1.0, 2.0, 2.0)
    assert math.isnan(history.lr["unet plus"].values[0]) and history.lr["unet plus"].values[3] == 3.0
    assert history.validation.steps == (2, 4) and history.validation.values == (0.45, 0.26)
    assert history.diagnostics["lora/unet/norm_B"].steps == (2,)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda h: h.update(steps=[2, 1, 3, 4]), "must increase"),
        (lambda h: h["loss"].pop(), "has 3 values for 4 steps"),
        (lambda h: h.update(version=99), "version"),
        (lambda h: h["lr"].update(unet="fast"), "list of numbers"),
        (lambda h: h.update(validation=[[1, 2, 3]]), "pairs"),
    ],
)
def test_a_damaged_history_is_one_line_naming_the_file(tmp_path, damage, message):
    make_run(tmp_path, "run", steps=4, validate_every=2, sample_every=None)
    path = tmp_path / "run_report.json"
    report = json.loads(path.read_text())
    damage(report["history"])
    path.write_text(json.dumps(report))
    with pytest.raises(UserInputError, match=re.escape(str(path)) + ".*" + message):
        read_runs(tmp_path)


# --- Samples ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, output_name, point, prompt, seed",
    [
        ("my_lora_v2_000120_01_20250101120000_43.png", "my_lora_v2", SamplePoint(False, 120), 1, 43),
        ("run_000001_e000003_00_20250101120000_7.png", "run_000001", SamplePoint(True, 3), 0, 7),
        ("e000000_12_20250101120000_1.png", "", SamplePoint(True, 0), 12, 1),
        ("x_1234567_00_20250101120000_1.png", "x", SamplePoint(False, 1234567), 0, 1),
    ],
)
def test_sample_names_parse_as_the_trainer_writes_them(name, output_name, point, prompt, seed):
    sample = parse_sample_name(Path(name))
    assert (sample.output_name, sample.point, sample.prompt, sample.seed) == (output_name, point, prompt, seed)


def test_other_files_and_other_runs_samples_are_not_taken(tmp_path):
    folder = tmp_path / "sample"
    folder.mkdir()
    for name in (
        "a_000010_00_20250101120000_1.png",
        "a_000010_00_20250101130000_1.png",  # a rerun: newest wins
        "ab_000010_00_20250101120000_1.png",
        "a_000010_00_notes.png",
        "a_000010_00_20250101120000_1.jpg",
    ):
        (folder / name).write_bytes(b"")
    samples = find_samples(tmp_path, "a")
    assert list(samples.images.values()) == [folder / "a_000010_00_20250101130000_1.png"]


def test_points_in_training_order_with_epochs_at_their_steps():
    from library.report.samples import SampleSet

    points = [SamplePoint(True, 2), SamplePoint(False, 30), SamplePoint(True, 0), SamplePoint(False, 5)]
    samples = SampleSet({(p, 0): Path(f"{i}.png") for i, p in enumerate(points)})
    assert samples.points(steps_per_epoch=10) == [
        SamplePoint(True, 0),
        SamplePoint(False, 5),
        SamplePoint(True, 2),
        SamplePoint(False, 30),
    ]


# --- Comparison -------------------------------------------------------------------------------------------------------
@pytest.fixture
def three_runs(tmp_path) -> list[Path]:
    return [make_run(tmp_path / f"ratio{r}", "lora", ratio=float(r), seed=r) for r in (16, 1, 4)]


def test_runs_are_labelled_by_the_settings_that_differ_and_sorted(three_runs):
    comparison = compare_runs(three_runs, sort="loraplus_lr_ratio")
    assert comparison.labels == ["loraplus_lr_ratio=1", "loraplus_lr_ratio=4", "loraplus_lr_ratio=16"]
    assert comparison.differing == ["loraplus_lr_ratio"]


def test_ratios_that_differ_from_each_other_are_labelled_apart(tmp_path):
    runs = [make_run(tmp_path / str(r), "lora", ratio=float(r), sample_every=None) for r in (1, 4)]
    report = json.loads((runs[1] / "lora_report.json").read_text())
    report["settings"]["loraplus_text_encoder_lr_ratio"] = 1.0
    report["settings"]["unet_lr"] = 2e-4
    (runs[1] / "lora_report.json").write_text(json.dumps(report))
    labels = compare_runs(runs).labels
    assert labels == ["unet_lr=0.0001, loraplus_unet_lr_ratio=1", "unet_lr=0.0002, loraplus_unet_lr_ratio=4"]


def test_runs_that_differ_in_no_setting_keep_their_names(tmp_path):
    runs = [make_run(tmp_path / name, name, ratio=4.0, sample_every=None) for name in ("a", "b")]
    assert compare_runs(runs).labels == ["a", "b"]


def test_sorting_by_a_setting_no_run_has_is_one_line(three_runs):
    with pytest.raises(UserInputError, match="--sort warmup: no run records that setting; settings: .*unet_lr"):
        compare_runs(three_runs, sort="warmup")


def test_validation_at_equal_steps_and_the_step_reaching_plain_lora(three_runs):
    comparison = compare_runs(three_runs, sort="loraplus_lr_ratio")
    header, rows = validation_rows(comparison)
    assert header == ["step", "loraplus_lr_ratio=1", "loraplus_lr_ratio=4", "loraplus_lr_ratio=16"]
    assert [row[0] for row in rows] == ["10", "20", "30", "40", "50", "60"]
    plain_final = comparison.runs[0].history.validation.values[-1]
    assert rows[-1][1] == f"{plain_final:.5f}"
    found = reach(comparison)
    assert found.target == plain_final and found.plain_label == "loraplus_lr_ratio=1"
    # the synthetic curves fall sqrt(ratio) times faster: ratio 4 gets there at step 30, 16 at step 20
    assert found.steps == [60, 30, 20]


def test_no_plain_lora_run_means_no_target(tmp_path):
    runs = [make_run(tmp_path / str(r), "lora", ratio=float(r), sample_every=None) for r in (4, 16)]
    assert reach(compare_runs(runs)) is None


def test_runs_missing_parts_still_compare_and_say_what_is_missing(tmp_path, three_runs):
    old = make_run(tmp_path / "old", "old", ratio=1.0, history=False)  # a report from before the history
    bare = make_run(
        tmp_path / "bare", "bare", ratio=8.0, validate_every=None, sample_every=None, diagnostics_every=None
    )
    comparison = compare_runs([*three_runs, old, bare])
    notes = {run.name: run.notes for run in comparison.runs}
    assert any("no training history" in note for note in notes["old"])
    assert {"no validation loss" in n for n in notes["bare"]} == {True, False}
    assert any("no sample images" in note for note in notes["bare"])
    assert any("no LoRA diagnostics" in note for note in notes["bare"])
    assert validation_rows(comparison)[0] == ["step", *comparison.labels[:3]]  # only runs with a validation loss
    page = write_comparison(comparison, tmp_path / "out").read_text()
    assert "no training history" in page and "Runs without samples: " in page


def test_comparison_writes_the_page_and_one_png_per_figure(three_runs, tmp_path):
    page = write_comparison(compare_runs(three_runs), tmp_path / "out")
    names = sorted(p.name for p in page.parent.iterdir())
    assert names == [
        "compare.html",
        "learning_rate.png",
        "lora_diagnostics.png",
        "loss.png",
        "samples_prompt00.png",
        "samples_prompt01.png",
    ]
    for name in names[1:]:
        assert (page.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = page.read_text()
    assert PROMPTS[0] in text and text.count("<h3>") == len(PROMPTS)


def test_a_folder_without_any_run_is_one_line(tmp_path):
    with pytest.raises(UserInputError, match="no run found in"):
        read_runs(tmp_path)


def test_tensorboard_logging_folder_is_read_with_its_settings(tmp_path):
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    for ratio in (1.0, 16.0):
        writer = SummaryWriter(str(tmp_path / "logs" / f"run{int(ratio)}" / "network_train"))
        for summary in hparams(
            {"loraplus_unet_lr_ratio": ratio, "loraplus_text_encoder_lr_ratio": ratio, "unet_lr": 1e-4},
            {"loss/average": 0.0},
        ):
            writer.file_writer.add_summary(summary)
        for step in range(1, 11):
            writer.add_scalar("loss", 1.0 / step, step)
            writer.add_scalar("lr/unet", 1e-4, step)
            writer.add_scalar("lr/unet plus", 1e-4 * ratio, step)
            if step % 5 == 0:
                writer.add_scalar("loss/validation", 2.0 / (step * ratio**0.5), step)
                writer.add_scalar("lora/unet/norm_B", 0.01 * step * ratio, step)
        writer.close()
    comparison = compare_runs([tmp_path / "logs"], sort="loraplus_lr_ratio")
    assert comparison.labels == ["loraplus_lr_ratio=1", "loraplus_lr_ratio=16"]
    history = comparison.runs[1].history
    assert history.loss.steps == tuple(range(1, 11)) and history.lr["unet plus"].values[0] == pytest.approx(16e-4)
    assert history.validation.steps == (5, 10) and history.diagnostics["lora/unet/norm_B"].values[1] == pytest.approx(
        1.6
    )
    assert reach(comparison).steps == [10, 5]
    assert any("no sample images" in note for note in comparison.runs[0].notes)


def test_compare_cli_writes_the_page_and_says_what_it_wrote(three_runs, tmp_path, capsys):
    from tools.compare_runs import main

    assert main([*map(str, three_runs), "--sort", "loraplus_lr_ratio", "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("loraplus_lr_ratio=1: ") and f"wrote {tmp_path / 'cmp'}" in out
    assert main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "cmp2")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# --- Run page ---------------------------------------------------------------------------------------------------------
def test_run_report_is_self_contained_and_escaped(tmp_path):
    make_run(tmp_path, "lora", ratio=16.0)
    report = json.loads((tmp_path / "lora_report.json").read_text())
    report["sample_prompts"][0] = "<script>alert(1)</script> & more"
    report["settings"]["network_args"] = "<b>conv_dim=4</b>"
    (tmp_path / "lora_report.json").write_text(json.dumps(report))
    page = write_run_report(tmp_path, "lora")
    assert page == tmp_path / "lora_report.html"
    text = page.read_text()
    sources = re.findall(r'<img [^>]*src="([^"]*)"', text)
    assert len(sources) == 3 + 2 * 4  # loss, lr, diagnostics; 2 prompts x 4 points
    assert all(src.startswith("data:image/png;base64,") for src in sources[:3])  # figures
    assert all(src.startswith("data:image/jpeg;base64,") for src in sources[3:])  # sample thumbnails
    assert "<script" not in text and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in text
    assert "<b>" not in text and "&lt;b&gt;conv_dim=4&lt;/b&gt;" in text
    assert not re.search(r"(?:src|href)=\"(?:https?:)?//", text)  # nothing fetched from a network
    assert (
        re.findall(r'<a href="([^"]*)"', text)[0]
        == (tmp_path / "sample").resolve().as_uri() + "/lora_e000000_00_20250101120000_42.png"
    )  # each thumbnail links to its full-size file
    for heading in ("Loss", "Learning rate", "LoRA diagnostics", "Samples", "Parameter groups", "Settings", "Cost"):
        assert f"<h2>{heading}</h2>" in text
    assert "50.0 ms over 60 steps" in text and "3.00 GiB of 16.0 GiB" in text


def test_run_report_of_a_run_without_history_says_so(tmp_path):
    make_run(tmp_path, "lora", history=False, sample_every=None)
    text = write_run_report(tmp_path, "lora").read_text()
    assert "no training history" in text and "no sample images" in text and "<h2>Cost</h2>" in text
    assert "<h2>Loss</h2>" not in text


def test_comparison_escapes_setting_names_and_values(tmp_path):
    runs = [make_run(tmp_path / str(r), "lora", ratio=float(r), sample_every=None) for r in (1, 4)]
    for run, value in zip(runs, ("<i>a</i>", "<i>b</i>")):
        report = json.loads((run / "lora_report.json").read_text())
        report["settings"]["<u>odd</u>"] = value
        (run / "lora_report.json").write_text(json.dumps(report))
    text = write_comparison(compare_runs(runs), tmp_path / "out").read_text()
    assert "<u>" not in text and "<i>" not in text
    assert "differ: loraplus_lr_ratio, &lt;u&gt;odd&lt;/u&gt;." in text


def test_the_report_wing_imports_no_torch():
    """Pages build in any Python with matplotlib, fast: the wing imports only `files` and `errors`."""
    import subprocess
    import sys

    code = (
        "import sys; import library.report.compare, library.report.run_page; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'networks') "
        "or m.startswith(('library.train', 'library.model', 'library.data', 'library.config'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.stdout.strip() == "[]"


def test_large_samples_are_embedded_as_small_thumbnails(tmp_path):
    from PIL import Image

    make_run(tmp_path, "lora", sample_every=None)
    (tmp_path / "sample").mkdir()
    noise = Image.effect_noise((1024, 1024), 80).convert("RGB")  # incompressible, like a real 1024 px sample
    noise.save(tmp_path / "sample" / "lora_000010_00_20250101120000_1.png")
    assert (tmp_path / "sample" / "lora_000010_00_20250101120000_1.png").stat().st_size > 1_000_000
    text = write_run_report(tmp_path, "lora").read_text()
    assert len(text) < 400_000


def test_the_smoothing_window_smooths_short_runs_and_stays_within_the_run():
    from library.report.figures import smoothing_window

    assert [smoothing_window(n) for n in (1, 3, 28, 200, 1000, 5000)] == [1, 3, 5, 10, 50, 100]
