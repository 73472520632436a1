"""Trackers compare runs: every tracker gets the run's settings at the start and the sample images, each guarded.

wandb itself is not installed for the tests (its offline mode starts a service process and it adds minutes to a
fresh install): a stand-in `wandb` module records what accelerate's own `WandBTracker` sends it, which is the
part this project owns. TensorBoard is real and its event file is read back.
"""

from __future__ import annotations

import importlib.machinery
import json
import logging
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from accelerate.tracking import GeneralTracker
from accelerate.utils import LoggerType

import train_network
from library.train.trackers import log_sample_images, store_run_config
from tests.cli_args import tiny_train_argv
from tools.make_demo_dataset import make_demo_dataset

LR = 3e-4
PROMPTS = "a red square --w 64 --h 64 --s 2 --d 5\n"


class _FakeRun:
    def __init__(self, project: str) -> None:
        self.project, self.logged, self.finished = project, [], False

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.logged.append((step, values))

    def finish(self) -> None:
        self.finished = True


class _FakeImage:
    def __init__(self, data) -> None:
        self.data = np.asarray(data)


def _fake_wandb() -> types.ModuleType:
    """What accelerate's WandBTracker calls: wandb.init, wandb.config.update, run.log, wandb.Image, run.finish."""
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    module.runs, module.configs = [], []
    module.init = lambda project=None, **kwargs: module.runs.append(_FakeRun(project)) or module.runs[-1]
    module.config = types.SimpleNamespace(update=lambda values, allow_val_change=False: module.configs.append(values))
    module.Image = _FakeImage
    return module


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_demo_dataset(root, count=4, min_side=64, max_side=96, repeats=1, name="toy", seed=0)
    return root


def _argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    prompts = out.parent / "prompts.txt"
    prompts.write_text(PROMPTS, encoding="utf-8")
    return tiny_train_argv(
        model,
        data,
        out,
        "--max_train_steps",
        "2",
        "--network_dim",
        "2",
        "--learning_rate",
        str(LR),
        "--loraplus_unet_lr_ratio",
        "16",
        "--optimizer_type",
        "AdamW",
        "--network_train_unet_only",
        "--cache_text_encoder_outputs",
        "--sample_prompts",
        str(prompts),
        "--sample_at_first",
        "--sample_every_n_steps",
        "2",
        *extra,
    )


@pytest.fixture(scope="module")
def wandb_run(tiny_sdxl, data, tmp_path_factory):
    """--log_with wandb (no TensorBoard) with samples - sd-scripts' users' combination that crashed at the first
    sample - and --xformers where xformers passes the import check but fails on its first call."""
    out = tmp_path_factory.mktemp("wandb") / "out"
    fake = _fake_wandb()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("library.model.base_models").addHandler(handler)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "wandb", fake)
        patch.setattr("accelerate.tracking._available_trackers", [LoggerType.WANDB])
        patch.setattr("library.model.precision.xformers_problem", lambda device_type: None)  # "imports fine"
        code = train_network.main(_argv(tiny_sdxl.single_file, data, out, "--log_with", "wandb", "--xformers"))
    logging.getLogger("library.model.base_models").removeHandler(handler)
    assert code == 0
    return types.SimpleNamespace(out=out, wandb=fake, warnings=[r.getMessage() for r in records])


@pytest.mark.slow
def test_wandb_gets_the_settings_and_the_samples(wandb_run):
    (run,) = wandb_run.wandb.runs
    assert run.project == "network_train" and run.finished
    (config,) = wandb_run.wandb.configs
    assert config["learning_rate"] == LR and config["unet_lr"] == LR
    assert config["loraplus_unet_lr_ratio"] == 16.0 and config["loraplus_text_encoder_lr_ratio"] == 1.0
    assert config["network_dim"] == 2 and config["network_alpha"] == 1.0 and config["optimizer_type"] == "AdamW"
    assert config["train_batch_size"] == 2 and config["max_train_steps"] == 2 and config["seed"] == 42
    assert config["num_train_images"] == 4 and config["train_text_encoder"] is False
    assert config["precision/compute"] == "float32"
    assert all(isinstance(value, (int, float, str, bool)) for value in config.values())
    samples = [(step, values["sample_0"]) for step, values in run.logged if "sample_0" in values]
    assert [step for step, _ in samples] == [0, 2]  # before training and at step 2
    for _, images in samples:
        (image,) = images
        assert isinstance(image, _FakeImage) and image.data.shape == (64, 64, 3) and image.data.dtype == np.uint8
    assert [step for step, values in run.logged if "loss" in values] == [1, 2]


