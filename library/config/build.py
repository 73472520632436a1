"""The one place the argparse namespace becomes typed, frozen, validated configuration.

Everything below this module receives the dataclass slice it needs. Validation here is cheap and
runs before any model loads, so bad input costs a second and one clear line.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
from dataclasses import replace
from pathlib import Path

from library.train.run_config import (LoopConfig, ModelConfig, NetworkConfig, OptimizerConfig, OutputConfig,
                                      TrainConfig)
from library.train.optim import (canonical_optimizer_type, canonical_scheduler, is_adaptive, optimizer_class,
                                 per_group_lr_problem, schedule_problem, scheduler_class)
from library.train.loss import HUBER_SCHEDULES, LOSS_TYPES, NUM_TRAIN_TIMESTEPS, LossOptions
from library.model.precision import PrecisionConfig, PrecisionRequest, check_precision_flags, save_dtype
from library.train.sampling import SamplingConfig, make_sampling_config
from library.train.train_state import check_resume_folder, saved_progress
from library.train.ema import EMAConfig
from library.train.validation import ValidationConfig, validation_timesteps
from library.files.weight_files import read_safetensors_header
from library.files.lora_io import check_lora_file
from library.model.model_files import ModelShapes, check_model_files
from library.files.output_checks import FirstSave, check_free_space, check_output_folder, estimate_first_save
from networks.block_weights import block_dims_and_alphas, block_lr_weights
from networks.lora_size import diffusers_lora_layers, lora_parameter_count, single_file_lora_layers
from library.data.dataset import DatasetConfig
from library.data.dataset_config import load_dataset_config
from library.errors import UserInputError
from library.model.text_encoding import check_max_token_length
from networks.block_weights import EMBEDDING_BLOCK, OUT_BLOCK, block_dims_and_alphas, block_index, block_lr_weights
from networks.network_args import LORAPLUS_KEYS, LoRAPlusRatios, merge_loraplus_flags, parse_network_args


def parse_resolution(text: str) -> tuple[int, int]:
    """'1024' -> (1024, 1024); '832,1216' -> (832, 1216) as (W, H)."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise UserInputError(f'--resolution: {text!r} is not "W,H" or one number') from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) <= 0:
        raise UserInputError(f'--resolution: {text!r} is not "W,H" or one number')
    return values[0], values[1]


def parse_key_values(items: list[str] | None, flag: str) -> dict[str, str]:
    parsed = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserInputError(f"{flag}: '{item}' is not key=value")
        parsed[key.strip()] = value.strip()
    return parsed


BLOCK_LR_KEYS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")


def planned_group_lrs(
    learning_rate: float,
    unet_lr: float | None,
    text_encoder_lr: list[float] | None,
    loraplus: LoRAPlusRatios,
    train_unet: bool,
    train_text_encoder: bool,
) -> dict[str, float]:
    """The learning rate of every optimizer group the run will have (before block weights), by name."""
    groups: dict[str, float] = {}
    te_lr = text_encoder_lr[0] if text_encoder_lr else learning_rate
    u_lr = learning_rate if unet_lr is None else unet_lr
    for component, lr, ratio, trained in (
        ("textencoder", te_lr, loraplus.text_encoder, train_text_encoder),
        ("unet", u_lr, loraplus.unet, train_unet),
    ):
        if trained and lr != 0:
            groups[component] = lr
            if ratio is not None:
                groups[f"{component} plus"] = lr * ratio
    return groups


def check_run_length(max_train_steps: int, max_train_epochs: int | None) -> None:
    """A run of no steps would only write the untrained LoRA (B = 0: a file that changes nothing): refuse it."""
    if max_train_epochs is not None:
        if max_train_epochs <= 0:
            raise UserInputError(f"--max_train_epochs {max_train_epochs} trains nothing (it overrides "
                                 "--max_train_steps): give 1 or more")
    elif max_train_steps <= 0:
        raise UserInputError(f"--max_train_steps {max_train_steps} trains nothing: give 1 or more (or --max_train_epochs)")


