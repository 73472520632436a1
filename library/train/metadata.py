"""The `ss_*` / `modelspec.*` metadata written into every LoRA file (all values are strings).

ComfyUI, A1111/Forge and LoRA browsers read these; names and formats follow sd-scripts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime

from library.train.loss import loss_metadata
from library.train.run_config import TrainConfig
from networks.lora import ParamGroupInfo

IMPLEMENTATION_VERSION = "loraplus-trainer/0.1.0"
BASE_MODEL_VERSION = "sdxl_base_v1-0"

# Options sd-scripts records that this trainer does not offer yet: written with the value that means
# "off", so tools that read them see what actually ran.
FEATURES_OFF = {
    "ss_clip_skip": "None",
    "ss_face_crop_aug_range": "None",
    "ss_resize_interpolation": "None",
    "ss_scale_weight_norms": "None",
    "ss_num_validation_images": "0",
    "ss_validation_split": "0.0",
    "ss_validation_seed": "None",
    "ss_validate_every_n_steps": "None",
    "ss_validate_every_n_epochs": "None",
    "ss_max_validation_steps": "None",
}
MODELSPEC_ARCHITECTURE = "stable-diffusion-xl-v1-base/lora"


@dataclass(frozen=True)
class DatasetSummary:
    """What the dataset contributes to the metadata."""

    num_train_images: int
    tag_frequency: Mapping[str, Mapping[str, int]]
    dataset_dirs: Mapping[str, Mapping[str, int]]
    bucket_counts: Mapping[tuple[int, int], int]
    mean_ar_error: float
    num_batches_per_epoch: int
    num_reg_images: int = 0
    reg_dataset_dirs: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    subsets: Sequence[Mapping[str, object]] = ()
    """One dict per subset (its folder and options), as sd-scripts' `ss_datasets` lists them."""


def _s(value: object) -> str:
    return str(value)