def test_xformers_failing_on_its_first_call_falls_back_to_sdpa(wandb_run):
    assert any(
        "--xformers: xformers cannot run on this machine" in w and "using PyTorch SDPA attention instead" in w
        for w in wandb_run.warnings
    ), wandb_run.warnings
    report = json.loads((wandb_run.out / "last_report.json").read_text(encoding="utf-8"))
    assert report["attention"] == "sdpa"  # what ran, not what was asked for


@pytest.mark.slow
def test_tensorboard_event_file_holds_the_settings_and_the_samples(tiny_sdxl, data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    out = tmp_path / "out"
    assert train_network.main(_argv(tiny_sdxl.single_file, data, out, "--logging_dir", str(tmp_path / "logs"))) == 0
    (event_file,) = (tmp_path / "logs").rglob("events.out.tfevents.*")  # one run: settings beside its scalars
    plugin = {}
    for event in EventFileLoader(str(event_file)).Load():
        for value in event.summary.value:
            if value.tag.startswith("_hparams_/"):
                plugin[value.tag] = HParamsPluginData.FromString(value.metadata.plugin_data.content)
    hparams = plugin["_hparams_/session_start_info"].session_start_info.hparams
    assert hparams["learning_rate"].number_value == pytest.approx(LR)
    assert hparams["loraplus_unet_lr_ratio"].number_value == 16.0
    assert hparams["network_dim"].number_value == 2 and hparams["max_train_steps"].number_value == 2
    assert hparams["optimizer_type"].string_value == "AdamW" and hparams["lr_scheduler"].string_value == "constant"
    assert hparams["train_unet"].number_value == 1 and hparams["num_train_images"].number_value == 4  # torch: bool -> 1
    metrics = plugin["_hparams_/experiment"].experiment.metric_infos
    assert [m.name.tag for m in metrics] == ["loss/average"]
    acc = EventAccumulator(str(event_file.parent), size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("sample_0")] == [0, 2]
    assert {"loss", "loss/average", "lr/unet", "lr/unet plus"} <= set(acc.Tags()["scalars"])


class _Tracker(GeneralTracker):
    """A tracker registered through accelerate's GeneralTracker API; `fail` makes every call raise."""

    name = "fake"
    requires_logging_directory = False

    def __init__(self, fail: bool = False, images: bool = True) -> None:
        super().__init__()
        self.fail, self.config, self.images = fail, None, []
        if images:
            self.log_images = self._log_images

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values: dict) -> None:
        if self.fail:
            raise ConnectionError("offline")
        self.config = values

    def _log_images(self, values: dict, step: int | None = None, **kwargs) -> None:
        if self.fail:
            raise ConnectionError("offline\nsecond line")
        self.images.append((step, {key: [np.asarray(v).shape for v in images] for key, images in values.items()}))


def test_a_failing_tracker_is_one_warning_and_the_others_still_get_everything():
    broken, working, imageless = _Tracker(fail=True), _Tracker(), _Tracker(images=False)
    trackers = [broken, working, imageless]
    image = np.zeros((64, 48, 3), np.uint8)
    assert log_sample_images(trackers, [("sample_0", image), ("sample_1", image)], 7) == [
        "could not log sample images to fake: ConnectionError: offline (the images are saved in the sample folder)"
    ]
    assert working.images == [(7, {"sample_0": [(64, 48, 3)]}), (7, {"sample_1": [(64, 48, 3)]})]
    assert imageless.images == []  # no log_images: nothing to send, no warning
    assert store_run_config(trackers, {"learning_rate": LR}, ["loss/average"]) == [
        "could not record the run's settings in fake: ConnectionError: offline"
    ]
    assert working.config == imageless.config == {"learning_rate": LR}