def check_learning_rates(learning_rate: float, unet_lr: float | None, text_encoder_lr: list[float] | None) -> None:
    """Every rate is a finite number >= 0 (a negative one climbs the loss, a NaN one breaks the weights)."""
    given = [("--learning_rate", learning_rate), ("--unet_lr", unet_lr)]
    given += [("--text_encoder_lr", lr) for lr in text_encoder_lr or ()]
    for flag, lr in given:
        if lr is not None and not (math.isfinite(lr) and lr >= 0):
            raise UserInputError(f"{flag} {lr} must be a finite number >= 0 (e.g. 1e-4)")


def check_something_trains(
    learning_rate: float, unet_lr: float | None, text_encoder_lr: list[float] | None,
    train_unet: bool, train_text_encoder: bool, unet_empty: str | None = None, text_encoder_empty: str | None = None,
) -> None:
    """Refuse a run in which no LoRA weight would change: each component is not trained, at lr 0, or gets no
    modules (`unet_empty` / `text_encoder_empty` say why, e.g. every block lr weight is 0)."""
    te_lr, te_flag = (text_encoder_lr[0], "--text_encoder_lr") if text_encoder_lr else (learning_rate, "--learning_rate")
    u_lr, u_flag = (unet_lr, "--unet_lr") if unet_lr is not None else (learning_rate, "--learning_rate")
    reasons = []
    for name, trained, excluded_by, lr, flag, empty in (
        ("the text encoders", train_text_encoder, "--network_train_unet_only", te_lr, te_flag, text_encoder_empty),
        ("the UNet", train_unet, "--network_train_text_encoder_only", u_lr, u_flag, unet_empty),
    ):
        if not trained:
            reasons.append(f"{name}: not trained ({excluded_by})")
        elif lr == 0:
            reasons.append(f"{name}: learning rate 0 ({flag} 0)")
        elif empty:
            reasons.append(f"{name}: {empty}")
        else:
            return
    advice = "give a learning rate above 0" if all("learning rate 0" in r or "not trained" in r for r in reasons) \
        else "change one of these"
    raise UserInputError(f"nothing would train ({'; '.join(reasons)}): {advice}")


def unet_without_modules(network_args: dict[str, str], dim: int, alpha: float,
                         weights_names: list[str] | None) -> str | None:
    """Why the UNet would get no trained LoRA module from the block network_args (every block lr weight or block
    dim 0), or None. `weights_names`: the module names of --network_weights under --dim_from_weights."""
    lr_weights = block_lr_weights(network_args)
    adapted = range(EMBEDDING_BLOCK + 1, OUT_BLOCK)  # blocks 0 and 22 are never adapted
    if weights_names is not None:
        names = [name for name in weights_names if name.startswith("lora_unet_")]
        if not names:
            return "the --network_weights file has no UNet modules"
        if lr_weights is not None and not any(lr_weights[_block_or(name, EMBEDDING_BLOCK + 1)] > 0 for name in names):
            return "every block lr weight of the file's modules is 0 (down/mid/up_lr_weight)"
        return None
    if lr_weights is not None and not any(lr_weights[b] > 0 for b in adapted):
        return "every block lr weight is 0 (down/mid/up_lr_weight)"
    conv_dim = int(network_args["conv_dim"]) if "conv_dim" in network_args else None
    blocks = block_dims_and_alphas(network_args, dim, alpha, conv_dim, None, lr_weights)
    if blocks is not None and not any(blocks.dims[b] > 0 or (blocks.conv_dims is not None and blocks.conv_dims[b] > 0)
                                      for b in adapted):
        return "every block dim is 0 (block_dims, conv_block_dims)"
    return None


def _block_or(lora_name: str, default: int) -> int:
    try:
        return block_index(lora_name)
    except ValueError:  # not an SDXL UNet name: loading the network reports it
        return default


def check_resume_trains(resume: Path, max_train_steps: int, max_train_epochs: int | None) -> None:
    """A state saved at (or past) the end of this run's schedule would train nothing and only rewrite the final
    file: refuse it (an unreadable train_state.json is left to the resume itself to report)."""
    progress = saved_progress(resume)
    if progress is None:
        return
    if max_train_epochs is not None:
        done = progress.epoch > max_train_epochs
        length = f"--max_train_epochs {max_train_epochs}"
    else:
        done = progress.step >= max_train_steps
        length = f"--max_train_steps {max_train_steps}"
    if done:
        raise UserInputError(f"--resume {resume}: that state is at step {progress.step} (epoch {progress.epoch}), "
                             f"already the end of {length}; nothing would train: give a longer run")