def training_metadata(
    cfg: TrainConfig,
    *,
    model_name: str,
    model_hash: str,
    new_model_hash: str,
    dataset: DatasetSummary,
    param_groups: Sequence[ParamGroupInfo],
    total_steps: int,
    num_epochs: int,
    mixed_precision: str,
    optimizer_name: str,
    session_id: int,
    started_at: float,
) -> dict[str, str]:
    """Metadata fixed for the whole run (progress fields are added per save by `progress_metadata`)."""
    data, net, opt, loop = cfg.data, cfg.network, cfg.optimizer, cfg.loop
    buckets = {
        str(i): {"resolution": list(reso), "count": count}
        for i, (reso, count) in enumerate(sorted(dataset.bucket_counts.items()))
    }
    bucket_info = {"buckets": buckets, "mean_img_ar_error": dataset.mean_ar_error}
    te_lr = opt.text_encoder_lr[0] if opt.text_encoder_lr else None
    return {
        **FEATURES_OFF,
        "ss_session_id": _s(session_id),
        "ss_training_started_at": _s(started_at),
        "ss_output_name": cfg.output.output_name,
        "ss_learning_rate": _s(opt.learning_rate),
        "ss_text_encoder_lr": _s(te_lr),
        "ss_unet_lr": _s(opt.unet_lr),
        "ss_num_train_images": _s(dataset.num_train_images),
        "ss_num_reg_images": _s(dataset.num_reg_images),
        "ss_max_token_length": _s(loop.max_token_length if loop.max_token_length != 75 else None),
        "ss_reg_dataset_dirs": json.dumps(dataset.reg_dataset_dirs, ensure_ascii=False),
        "ss_datasets": json.dumps([{"subsets": list(dataset.subsets)}], ensure_ascii=False, default=str),
        "ss_num_batches_per_epoch": _s(dataset.num_batches_per_epoch),
        "ss_num_epochs": _s(num_epochs),
        "ss_gradient_checkpointing": _s(cfg.precision.gradient_checkpointing),
        "ss_gradient_accumulation_steps": _s(loop.gradient_accumulation_steps),
        "ss_max_train_steps": _s(total_steps),
        "ss_lr_warmup_steps": _s(opt.lr_warmup_steps),
        "ss_lr_scheduler": opt.lr_scheduler,
        "ss_network_module": net.module,
        "ss_network_dim": _s(net.dim),
        "ss_network_alpha": _s(net.alpha),
        "ss_network_dropout": _s(net.dropout),
        "ss_network_args": json.dumps(net.args),
        "ss_loraplus_lr_ratio": _s(net.args.get("loraplus_lr_ratio")),
        "ss_loraplus_unet_lr_ratio": _s(net.loraplus.unet),
        "ss_loraplus_text_encoder_lr_ratio": _s(net.loraplus.text_encoder),
        "ss_mixed_precision": mixed_precision,
        "ss_full_fp16": _s(cfg.precision.request.full_fp16),
        "ss_fp8_base": _s(cfg.precision.request.fp8_base),
        "ss_fp8_base_unet": _s(cfg.precision.request.fp8_base_unet),
        "ss_lowram": _s(cfg.precision.lowram),
        "ss_v2": "False",
        "ss_base_model_version": BASE_MODEL_VERSION,
        "ss_sd_model_name": model_name,
        "ss_sd_model_hash": model_hash,
        "ss_new_sd_model_hash": new_model_hash,
        "ss_resolution": _s(data.resolution),
        "ss_enable_bucket": _s(data.enable_bucket),
        "ss_min_bucket_reso": _s(data.min_bucket_reso),
        "ss_max_bucket_reso": _s(data.max_bucket_reso),
        "ss_bucket_no_upscale": _s(data.bucket_no_upscale),
        "ss_bucket_info": json.dumps(bucket_info),
        "ss_tag_frequency": json.dumps(dataset.tag_frequency, ensure_ascii=False),
        "ss_dataset_dirs": json.dumps(dataset.dataset_dirs, ensure_ascii=False),
        "ss_batch_size_per_device": _s(loop.batch_size),
        "ss_total_batch_size": _s(loop.batch_size * loop.gradient_accumulation_steps),
        "ss_cache_latents": _s(loop.cache_latents),
        "ss_shuffle_caption": _s(data.shuffle_caption),
        "ss_keep_tokens": _s(data.keep_tokens),
        "ss_random_crop": _s(data.random_crop),
        "ss_caption_dropout_rate": _s(data.caption_dropout_rate),
        "ss_caption_tag_dropout_rate": _s(data.caption_tag_dropout_rate),
        "ss_caption_dropout_every_n_epochs": _s(data.caption_dropout_every_n_epochs),
        "ss_flip_aug": _s(data.flip_aug),
        "ss_color_aug": "False",
        "ss_max_grad_norm": _s(opt.max_grad_norm),
        "ss_optimizer": optimizer_name,
        "ss_seed": _s(loop.seed),
        **loss_metadata(cfg.loss),
        "ss_prior_loss_weight": _s(data.prior_loss_weight),
        "ss_training_comment": _s(cfg.output.training_comment),
        "ss_lr_param_groups": json.dumps([asdict(g) for g in param_groups]),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.implementation_version": IMPLEMENTATION_VERSION,
        "modelspec.title": cfg.output.output_name,
        "modelspec.resolution": f"{data.resolution[0]}x{data.resolution[1]}",
        "modelspec.prediction_type": "epsilon",
    }


def progress_metadata(base: Mapping[str, str], *, steps: int, epoch: int, finished: bool) -> dict[str, str]:
    """The run's metadata stamped with the progress of the file being saved."""
    now = time.time()
    metadata = dict(base)
    metadata["ss_steps"] = _s(steps)
    metadata["ss_epoch"] = _s(epoch)
    metadata["modelspec.date"] = datetime.fromtimestamp(now).isoformat(timespec="seconds")
    if finished:
        metadata["ss_training_finished_at"] = _s(now)
    return metadata
