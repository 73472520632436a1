"""What goes to the experiment trackers (TensorBoard, wandb, any accelerate `GeneralTracker`) besides the per-step
scalars: the run's settings at the start, so runs (and LoRA+ ratios) can be compared side by side, and the sample
images.

Every tracker gets what it can take, each call guarded: a tracker that fails is reported in one warning line and
training goes on (a dashboard is never worth a lost run).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from library.train.run_config import LoopConfig, NetworkConfig, OptimizerConfig

Scalar = int | float | str | bool
"""What TensorBoard's HParams and wandb's config both accept."""


def run_hparams(
    network: NetworkConfig,
    optimizer: OptimizerConfig,
    loop: LoopConfig,
    precision: Mapping[str, str],
    *,
    total_steps: int,
    num_epochs: int,
    num_train_images: int,
) -> dict[str, Scalar]:
    """The run's settings as one flat dict of scalars, named like the flags they come from.

    Values are the effective ones, so runs compare on one axis: `unet_lr` / `text_encoder_lr` fall back to
    `learning_rate` as training does, a LoRA+ ratio that is off is 1.0 (B learns at A's rate, which is what "off"
    means), and the step and epoch counts are the ones this run takes. `precision` is what ran
    (`PrecisionPlan.summary()`), not what was asked for."""
    ratios = network.loraplus
    te_lr = optimizer.text_encoder_lr[0] if optimizer.text_encoder_lr else optimizer.learning_rate
    hparams: dict[str, Scalar] = {
        "learning_rate": optimizer.learning_rate,
        "unet_lr": optimizer.learning_rate if optimizer.unet_lr is None else optimizer.unet_lr,
        "text_encoder_lr": te_lr,
        "loraplus_unet_lr_ratio": 1.0 if ratios.unet is None else ratios.unet,
        "loraplus_text_encoder_lr_ratio": 1.0 if ratios.text_encoder is None else ratios.text_encoder,
        "network_module": network.module,
        "network_dim": network.dim,
        "network_alpha": network.alpha,
        "network_dropout": network.dropout or 0.0,
        "network_args": _key_values(network.args),
        "network_weights": str(network.weights) if network.weights is not None else "",
        "train_unet": network.train_unet,
        "train_text_encoder": network.train_text_encoder,
        "optimizer_type": optimizer.optimizer_type,
        "optimizer_args": _key_values(optimizer.optimizer_args),
        "lr_scheduler": optimizer.lr_scheduler_type or optimizer.lr_scheduler,
        "lr_warmup_steps": optimizer.lr_warmup_steps,
        "lr_scheduler_num_cycles": optimizer.lr_scheduler_num_cycles,
        "max_grad_norm": optimizer.max_grad_norm,
        "train_batch_size": loop.batch_size,
        "gradient_accumulation_steps": loop.gradient_accumulation_steps,
        "max_train_steps": total_steps,
        "max_train_epochs": num_epochs,
        "seed": loop.seed,
        "num_train_images": num_train_images,
        "max_token_length": loop.max_token_length,
    }
    hparams.update({f"precision/{name}": value for name, value in precision.items()})
    return hparams


def store_run_config(trackers: Iterable[Any], hparams: Mapping[str, Scalar], metrics: Sequence[str]) -> list[str]:
    """Record `hparams` in every tracker; returns one warning line per tracker that failed.

    TensorBoard gets them in the run's own event file (accelerate's `store_init_configuration` writes them to a
    separate timestamped run, where the HParams dashboard cannot pair them with this run's `metrics`)."""
    problems = []
    for tracker in trackers:
        try:
            if tracker.name == "tensorboard":
                _tensorboard_hparams(tracker.writer, dict(hparams), metrics)
            else:
                tracker.store_init_configuration(dict(hparams))
        except Exception as error:  # noqa: BLE001 - a tracker's failure must not stop training
            problems.append(f"could not record the run's settings in {tracker.name}: {_reason(error)}")
    return problems


def log_sample_images(trackers: Iterable[Any], images: Sequence[tuple[str, np.ndarray]], step: int) -> list[str]:
    """Send the sample images ((name, (H, W, 3) uint8)) to every tracker that takes images (TensorBoard's
    add_images, wandb.Image, any tracker with accelerate's `log_images`); returns one warning line per failure."""
    problems = []
    for tracker in trackers:
        if not hasattr(tracker, "log_images"):
            continue
        try:
            for name, image in images:
                if tracker.name == "tensorboard":
                    tracker.log_images({name: image[None]}, step=step, dataformats="NHWC")
                else:
                    tracker.log_images({name: [image]}, step=step)
        except Exception as error:  # noqa: BLE001 - a tracker's failure must not stop training
            problems.append(
                f"could not log sample images to {tracker.name}: {_reason(error)} (the images are saved "
                "in the sample folder)"
            )
    return problems


def _tensorboard_hparams(writer, hparams: dict[str, Scalar], metrics: Sequence[str]) -> None:
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    for summary in hparams_summary(hparams, {name: 0.0 for name in metrics}):  # metric values are not written
        writer.file_writer.add_summary(summary)
    writer.flush()


def _key_values(values: Mapping[str, Any]) -> str:
    return " ".join(f"{key}={value}" for key, value in values.items())


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