def check_optimizer_fits_groups(
    optimizer_type: str, group_lrs: dict[str, float], network_args: dict[str, str],
    optimizer_args: dict[str, str] | None = None,
) -> None:
    """Refuse, before any model loads, an optimizer that would crash on (or ignore) per-group rates."""
    problem = per_group_lr_problem(optimizer_type, group_lrs, optimizer_args)
    if problem is None and is_adaptive(optimizer_type):
        block_keys = [key for key in BLOCK_LR_KEYS if key in network_args]
        if block_keys:
            problem = (
                f"--optimizer_type {optimizer_type} estimates one step size for all parameter groups and cannot "
                f"take block lr weights ({', '.join(block_keys)}); remove them or use AdamW, AdamW8bit or Lion"
            )
    if problem:
        raise UserInputError(problem)


def check_weights_fit_dims(weights: Path, dim: int, conv_dim: int | None) -> None:
    """Without --dim_from_weights a LoRA file must have the ranks the flags ask for; found from the file's
    header alone, so a mismatch stops the run before any model loads."""
    entries, _, _ = read_safetensors_header(weights)
    for name, entry in sorted(entries.items()):
        if not name.endswith(".lora_down.weight"):
            continue
        is_conv3x3 = len(entry.shape) == 4 and tuple(entry.shape[2:]) != (1, 1)
        expected = conv_dim if is_conv3x3 else dim
        if entry.shape[0] != expected:
            raise UserInputError(
                f"--network_weights {weights}: {name.split('.')[0]} has rank {entry.shape[0]}, but this run asks for "
                f"{expected}; add --dim_from_weights to take dims from the file, or give the matching --network_dim"
            )


CAPTION_VARYING_FLAGS = ("shuffle_caption", "caption_dropout_rate", "caption_tag_dropout_rate",
                         "caption_dropout_every_n_epochs")
"""Flags that make an image's caption change between uses (only those this parser has are read)."""


def check_text_encoder_cache_flags(args: argparse.Namespace, train_text_encoder: bool) -> None:
    """The cached-text-encoder flags fit the run: UNet-only training, and variants when captions vary."""
    if args.text_encoder_cache_variants < 1:
        raise UserInputError(f"--text_encoder_cache_variants {args.text_encoder_cache_variants} must be at least 1")
    if not (args.cache_text_encoder_outputs or args.cache_text_encoder_outputs_to_disk):
        return
    if train_text_encoder:
        raise UserInputError("--cache_text_encoder_outputs needs --network_train_unet_only: text-encoder LoRA "
                             "cannot train on cached text-encoder outputs")
    varying = [f"--{name}" for name in CAPTION_VARYING_FLAGS if getattr(args, name, None)]
    if varying and args.text_encoder_cache_variants == 1:
        raise UserInputError(
            f"--cache_text_encoder_outputs would freeze the captions that {', '.join(varying)} changes every step: "
            "add --text_encoder_cache_variants N (e.g. 8) to cache N caption variants per image"
        )


def dataset_config_from_args(
    args: argparse.Namespace, data_dir: Path | None, reg_dir: Path | None, resolution: tuple[int, int], seed: int
) -> DatasetConfig:
    """The data flags as a DatasetConfig; with --dataset_config the TOML is read and checked here (the flags
    are its last fallback)."""
    data = DatasetConfig(
        train_data_dir=data_dir,
        caption_extension=args.caption_extension,
        resolution=resolution,
        enable_bucket=args.enable_bucket,
        min_bucket_reso=args.min_bucket_reso,
        max_bucket_reso=args.max_bucket_reso,
        bucket_reso_steps=args.bucket_reso_steps,
        bucket_no_upscale=args.bucket_no_upscale,
        shuffle_caption=args.shuffle_caption,
        keep_tokens=args.keep_tokens,
        random_crop=args.random_crop,
        batch_size=args.train_batch_size,
        seed=seed,
        keep_tokens_separator=args.keep_tokens_separator or "",
        caption_separator=args.caption_separator,
        caption_prefix=args.caption_prefix or "",
        caption_suffix=args.caption_suffix or "",
        caption_dropout_rate=args.caption_dropout_rate,
        caption_dropout_every_n_epochs=args.caption_dropout_every_n_epochs,
        caption_tag_dropout_rate=args.caption_tag_dropout_rate,
        flip_aug=args.flip_aug,
        reg_data_dir=reg_dir,
        prior_loss_weight=args.prior_loss_weight,
        skip_bad_images=args.skip_bad_images,
    )
    if not args.dataset_config:
        return data
    ignored = [flag for flag, value in (("--train_data_dir", data_dir), ("--reg_data_dir", reg_dir)) if value]
    if ignored:  # as sd-scripts: the file's image_dir entries win
        logging.getLogger(__name__).warning("ignoring %s: --dataset_config lists the image folders", ", ".join(ignored))
    return replace(data, train_data_dir=None, reg_data_dir=None,
                   dataset_config=load_dataset_config(Path(args.dataset_config), data.cli_values()))


