"""The LoRA+ sweep (`tools/loraplus_sweep.py`): the command-line editing it stands on, its ranking, its plan, and
one real sweep of 3 ratios x 2 learning rates that is stopped midway and continued without repeating a finished run,
with caches written once and a recommended command that reproduces the reported validation loss."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from library.config.argv_edit import flag_values, has_flag, without_flags, without_network_args
from library.config.cli import build_parser
from library.report.sweep import SweepPoint, rank, ranking_table, recommendation_lines
from tests.cli_args import tiny_train_argv
from tools.make_demo_dataset import make_demo_dataset

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "tools" / "loraplus_sweep.py"


# --- Editing a command line -----------------------------------------------------------------------------------------


def test_flags_are_removed_with_exactly_their_values():
    parser = build_parser()
    argv = [
        "--learning_rate", "1e-4", "--network_dim", "4", "--unet_lr=2e-4", "--learn", "3e-4",  # abbreviation
        "--network_args", "conv_dim=4", "loraplus_lr_ratio=16", "--loraplus_lr_ratio", "8", "--xformers",
    ]  # fmt: skip
    rest = without_flags(argv, {"learning_rate", "unet_lr", "loraplus_lr_ratio"}, parser)
    assert rest == ["--network_dim", "4", "--network_args", "conv_dim=4", "loraplus_lr_ratio=16", "--xformers"]
    assert without_network_args(rest, {"loraplus_lr_ratio"}, parser) == [
        "--network_dim", "4", "--xformers", "--network_args", "conv_dim=4"
    ]  # fmt: skip
    assert without_network_args(["--network_args", "loraplus_lr_ratio=4"], {"loraplus_lr_ratio"}, parser) == []
    assert flag_values(argv, "learning_rate", parser) == ["1e-4", "3e-4"]
    assert has_flag(argv, "xformers", parser) and not has_flag(argv, "fp8_base", parser)


def test_a_negative_value_is_the_flag_value_and_unknown_tokens_stay():
    parser = build_parser()
    argv = ["--learning_rate", "-1e-4", "--not_a_flag", "x", "--seed", "3"]
    assert without_flags(argv, {"learning_rate", "seed"}, parser) == ["--not_a_flag", "x"]


# --- Ranking --------------------------------------------------------------------------------------------------------


def _point(name, lr, ratio, losses, diverged=False):
    return SweepPoint(name, lr, ratio, None, [(10 * (i + 1), v) for i, v in enumerate(losses)], diverged)


def test_ranking_by_final_loss_and_by_steps_to_the_best_plain_run():
    points = [
        _point("a", 1e-4, 1, [0.9, 0.7, 0.5]),
        _point("b", 2e-4, 1, [0.8, 0.6, 0.45]),  # best plain: target 0.45
        _point("c", 1e-4, 16, [0.6, 0.44, 0.40]),  # reaches 0.45 at step 20
        _point("d", 1e-4, 4, [0.7, 0.5, 0.42]),  # at step 30
        _point("e", 2e-4, 16, [], diverged=True),
    ]
    ranking = rank(points)
    assert [p.name for p in ranking.by_loss] == ["c", "d", "b", "a", "e"]
    assert ranking.target == 0.45 and ranking.target_run.name == "b"
    assert ranking.reach == {"a": None, "b": 30, "c": 20, "d": 30, "e": None}
    assert [p.name for p in ranking.by_speed] == ["c", "d", "b"]
    lines = recommendation_lines(ranking)
    assert lines[0] == "recommended: lr 0.0001, ratio 16: validation loss 0.4 at step 30"
    assert "11.1% lower" in lines[1] and "at step 20 of 30" in lines[1]
    table = ranking_table(ranking)
    assert "| 5 | lr 0.0002, ratio 16 | diverged (NaN) | - | not reached |" in table


def test_when_plain_lora_wins_the_sweep_says_so():
    ranking = rank([_point("a", 1e-4, 1, [0.5, 0.3]), _point("b", 1e-4, 16, [0.4, 0.35])])
    assert ranking.best.name == "a"
    assert "plain LoRA (ratio 1) was best here" in recommendation_lines(ranking)[1]


# --- Plan and bad input (no training) --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    data = tmp_path_factory.mktemp("sweep_data")
    make_demo_dataset(data, count=6, min_side=64, max_side=128)
    return data


def _sweep_args(tiny_sdxl, data, sweep_dir, *extra):
    user = tiny_train_argv(tiny_sdxl.single_file, data, sweep_dir / "own_out", "--network_train_unet_only")
    return ["--sweep_dir", str(sweep_dir), *extra, "--", *user, "--optimizer_type", "AdamW"]


def test_plan_sets_each_runs_lr_ratio_and_budget_and_shares_caching(tiny_sdxl, small_data, tmp_path):
    from tools.loraplus_sweep import build_parser as sweep_parser
    from tools.loraplus_sweep import plan_sweep

    argv = _sweep_args(tiny_sdxl, small_data, tmp_path, "--ratios", "1,16", "--learning_rates", "1e-4,3e-4")
    args, user = sweep_parser().parse_known_args(argv)
    user += ["--learning_rate", "5e-5", "--network_args", "loraplus_lr_ratio=4", "--max_train_epochs", "9"]
    plan = plan_sweep(args, [t for t in user if t != "--"])
    assert [run.name for run in plan.runs] == ["lr0.0001_r1", "lr0.0001_r16", "lr0.0003_r1", "lr0.0003_r16"]
    parser = build_parser()
    for run in plan.runs:
        assert flag_values(run.argv, "learning_rate", parser) == [f"{run.learning_rate:g}"]
        assert flag_values(run.argv, "loraplus_lr_ratio", parser) == [f"{run.ratio:g}"]
        assert flag_values(run.argv, "max_train_steps", parser) == ["100"]
        assert not has_flag(run.argv, "max_train_epochs", parser) and not has_flag(run.argv, "network_args", parser)
        assert flag_values(run.argv, "output_dir", parser) == [str(tmp_path / "runs")]
    assert plan.added == [
        "--validation_split", "0.2", "--validate_every_n_steps", "10",
        "--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk",
    ]  # fmt: skip
    assert plan.cache_roots == [small_data.resolve()]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--ratios", "0,4"], "--ratios '0,4': every value must be a finite number above 0"),
        (["--jobs", "0"], "--jobs 0: give 1 or more"),
        (["--optimizers", "Prodigy", "--ratios", "4"], "Prodigy"),
    ],
)
def test_bad_input_is_one_line_before_anything_trains(tiny_sdxl, small_data, tmp_path, capsys, extra, expected):
    from tools.loraplus_sweep import main

    assert main(_sweep_args(tiny_sdxl, small_data, tmp_path / "sweep", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not (tmp_path / "sweep" / "runs").exists()


# --- A real sweep, stopped and continued -----------------------------------------------------------------------------


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _finished(sweep_dir: Path) -> list[str]:
    try:
        runs = json.loads((sweep_dir / "sweep.json").read_text(encoding="utf-8"))["runs"]
    except (OSError, ValueError, KeyError):
        return []
    return [name for name, record in runs.items() if record["status"] == "finished"]


@pytest.mark.slow
@pytest.mark.skipif(os.name == "nt", reason="stops the sweep with SIGINT")
def test_a_sweep_stopped_midway_continues_without_repeating_a_run(tiny_sdxl, small_data, tmp_path):
    sweep_dir = tmp_path / "sweep"
    argv = _sweep_args(
        tiny_sdxl, small_data, sweep_dir, "--ratios", "1,4,16", "--learning_rates", "1e-4,1e-3",
        "--steps", "4", "--validate_every", "2", "--jobs", "2",
    )  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([sys.executable, str(SWEEP), *argv], cwd=REPO, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 600
    while len(_finished(sweep_dir)) < 2 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 130, out + err
    assert "runs finished and kept; run the same command again to continue" in err
    kept = {name: _digest(sweep_dir / "runs" / f"{name}.safetensors") for name in _finished(sweep_dir)}
    assert 2 <= len(kept) < 6, out

    second = subprocess.run([sys.executable, str(SWEEP), *argv], cwd=REPO, env=env, text=True,
                            capture_output=True, timeout=900)  # fmt: skip
    assert second.returncode == 0, second.stdout + second.stderr
    manifest = json.loads((sweep_dir / "sweep.json").read_text(encoding="utf-8"))
    assert sorted(_finished(sweep_dir)) == sorted(run for run in manifest["runs"]) and len(manifest["runs"]) == 6
    for name, digest in kept.items():  # finished runs were not trained again: same file, one training in the log
        assert _digest(sweep_dir / "runs" / f"{name}.safetensors") == digest
        assert (sweep_dir / "runs" / f"{name}.log").read_text(encoding="utf-8").count("$ ") == 1
        assert f"] {name}:" not in second.stdout
    # The caches: written by the first run, then read unchanged by every other run, across the stop.
    check = manifest["cache_check"]
    assert check == {**check, "latent_files": 6, "text_encoder_files": 6, "unchanged": True}
    assert "caches: 6 latent and 6 text-encoder cache files, written once" in second.stdout
    assert (sweep_dir / "compare" / "compare.html").is_file()
    best = manifest["recommended"]
    assert best["run"] == manifest["ranking"]["by_final_validation_loss"][0]
    assert math.isfinite(best["loss"])

    # The recommended command trains to the validation loss the sweep reported for it.
    command = (sweep_dir / "recommended_command.txt").read_text(encoding="utf-8").strip()
    assert command in second.stdout
    words = shlex.split(command)
    assert words[:2] == [sys.executable, str(REPO / "train_network.py")]
    from library.config.build import config_from_args
    from library.config.config_file import parse_args
    from library.train.trainer import train

    argv_rec = [*words[2:], "--output_dir", str(tmp_path / "recommended")]
    result = train(config_from_args(parse_args(build_parser(), argv_rec)))
    assert result.validation_losses[-1][0] == 4
    assert result.validation_losses[-1][1] == pytest.approx(best["loss"], rel=1e-5, abs=1e-6)


def test_a_small_gain_is_still_written_with_its_digits():
    ranking = rank([_point("a", 1e-4, 1, [1.14093]), _point("b", 1e-4, 16, [1.1408])])
    assert "the recommended run is 0.011% lower" in recommendation_lines(ranking)[1]
