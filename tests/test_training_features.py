"""Issue 6 features end to end on the tiny SDXL: every optimizer trains and saves, schedules count steps right
with gradient accumulation, loss options reach the loss, validation is deterministic, EMA files, samples and
the log options."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.config.build import config_from_args
from library.config.cli import build_parser
from library.train.optim import ADAPTIVE_OPTIMIZER_TYPES, OPTIMIZER_TYPES
from library.train.trainer import train
from tests.cli_args import tiny_train_argv
from tools.make_demo_dataset import make_demo_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("features_data")
    make_demo_dataset(root, count=4, min_side=64, max_side=64, repeats=1, name="toy", seed=2)
    return root


def _train(model: Path, data: Path, out: Path, *extra: str):
    argv = tiny_train_argv(model, data, out, "--cache_latents", "--network_dim", "4", "--output_name", "run", *extra)
    return train(config_from_args(build_parser().parse_args(argv)))


def _scalars(logs: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (event_file,) = logs.rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(event_file.parent))
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


@pytest.mark.parametrize("optimizer", [name for name in OPTIMIZER_TYPES if name not in ADAPTIVE_OPTIMIZER_TYPES])
@pytest.mark.slow
def test_every_optimizer_trains_and_saves(tiny_sdxl, data, tmp_path, optimizer):
    args = ["--optimizer_args", "relative_step=False", "scale_parameter=False"] if optimizer == "Adafactor" else []
    result = _train(
        tiny_sdxl.single_file,
        data,
        tmp_path,
        "--optimizer_type",
        optimizer,
        "--max_train_steps",
        "2",
        "--learning_rate",
        "1e-3",
        "--network_train_unet_only",
        *args,
    )
    assert result.steps == 2 and all(np.isfinite(result.losses))
    tensors = load_file(str(result.final_path))
    ups = [t for k, t in tensors.items() if k.endswith("lora_up.weight")]
    assert ups and any(t.abs().sum() > 0 for t in ups)  # B starts at zero: the optimizer moved it


@pytest.mark.slow
def test_scheduler_counts_steps_with_gradient_accumulation(tiny_sdxl, data, tmp_path):
    # 4 images, batch 1, accumulation 2: 2 optimizer steps per epoch, 3 epochs = 6 steps; the cosine schedule with
    # 2 warmup steps is the library's own curve over those 6 steps.
    from diffusers.optimization import get_scheduler

    result = _train(
        tiny_sdxl.single_file,
        data,
        tmp_path / "out",
        "--train_batch_size",
        "1",
        "--gradient_accumulation_steps",
        "2",
        "--max_train_epochs",
        "3",
        "--lr_scheduler",
        "cosine",
        "--lr_warmup_steps",
        "2",
        "--learning_rate",
        "1e-3",
        "--logging_dir",
        str(tmp_path / "logs"),
        "--network_train_unet_only",
    )
    assert (result.steps, result.epochs) == (6, 3)
    param = torch.nn.Parameter(torch.zeros(1))
    reference = get_scheduler("cosine", torch.optim.SGD([param], lr=1e-3), num_warmup_steps=2, num_training_steps=6)
    expected = []
    for _ in range(6):
        reference.optimizer.step()
        reference.step()
        expected.append(reference.get_last_lr()[0])
    assert _scalars(tmp_path / "logs", "lr/unet") == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_loss_options_reach_the_training_loss(tiny_sdxl, data, tmp_path):
    base = _train(tiny_sdxl.single_file, data, tmp_path / "a", "--max_train_steps", "2")
    weighted = _train(
        tiny_sdxl.single_file,
        data,
        tmp_path / "b",
        "--max_train_steps",
        "2",
        "--min_snr_gamma",
        "1",
        "--loss_type",
        "huber",
        "--huber_schedule",
        "constant",
        "--noise_offset",
        "0.05",
    )
    assert weighted.losses != base.losses
    with safe_open(str(weighted.final_path), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_min_snr_gamma"], meta["ss_loss_type"], meta["ss_noise_offset"]) == ("1.0", "huber", "0.05")


@pytest.fixture(scope="module")
def validated_runs(tiny_sdxl, data, tmp_path_factory):
    runs = []
    for ratio in ("4", "4", "16"):
        out = tmp_path_factory.mktemp(f"validated_{ratio}")
        runs.append(
            (
                out,
                _train(
                    tiny_sdxl.single_file,
                    data,
                    out,
                    "--max_train_steps",
                    "4",
                    "--validation_split",
                    "0.25",
                    "--validate_every_n_steps",
                    "2",
                    "--loraplus_lr_ratio",
                    ratio,
                    "--learning_rate",
                    "1e-3",
                    "--network_dropout",
                    "0.1",
                    "--logging_dir",
                    str(out / "logs"),
                    "--ema_decay",
                    "0.9",
                    "--save_every_n_steps",
                    "2",
                ),
            )
        )
    return runs


@pytest.mark.slow
def test_validation_loss_is_identical_across_runs_with_the_same_seed(validated_runs):
    (_, first), (_, second), (_, other_ratio) = validated_runs
    assert [step for step, _ in first.validation_losses] == [2, 4]
    assert first.validation_losses == second.validation_losses
    # Another LoRA+ ratio trains other weights, measured on the same images, timesteps and noise.
    assert [s for s, _ in other_ratio.validation_losses] == [2, 4]
    assert other_ratio.validation_losses != first.validation_losses


def test_validation_is_logged_and_recorded(validated_runs):
    out, result = validated_runs[0]
    logged = _scalars(out / "logs", "loss/validation")
    assert logged == pytest.approx([loss for _, loss in result.validation_losses])
    with safe_open(str(result.final_path), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_num_validation_images"], meta["ss_validation_split"]) == ("1", "0.25")
    assert json.loads(meta["ss_dataset_dirs"])["1_toy"]["img_count"] == 3  # the held-out image does not train


def test_ema_files_hold_the_average_of_the_weights(validated_runs):
    out, result = validated_runs[0]
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "run-ema.safetensors",
        "run-step00000002-ema.safetensors",
        "run-step00000002.safetensors",
        "run.safetensors",
    ]
    final, ema = load_file(str(out / "run.safetensors")), load_file(str(out / "run-ema.safetensors"))
    assert final.keys() == ema.keys()
    ups = [k for k in final if k.endswith("lora_up.weight")]
    assert all(
        torch.equal(final[k.replace("lora_up.weight", "alpha")], ema[k.replace("lora_up.weight", "alpha")]) for k in ups
    )
    # B starts at 0 and the EMA lags behind it: smaller in norm, not equal.
    assert sum(ema[k].norm() for k in ups) < sum(final[k].norm() for k in ups)
    with safe_open(str(out / "run-ema.safetensors"), "pt") as f:
        assert f.metadata()["ss_ema_decay"] == "0.9"


@pytest.mark.slow
def test_samples_are_written_named_and_logged(tiny_sdxl, data, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square --w 64 --h 64 --s 2 --d 5\na blue circle --n green --w 64 --h 64 --s 2\n")
    _train(
        tiny_sdxl.single_file,
        data,
        tmp_path / "out",
        "--max_train_steps",
        "2",
        "--sample_prompts",
        str(prompts),
        "--sample_every_n_steps",
        "2",
        "--sample_at_first",
        "--sample_sampler",
        "euler_a",
        "--logging_dir",
        str(tmp_path / "logs"),
        "--cache_text_encoder_outputs",
        "--network_train_unet_only",
    )
    names = sorted(p.name for p in (tmp_path / "out" / "sample").iterdir())
    assert len(names) == 4
    # sd-scripts' names: before training "e000000" (epoch 0), then the step; the prompt index; its seed last.
    assert [n.split("_")[1:3] for n in names] == [
        ["000002", "00"],
        ["000002", "01"],
        ["e000000", "00"],
        ["e000000", "01"],
    ]
    assert names[0].endswith("_5.png") and names[2].endswith("_5.png")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (event_file,) = (tmp_path / "logs").rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(event_file.parent), size_guidance={"images": 0})
    acc.Reload()
    assert {"sample_0", "sample_1"} <= set(acc.Tags()["images"])


@pytest.mark.slow
def test_log_prefix_and_tracker_name_name_the_run_folder(tiny_sdxl, data, tmp_path):
    _train(
        tiny_sdxl.single_file,
        data,
        tmp_path / "out",
        "--max_train_steps",
        "1",
        "--logging_dir",
        str(tmp_path / "logs"),
        "--log_prefix",
        "ratio16-",
        "--log_tracker_name",
        "sweep",
        "--log_with",
        "tensorboard",
    )
    (run_dir,) = (tmp_path / "logs").iterdir()
    assert run_dir.name.startswith("ratio16-")
    assert list((run_dir / "sweep").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_validation_with_cached_text_encoder_outputs(tiny_sdxl, data, tmp_path):
    result = _train(
        tiny_sdxl.single_file,
        data,
        tmp_path,
        "--max_train_steps",
        "2",
        "--validation_split",
        "0.25",
        "--validate_every_n_steps",
        "1",
        "--cache_text_encoder_outputs",
        "--network_train_unet_only",
    )
    assert [step for step, _ in result.validation_losses] == [1, 2]
    assert all(np.isfinite(loss) for _, loss in result.validation_losses)


@pytest.mark.slow
def test_samples_at_epoch_ends_are_named_by_epoch(tiny_sdxl, data, tmp_path):
    prompts = tmp_path / "prompts.toml"
    prompts.write_text(
        '[prompt]\nwidth = 64\nheight = 64\nsample_steps = 2\n\n[[prompt.subset]]\nprompt = "a cat"\nseed = 7\n'
    )
    _train(
        tiny_sdxl.single_file,
        data,
        tmp_path / "out",
        "--max_train_epochs",
        "2",
        "--sample_prompts",
        str(prompts),
        "--sample_every_n_epochs",
        "1",
    )
    names = sorted(p.name for p in (tmp_path / "out" / "sample").iterdir())
    assert [n.split("_")[1:3] for n in names] == [["e000001", "00"], ["e000002", "00"]]
    assert all(n.endswith("_7.png") for n in names)