def check_log_with(log_with: str | None, logging_dir: str | None) -> tuple[str, ...]:
    """The trackers to start: --log_with (tensorboard | wandb | all), tensorboard by default with a logging
    folder; a tracker whose package is missing is one line now, not after the model loaded."""
    if log_with is None:
        return ("tensorboard",) if logging_dir else ()
    trackers = ("tensorboard", "wandb") if log_with == "all" else (log_with,)
    if "tensorboard" in trackers and not logging_dir:
        raise UserInputError(f"--log_with {log_with} writes TensorBoard logs: give --logging_dir")
    if "wandb" in trackers and importlib.util.find_spec("wandb") is None:
        raise UserInputError(f"--log_with {log_with} needs the wandb package: pip install wandb (and wandb login)")
    return trackers


def first_save_estimate(
    args: argparse.Namespace, shapes: ModelShapes, weights_entries: dict | None, network_args: dict[str, str],
    train_unet: bool, train_text_encoder: bool, optimizer_type: str,
) -> FirstSave:
    """The size of the run's first save, from the model's tensor shapes and the network flags (or, with
    --dim_from_weights, the LoRA file's own tensors); see `library.files.output_checks.estimate_first_save`."""
    if weights_entries is not None and args.dim_from_weights:
        parameters = sum(math.prod(entry.shape) for entry in weights_entries.values())
        tensors = len(weights_entries)
    else:
        conv_dim = int(network_args["conv_dim"]) if "conv_dim" in network_args else None
        blocks = block_dims_and_alphas(network_args, args.network_dim, args.network_alpha, conv_dim,
                                       1.0 if conv_dim else None, block_lr_weights(network_args))  # alphas: no size
        include_conv = bool(conv_dim) if blocks is None else blocks.conv_dims is not None
        if shapes.single_file is not None:
            layers = single_file_lora_layers(shapes.single_file, include_conv)
        else:
            parts = shapes.components
            layers = diffusers_lora_layers(parts["text_encoder1"], parts["text_encoder2"], parts["unet"], include_conv)
        unet_rank = None
        if blocks is not None:
            unet_rank = lambda layer: (blocks.dim_and_alpha(layer.lora_name, layer.is_conv3x3) or (0,))[0]  # noqa: E731
        parameters, tensors = lora_parameter_count(layers, dim=args.network_dim, conv_dim=conv_dim,
                                                   train_unet=train_unet, train_text_encoder=train_text_encoder,
                                                   unet_rank=unet_rank)
    return estimate_first_save(parameters, tensors, save_dtype(args.save_precision).itemsize,
                               ema=args.ema_decay is not None,
                               save_state=bool(args.save_state or args.save_state_on_train_end),
                               optimizer_type=optimizer_type)


def _off_if_zero(value: float | int | None, flag: str) -> float | int | None:
    """sd-scripts treats 0 as "off" for these flags (GUIs pass 0); a negative value is a mistake."""
    if value is None or value == 0:
        return None
    if value < 0:
        raise UserInputError(f"{flag} must be positive, got {value}: pass a value > 0 or leave the flag out")
    return value

