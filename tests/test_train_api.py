"""The in-process API (`library.train.trainer.train(cfg, on_step=...) -> TrainResult`) as sweeps use it: several
runs back to back in one process, with different LoRA+ ratios, each seen step by step and independent."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from library.config.build import config_from_args
from library.config.cli import build_parser
from library.train.trainer import StepInfo, train
from tests.cli_args import tiny_train_argv
from tools.make_demo_dataset import make_demo_dataset

LR = 1e-3
# 6 images, 2 held out -> 4 trained at batch 2: 2 steps per epoch, 2 epochs, a linear decay over the 4 steps.
UNET_LRS = [LR, 0.75 * LR, 0.5 * LR, 0.25 * LR]
GROUPS = ["unet", "unet plus"]

pytestmark = pytest.mark.slow  # two short trainings shared by every test here


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("api_data")
    make_demo_dataset(root, count=6, min_side=64, max_side=64, repeats=1, name="toy", seed=5)
    return root


def _run(model: Path, data: Path, out: Path, ratio: int) -> tuple[object, list[StepInfo]]:
    argv = tiny_train_argv(
        model,
        data,
        out,
        "--cache_latents",
        "--network_train_unet_only",
        "--cache_text_encoder_outputs",
        "--max_train_epochs",
        "2",
        "--optimizer_type",
        "AdamW",
        "--learning_rate",
        str(LR),
        "--lr_scheduler",
        "linear",
        "--loraplus_lr_ratio",
        str(ratio),
        "--validation_split",
        "0.34",
        "--validate_every_n_steps",
        "3",
        "--validate_every_n_epochs",
        "2",
        "--output_name",
        "run",
    )
    seen: list[StepInfo] = []
    result = train(config_from_args(build_parser().parse_args(argv)), on_step=seen.append)
    return result, seen


@pytest.fixture(scope="module")
def runs(tiny_sdxl, data, tmp_path_factory):
    """Ratio 4, then 16, then 4 again, in this one process."""
    return [
        _run(tiny_sdxl.single_file, data, tmp_path_factory.mktemp(f"api_run{i}"), ratio)
        for i, ratio in enumerate((4, 16, 4))
    ]


@pytest.mark.parametrize("index, ratio", [(0, 4), (1, 16)])
def test_on_step_sees_every_step_with_its_group_lrs(runs, index, ratio):
    result, seen = runs[index]
    assert [(info.step, info.epoch) for info in seen] == [(1, 1), (2, 1), (3, 2), (4, 2)]
    for info, unet_lr in zip(seen, UNET_LRS):
        assert list(info.lrs) == GROUPS
        assert info.lrs["unet"] == pytest.approx(unet_lr)
        assert info.lrs["unet plus"] == pytest.approx(ratio * unet_lr)  # B at ratio x, every step
        assert not info.skipped
    # Validation at step 3 (every 3 steps) and at the end of epoch 2 (step 4; every 2 epochs).
    assert [info.step for info in seen if info.validation_loss is not None] == [3, 4]
    assert result.validation_losses == [
        (info.step, info.validation_loss) for info in seen if info.validation_loss is not None
    ]
    assert result.losses == [info.loss for info in seen]
    assert result.lrs == [dict(info.lrs) for info in seen]


def test_the_result_holds_what_a_sweep_needs_without_parsing_logs(runs):
    result, _ = runs[1]
    assert result.final_path.is_file() and result.saved_paths == [result.final_path]
    assert result.report == json.loads(result.report_path.read_text())
    assert result.report["steps"] == result.steps == 4 and result.epochs == 2
    groups = {g.description: g for g in result.param_groups}
    assert list(groups) == GROUPS
    assert groups["unet plus"].lr == pytest.approx(16 * groups["unet"].lr) and groups["unet plus"].plus
    rows = json.loads((result.final_path.parent / "run_param_groups.json").read_text())
    assert [(r["description"], r["lr"], r["tensors"]) for r in rows] == [
        (g.description, g.lr, g.tensors) for g in result.param_groups
    ]


def test_runs_in_one_process_are_independent(runs):
    (first, first_seen), (other, _), (again, again_seen) = runs
    # The same config in the same process gives the same run, step for step and bit for bit, after a run with
    # another ratio: nothing of that run (RNG, accelerate state, optimizer, schedule) leaked into it.
    assert again.losses == first.losses and again.validation_losses == first.validation_losses
    assert again.lrs == first.lrs and again_seen == first_seen
    want, got = load_file(str(first.final_path)), load_file(str(again.final_path))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    # The ratio matters: step 1 is the same (B starts at 0), later steps differ.
    assert other.losses[0] == first.losses[0] and other.losses[1:] != first.losses[1:]
    assert first.final_path.parent != again.final_path.parent


def test_step_info_cannot_be_changed_by_the_caller(runs):
    info = runs[0][1][0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.loss = 0.0
    with pytest.raises(TypeError):
        info.lrs["unet"] = 0.0