def _check_timesteps(low: int | None, high: int | None) -> None:
    lo = 0 if low is None else low
    hi = NUM_TRAIN_TIMESTEPS if high is None else high
    if not 0 <= lo < hi <= NUM_TRAIN_TIMESTEPS:
        raise UserInputError(
            f"timesteps: need 0 <= --min_timestep < --max_timestep <= {NUM_TRAIN_TIMESTEPS}, got {lo} and {hi}: "
            "fix the two values")

def _check_huber(loss_type: str, c: float, scale: float) -> None:
    if loss_type not in LOSS_TYPES:
        raise UserInputError(f"--loss_type {loss_type!r} is unknown: use one of {', '.join(LOSS_TYPES)}")
    if not c > 0:
        raise UserInputError(f"--huber_c must be > 0, got {c}: 0.1 is the default")
    if not scale > 0:
        raise UserInputError(f"--huber_scale must be > 0, got {scale}: 1.0 is the default")

def loss_options_from_args(args: argparse.Namespace) -> LossOptions:
    """The parsed flags -> validated `LossOptions`. Raises `UserInputError` (one line) on a bad combination."""
    noise_offset = _off_if_zero(args.noise_offset, "--noise_offset")
    if args.adaptive_noise_scale is not None and noise_offset is None:
        raise UserInputError("--adaptive_noise_scale adds to the noise offset: also pass --noise_offset (e.g. 0.05)")
    multires = _off_if_zero(args.multires_noise_iterations, "--multires_noise_iterations")
    if args.multires_noise_discount < 0:
        raise UserInputError(
            f"--multires_noise_discount must be >= 0, got {args.multires_noise_discount}: 0.3 is the default")
    if args.scale_v_pred_loss_like_noise_pred and not args.v_parameterization:
        raise UserInputError(
            "--scale_v_pred_loss_like_noise_pred applies to v-prediction only: add --v_parameterization or drop it")
    _check_timesteps(args.min_timestep, args.max_timestep)
    _check_huber(args.loss_type, args.huber_c, args.huber_scale)
    if args.huber_schedule not in HUBER_SCHEDULES:
        raise UserInputError(
            f"--huber_schedule {args.huber_schedule!r} is unknown: use one of {', '.join(HUBER_SCHEDULES)}")
    return LossOptions(
        noise_offset=noise_offset,
        noise_offset_random_strength=bool(args.noise_offset_random_strength),
        adaptive_noise_scale=args.adaptive_noise_scale,
        multires_noise_iterations=multires,
        multires_noise_discount=args.multires_noise_discount,
        min_snr_gamma=_off_if_zero(args.min_snr_gamma, "--min_snr_gamma"),
        v_parameterization=bool(args.v_parameterization),
        scale_v_pred_loss_like_noise_pred=bool(args.scale_v_pred_loss_like_noise_pred),
        debiased_estimation_loss=bool(args.debiased_estimation_loss),
        loss_type=args.loss_type,
        huber_c=args.huber_c,
        huber_schedule=args.huber_schedule,
        huber_scale=args.huber_scale,
        zero_terminal_snr=bool(args.zero_terminal_snr),
        ip_noise_gamma=_off_if_zero(args.ip_noise_gamma, "--ip_noise_gamma"),
        ip_noise_gamma_random_strength=bool(args.ip_noise_gamma_random_strength),
        min_timestep=args.min_timestep,
        max_timestep=args.max_timestep,
    )

def _at_least_one(value: int | None, flag: str) -> int | None:
    if value is not None and value < 1:
        raise UserInputError(f"{flag} must be at least 1, got {value}: pass a positive number or leave the flag out")
    return value

def validation_config_from_args(args: argparse.Namespace, seed: int) -> ValidationConfig:
    """The parsed flags -> a checked `ValidationConfig` (`seed`: the training seed). One-line UserInputError
    for a split outside [0, 1), both sources, a missing folder, or a schedule without validation images."""
    split = float(args.validation_split or 0.0)
    data_dir = None if args.validation_data_dir is None else Path(args.validation_data_dir)
    if not 0.0 <= split < 1.0:
        raise UserInputError(f"--validation_split must be in [0, 1), got {split}: e.g. 0.1 holds out 10% of the images")
    if split > 0 and data_dir is not None:
        raise UserInputError("--validation_split and --validation_data_dir both give validation images: keep one")
    if data_dir is not None and not data_dir.is_dir():
        raise UserInputError(f"--validation_data_dir {data_dir} is not a folder: point it at a folder of N_name "
                             "subfolders")
    every_steps = _at_least_one(args.validate_every_n_steps, "--validate_every_n_steps")
    every_epochs = _at_least_one(args.validate_every_n_epochs, "--validate_every_n_epochs")
    max_steps = _at_least_one(args.max_validation_steps, "--max_validation_steps")
    if (every_steps or every_epochs) and not (split > 0 or data_dir is not None):
        flag = "--validate_every_n_steps" if every_steps else "--validate_every_n_epochs"
        raise UserInputError(f"{flag} needs validation images: add --validation_split 0.1 or --validation_data_dir DIR")
    low = getattr(args, "min_timestep", None)
    high = getattr(args, "max_timestep", None)
    timesteps = validation_timesteps(0 if low is None else low, NUM_TRAIN_TIMESTEPS if high is None else high)
    return ValidationConfig(
        split=split, data_dir=data_dir, seed=seed if args.validation_seed is None else args.validation_seed,
        every_n_steps=every_steps, every_n_epochs=every_epochs, max_steps=max_steps, timesteps=timesteps,
    )

def ema_config_from_args(args: argparse.Namespace) -> EMAConfig | None:
    """The parsed flags -> `EMAConfig`, or None without `--ema_decay`. One-line UserInputError on bad values."""
    if args.ema_decay is None:
        if args.ema_warmup or args.ema_update_after_step:
            flag = "--ema_warmup" if args.ema_warmup else "--ema_update_after_step"
            raise UserInputError(f"{flag} does nothing without --ema_decay: add --ema_decay 0.999 or drop it")
        return None
    if not 0.0 < args.ema_decay < 1.0:
        raise UserInputError(f"--ema_decay must be between 0 and 1 (exclusive), got {args.ema_decay}: e.g. 0.999")
    if args.ema_update_after_step < 0:
        raise UserInputError(f"--ema_update_after_step must be 0 or more, got {args.ema_update_after_step}")
    return EMAConfig(float(args.ema_decay), int(args.ema_update_after_step), bool(args.ema_warmup))



def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Validate the namespace and build the typed configuration. Files are read only as far as checking them
    needs (headers, configs): the model, --network_weights and --resume fail here when damaged, and the output
    folders when unusable or too full for the first save."""
    model_shapes = check_model_files(args.pretrained_model_name_or_path, args.model_config_dir)
    data_dir = Path(args.train_data_dir) if args.train_data_dir else None
    if data_dir is None and not args.dataset_config:
        raise UserInputError("give --train_data_dir (a folder of N_name subfolders) or --dataset_config (a TOML file)")
    if data_dir is not None and not args.dataset_config and not data_dir.is_dir():
        raise UserInputError(f"--train_data_dir: folder not found: {data_dir}")
    reg_dir = Path(args.reg_data_dir) if args.reg_data_dir else None
    if reg_dir is not None and not args.dataset_config and not reg_dir.is_dir():
        raise UserInputError(f"--reg_data_dir: folder not found: {reg_dir}")
    if args.network_module != "networks.lora":
        raise UserInputError(f"--network_module: only networks.lora is available, not {args.network_module}")
    if args.network_train_unet_only and args.network_train_text_encoder_only:
        raise UserInputError("--network_train_unet_only and --network_train_text_encoder_only exclude each other")
    if args.network_dim <= 0:
        raise UserInputError(f"--network_dim must be a positive integer, got {args.network_dim}")
    if args.train_batch_size <= 0 or args.gradient_accumulation_steps <= 0:
        raise UserInputError("--train_batch_size and --gradient_accumulation_steps must be at least 1")
    weights = Path(args.network_weights) if args.network_weights else None
    weights_entries = check_lora_file(weights, "--network_weights") if weights is not None else None
    if args.dim_from_weights and weights is None:
        raise UserInputError("--dim_from_weights needs --network_weights (the LoRA file to read the dims from)")

    network_args = merge_loraplus_flags(
        parse_network_args(args.network_args), {key: getattr(args, key) for key in LORAPLUS_KEYS}
    )
    loraplus = LoRAPlusRatios.from_network_args(network_args)
    optimizer_type = canonical_optimizer_type(args.optimizer_type)
    optimizer_class(optimizer_type)  # a class that cannot be imported is one line now, not after loading
    optimizer_args = parse_key_values(args.optimizer_args, "--optimizer_args")
    scheduler_args = parse_key_values(args.lr_scheduler_args, "--lr_scheduler_args")
    if args.lr_scheduler_type:
        scheduler_class(args.lr_scheduler_type)
    problem = schedule_problem(args.lr_scheduler, optimizer_type=optimizer_type, optimizer_args=optimizer_args,
                               warmup=args.lr_warmup_steps, scheduler_type=args.lr_scheduler_type or None,
                               scheduler_args=scheduler_args, min_lr_ratio=args.lr_scheduler_min_lr_ratio)
    if problem:
        raise UserInputError(problem)
    text_encoder_lr = list(args.text_encoder_lr) if args.text_encoder_lr else None
    train_unet, train_text_encoder = not args.network_train_text_encoder_only, not args.network_train_unet_only
    # A run that would train nothing stops here: no steps, or no LoRA weight that may change.
    check_run_length(args.max_train_steps, args.max_train_epochs)
    check_learning_rates(args.learning_rate, args.unet_lr, text_encoder_lr)
    file_names = None
    if weights is not None and args.dim_from_weights:
        file_names = [key.partition(".")[0] for key in read_safetensors_header(weights)[0]]
    check_something_trains(
        args.learning_rate, args.unet_lr, text_encoder_lr, train_unet, train_text_encoder,
        unet_empty=unet_without_modules(network_args, args.network_dim, args.network_alpha, file_names),
        text_encoder_empty=("the --network_weights file has no text-encoder modules"
                            if file_names is not None and not any(n.startswith("lora_te") for n in file_names)
                            else None),
    )
    if args.max_nan_steps < 0:
        raise UserInputError(f"--max_nan_steps must be 0 or more, got {args.max_nan_steps}")
    check_optimizer_fits_groups(
        optimizer_type,
        planned_group_lrs(args.learning_rate, args.unet_lr, text_encoder_lr, loraplus, train_unet, train_text_encoder),
        network_args,
        optimizer_args,
    )
    if weights is not None and not args.dim_from_weights and not any(k.startswith(("block_", "conv_block_"))
                                                                       for k in network_args):
        check_weights_fit_dims(weights, args.network_dim, int(network_args["conv_dim"]) if "conv_dim" in network_args else None)
    resolution = parse_resolution(args.resolution)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little") % (2**31)
    cache_to_disk = bool(args.cache_latents_to_disk)
    check_text_encoder_cache_flags(args, train_text_encoder)
    cache_te_to_disk = bool(args.cache_text_encoder_outputs_to_disk)
    precision_request = PrecisionRequest(
        mixed_precision=args.mixed_precision, fp8_base=args.fp8_base, fp8_base_unet=args.fp8_base_unet,
        full_fp16=args.full_fp16, full_bf16=args.full_bf16, no_half_vae=args.no_half_vae, xformers=args.xformers,
        mem_eff_attn=args.mem_eff_attn,
    )
    check_precision_flags(precision_request)
    resume = Path(args.resume) if args.resume else None
    if resume is not None:
        check_resume_trains(resume, args.max_train_steps, args.max_train_epochs)  # nothing left to train comes first
        check_resume_folder(resume, with_ema=args.ema_decay is not None)
    log_with = check_log_with(args.log_with, args.logging_dir)
    check_output_folder(Path(args.output_dir), "--output_dir")
    if args.logging_dir:
        check_output_folder(Path(args.logging_dir), "--logging_dir")
    check_free_space(Path(args.output_dir), "--output_dir", first_save_estimate(
        args, model_shapes, weights_entries, network_args, train_unet, train_text_encoder, optimizer_type))
    for flag in ("save_every_n_epochs", "save_every_n_steps", "save_last_n_epochs", "save_last_n_steps",
                 "save_last_n_epochs_state", "save_last_n_steps_state"):
        if (getattr(args, flag) or 0) < 0:
            raise UserInputError(f"--{flag} must be a positive number (0 or absent: off)")
    if args.lowram and args.highvram:
        raise UserInputError("--lowram and --highvram exclude each other")

    return TrainConfig(
        model=ModelConfig(
            path=Path(args.pretrained_model_name_or_path),
            config_dir=Path(args.model_config_dir) if args.model_config_dir else None,
        ),
        data=dataset_config_from_args(args, data_dir, reg_dir, resolution, seed),
        network=NetworkConfig(
            module=args.network_module,
            dim=args.network_dim,
            alpha=args.network_alpha,
            dropout=args.network_dropout,
            args=network_args,
            loraplus=loraplus,
            weights=weights,
            dim_from_weights=args.dim_from_weights,
            train_unet=train_unet,
            train_text_encoder=train_text_encoder,
        ),
        optimizer=OptimizerConfig(
            optimizer_type=optimizer_type,
            optimizer_args=optimizer_args,
            learning_rate=args.learning_rate,
            unet_lr=args.unet_lr,
            text_encoder_lr=text_encoder_lr,
            max_grad_norm=args.max_grad_norm,
            lr_scheduler=canonical_scheduler(args.lr_scheduler),
            lr_warmup_steps=args.lr_warmup_steps,
            lr_scheduler_num_cycles=args.lr_scheduler_num_cycles,
            lr_scheduler_power=args.lr_scheduler_power,
            lr_decay_steps=args.lr_decay_steps,
            lr_scheduler_timescale=args.lr_scheduler_timescale,
            lr_scheduler_min_lr_ratio=args.lr_scheduler_min_lr_ratio,
            lr_scheduler_type=args.lr_scheduler_type or None,
            lr_scheduler_args=scheduler_args,
        ),
        precision=PrecisionConfig(
            request=precision_request,
            gradient_checkpointing=args.gradient_checkpointing,
            lowram=args.lowram,
            highvram=args.highvram,
        ),
        loop=LoopConfig(
            batch_size=args.train_batch_size,
            max_train_steps=args.max_train_steps,
            max_train_epochs=args.max_train_epochs,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            seed=seed,
            seed_given=args.seed is not None,
            max_data_loader_n_workers=max(0, min(args.max_data_loader_n_workers, os.cpu_count() or 1)),
            persistent_data_loader_workers=args.persistent_data_loader_workers,
            cache_latents=bool(args.cache_latents or cache_to_disk),
            cache_latents_to_disk=cache_to_disk,
            vae_batch_size=max(1, args.vae_batch_size),
            max_token_length=check_max_token_length(args.max_token_length),
            cache_text_encoder_outputs=bool(args.cache_text_encoder_outputs or cache_te_to_disk),
            cache_text_encoder_outputs_to_disk=cache_te_to_disk,
            text_encoder_cache_variants=args.text_encoder_cache_variants,
            max_nan_steps=args.max_nan_steps,
        ),
        output=OutputConfig(
            output_dir=Path(args.output_dir),
            output_name=args.output_name,
            save_precision=args.save_precision,
            save_every_n_epochs=args.save_every_n_epochs,
            training_comment=args.training_comment,
            logging_dir=Path(args.logging_dir) if args.logging_dir else None,
            log_prefix=args.log_prefix,
            save_every_n_steps=args.save_every_n_steps or None,
            save_last_n_epochs=args.save_last_n_epochs or None,
            save_last_n_epochs_state=args.save_last_n_epochs_state or args.save_last_n_epochs or None,
            save_last_n_steps=args.save_last_n_steps or None,
            save_last_n_steps_state=args.save_last_n_steps_state or args.save_last_n_steps or None,
            save_state=args.save_state,
            save_state_on_train_end=args.save_state_on_train_end,
            resume=resume,
            log_with=log_with,
            log_tracker_name=args.log_tracker_name,
        ),
        loss=loss_options_from_args(args),
        sampling=make_sampling_config(args.sample_prompts, sampler=args.sample_sampler,
                                      every_n_steps=args.sample_every_n_steps,
                                      every_n_epochs=args.sample_every_n_epochs, at_first=args.sample_at_first),
        validation=validation_config_from_args(args, seed),
        ema=ema_config_from_args(args),
    )
