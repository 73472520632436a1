"""The one place the argparse namespace becomes typed, frozen, validated configuration.

One builder per slice of `TrainConfig` (`model_config`, `data_config`, `network_config`, `optimizer_config`,
`loop_config`, `precision_config`, `compile_config`, `output_config`, `loss_config`, `sampling_config`,
`validation_config`, `ema_config`) reads the flags of its part and checks them; `config_from_args` runs them and then
the checks that need several slices (`library.config.checks`). Everything below this module receives the dataclass slice
it needs. Validation here is cheap and runs before any model loads, so bad input costs a second and one clear line.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
from dataclasses import replace
from pathlib import Path

from library.config.checks import (
    check_network_trains,
    check_optimizer_fits_groups,
    check_output_room,
    check_resume,
    check_text_encoder_cache,
    first_save_estimate,
    planned_group_lrs,
)
from library.data.dataset_config import DatasetConfig, load_dataset_config
from library.errors import UserInputError
from library.files.lora_io import check_lora_file
from library.files.weight_files import read_safetensors_header
from library.model.compiled import CompileConfig
from library.model.model_files import check_model_files
from library.model.precision import PrecisionConfig, PrecisionRequest, check_precision_flags
from library.model.text_encoding import check_max_token_length
from library.train.ema import EMAConfig
from library.train.loss import HUBER_SCHEDULES, LOSS_TYPES, NUM_TRAIN_TIMESTEPS, LossOptions
from library.train.optim import (
    canonical_optimizer_type,
    canonical_scheduler,
    optimizer_class,
    schedule_problem,
    scheduler_class,
)
from library.train.run_config import LoopConfig, ModelConfig, NetworkConfig, OptimizerConfig, OutputConfig, TrainConfig
from library.train.sampling import SamplingConfig, make_sampling_config
from library.train.validation import ValidationConfig, validation_timesteps
from networks.network_args import LORAPLUS_KEYS, LoRAPlusRatios, merge_loraplus_flags, parse_network_args


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Validate the namespace and build the typed configuration: each slice from its flags, then the checks across
    slices. Files are read only as far as checking them needs (headers, configs): the model, --network_weights and
    --resume fail here when damaged, and the output folders when unusable or too full for the first save."""
    shapes = check_model_files(args.pretrained_model_name_or_path, args.model_config_dir)
    seed = run_seed(args)
    data = data_config(args, seed)
    network = network_config(args)
    optimizer = optimizer_config(args)
    loop = loop_config(args, seed)
    # A run that would train nothing, or that its optimizer or the text-encoder cache cannot run, stops here.
    check_network_trains(network, optimizer)
    check_optimizer_fits_groups(
        optimizer.optimizer_type,
        planned_group_lrs(
            optimizer.learning_rate,
            optimizer.unet_lr,
            optimizer.text_encoder_lr,
            network.loraplus,
            network.train_unet,
            network.train_text_encoder,
        ),
        network.args,
        optimizer.optimizer_args,
    )
    check_text_encoder_cache(loop, data, network.train_text_encoder)
    precision = precision_config(args)
    ema = ema_config(args)
    output = output_config(args)
    if output.resume is not None:
        check_resume(output.resume, loop, with_ema=ema is not None)
    check_output_room(output, first_save_estimate(shapes, network, optimizer.optimizer_type, output, ema is not None))
    return TrainConfig(
        model=model_config(args),
        data=data,
        network=network,
        optimizer=optimizer,
        precision=precision,
        loop=loop,
        output=output,
        loss=loss_config(args),
        sampling=sampling_config(args),
        validation=validation_config(args, seed),
        ema=ema,
        compile=compile_config(args),
    )


# --- Small parsers ----------------------------------------------------------------------------------------------------
def run_seed(args: argparse.Namespace) -> int:
    """--seed, or a random one (sd-scripts draws one too); drawn once here, so every slice gets the same."""
    return args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little") % (2**31)


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


# --- Model and data ---------------------------------------------------------------------------------------------------
def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(
        path=Path(args.pretrained_model_name_or_path),
        config_dir=Path(args.model_config_dir) if args.model_config_dir else None,
    )


def data_config(args: argparse.Namespace, seed: int) -> DatasetConfig:
    """The data flags as a DatasetConfig; with --dataset_config the TOML is read and checked here (the flags
    are its last fallback)."""
    data_dir, reg_dir = _data_folders(args)
    data = DatasetConfig(
        train_data_dir=data_dir,
        caption_extension=args.caption_extension,
        resolution=parse_resolution(args.resolution),
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
    return replace(
        data,
        train_data_dir=None,
        reg_data_dir=None,
        dataset_config=load_dataset_config(Path(args.dataset_config), data.cli_values()),
    )


def _data_folders(args: argparse.Namespace) -> tuple[Path | None, Path | None]:
    """(--train_data_dir, --reg_data_dir): one of the data sources is given, and a folder flag names a folder."""
    data_dir = Path(args.train_data_dir) if args.train_data_dir else None
    if data_dir is None and not args.dataset_config:
        raise UserInputError("give --train_data_dir (a folder of N_name subfolders) or --dataset_config (a TOML file)")
    if data_dir is not None and not args.dataset_config and not data_dir.is_dir():
        raise UserInputError(f"--train_data_dir: folder not found: {data_dir}")
    reg_dir = Path(args.reg_data_dir) if args.reg_data_dir else None
    if reg_dir is not None and not args.dataset_config and not reg_dir.is_dir():
        raise UserInputError(f"--reg_data_dir: folder not found: {reg_dir}")
    return data_dir, reg_dir


# --- Network and optimizer --------------------------------------------------------------------------------------------
def network_config(args: argparse.Namespace) -> NetworkConfig:
    """The network flags, LoRA+ ratios folded into network_args; --network_weights is checked from its header
    (an SDXL LoRA, with the ranks this run asks for unless --dim_from_weights)."""
    if args.network_module != "networks.lora":
        raise UserInputError(f"--network_module: only networks.lora is available, not {args.network_module}")
    if args.network_train_unet_only and args.network_train_text_encoder_only:
        raise UserInputError("--network_train_unet_only and --network_train_text_encoder_only exclude each other")
    if args.network_dim <= 0:
        raise UserInputError(f"--network_dim must be a positive integer, got {args.network_dim}")
    weights = Path(args.network_weights) if args.network_weights else None
    if weights is not None:
        check_lora_file(weights, "--network_weights")
    if args.dim_from_weights and weights is None:
        raise UserInputError("--dim_from_weights needs --network_weights (the LoRA file to read the dims from)")
    network_args = merge_loraplus_flags(
        parse_network_args(args.network_args), {key: getattr(args, key) for key in LORAPLUS_KEYS}
    )
    if (
        weights is not None
        and not args.dim_from_weights
        and not any(k.startswith(("block_", "conv_block_")) for k in network_args)
    ):
        check_weights_fit_dims(
            weights, args.network_dim, int(network_args["conv_dim"]) if "conv_dim" in network_args else None
        )
    return NetworkConfig(
        module=args.network_module,
        dim=args.network_dim,
        alpha=args.network_alpha,
        dropout=args.network_dropout,
        args=network_args,
        loraplus=LoRAPlusRatios.from_network_args(network_args),
        weights=weights,
        dim_from_weights=args.dim_from_weights,
        train_unet=not args.network_train_text_encoder_only,
        train_text_encoder=not args.network_train_unet_only,
    )


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


def optimizer_config(args: argparse.Namespace) -> OptimizerConfig:
    """The optimizer and schedule flags; a class that cannot be imported, a schedule sd-scripts refuses (or that
    would crash) and a learning rate that is not a finite number >= 0 are one line now, not after loading."""
    optimizer_type = canonical_optimizer_type(args.optimizer_type)
    optimizer_class(optimizer_type)
    optimizer_args = parse_key_values(args.optimizer_args, "--optimizer_args")
    scheduler_args = parse_key_values(args.lr_scheduler_args, "--lr_scheduler_args")
    if args.lr_scheduler_type:
        scheduler_class(args.lr_scheduler_type)
    problem = schedule_problem(
        args.lr_scheduler,
        optimizer_type=optimizer_type,
        optimizer_args=optimizer_args,
        warmup=args.lr_warmup_steps,
        scheduler_type=args.lr_scheduler_type or None,
        scheduler_args=scheduler_args,
        min_lr_ratio=args.lr_scheduler_min_lr_ratio,
    )
    if problem:
        raise UserInputError(problem)
    text_encoder_lr = list(args.text_encoder_lr) if args.text_encoder_lr else None
    check_learning_rates(args.learning_rate, args.unet_lr, text_encoder_lr)
    return OptimizerConfig(
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
    )


def check_learning_rates(learning_rate: float, unet_lr: float | None, text_encoder_lr: list[float] | None) -> None:
    """Every rate is a finite number >= 0 (a negative one climbs the loss, a NaN one breaks the weights)."""
    given = [("--learning_rate", learning_rate), ("--unet_lr", unet_lr)]
    given += [("--text_encoder_lr", lr) for lr in text_encoder_lr or ()]
    for flag, lr in given:
        if lr is not None and not (math.isfinite(lr) and lr >= 0):
            raise UserInputError(f"{flag} {lr} must be a finite number >= 0 (e.g. 1e-4)")


# --- The loop, precision and output -----------------------------------------------------------------------------------
def loop_config(args: argparse.Namespace, seed: int) -> LoopConfig:
    """Batches, run length, caching and the NaN allowance; a run of no steps is refused here."""
    if args.train_batch_size <= 0 or args.gradient_accumulation_steps <= 0:
        raise UserInputError("--train_batch_size and --gradient_accumulation_steps must be at least 1")
    check_run_length(args.max_train_steps, args.max_train_epochs)
    if args.max_nan_steps < 0:
        raise UserInputError(f"--max_nan_steps must be 0 or more, got {args.max_nan_steps}")
    if args.text_encoder_cache_variants < 1:
        raise UserInputError(f"--text_encoder_cache_variants {args.text_encoder_cache_variants} must be at least 1")
    cache_to_disk = bool(args.cache_latents_to_disk)
    cache_te_to_disk = bool(args.cache_text_encoder_outputs_to_disk)
    return LoopConfig(
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
        ddp_timeout_minutes=args.ddp_timeout,
    )


def check_run_length(max_train_steps: int, max_train_epochs: int | None) -> None:
    """A run of no steps would only write the untrained LoRA (B = 0: a file that changes nothing): refuse it."""
    if max_train_epochs is not None:
        if max_train_epochs <= 0:
            raise UserInputError(
                f"--max_train_epochs {max_train_epochs} trains nothing (it overrides --max_train_steps): give 1 or more"
            )
    elif max_train_steps <= 0:
        raise UserInputError(
            f"--max_train_steps {max_train_steps} trains nothing: give 1 or more (or --max_train_epochs)"
        )


def precision_config(args: argparse.Namespace) -> PrecisionConfig:
    """The precision flags as given (what this device can run is decided at start-up, see `plan_precision`)."""
    request = PrecisionRequest(
        mixed_precision=args.mixed_precision,
        fp8_base=args.fp8_base,
        fp8_base_unet=args.fp8_base_unet,
        full_fp16=args.full_fp16,
        full_bf16=args.full_bf16,
        no_half_vae=args.no_half_vae,
        xformers=args.xformers,
        mem_eff_attn=args.mem_eff_attn,
    )
    check_precision_flags(request)
    if args.lowram and args.highvram:
        raise UserInputError("--lowram and --highvram exclude each other")
    return PrecisionConfig(
        request=request, gradient_checkpointing=args.gradient_checkpointing, lowram=args.lowram, highvram=args.highvram
    )


def compile_config(args: argparse.Namespace) -> CompileConfig | None:
    """--torch_compile with its --dynamo_backend (which, as in sd-scripts, means nothing without it)."""
    return CompileConfig(backend=args.dynamo_backend) if args.torch_compile else None


SAVE_EVERY_FLAGS = (
    "save_every_n_epochs",
    "save_every_n_steps",
    "save_last_n_epochs",
    "save_last_n_steps",
    "save_last_n_epochs_state",
    "save_last_n_steps_state",
)


def output_config(args: argparse.Namespace) -> OutputConfig:
    """Where and how often the run saves and logs (the folders themselves are checked with the first save's size,
    `check_output_room`)."""
    log_with = check_log_with(args.log_with, args.logging_dir)
    for flag in SAVE_EVERY_FLAGS:
        if (getattr(args, flag) or 0) < 0:
            raise UserInputError(f"--{flag} must be a positive number (0 or absent: off)")
    return OutputConfig(
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
        resume=Path(args.resume) if args.resume else None,
        log_with=log_with,
        log_tracker_name=args.log_tracker_name,
        diagnostics_every_n_steps=args.diagnostics_every_n_steps,
    )


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


# --- Loss, samples, validation and EMA --------------------------------------------------------------------------------
def loss_config(args: argparse.Namespace) -> LossOptions:
    """The parsed flags -> validated `LossOptions`. Raises `UserInputError` (one line) on a bad combination."""
    noise_offset = _off_if_zero(args.noise_offset, "--noise_offset")
    if args.adaptive_noise_scale is not None and noise_offset is None:
        raise UserInputError("--adaptive_noise_scale adds to the noise offset: also pass --noise_offset (e.g. 0.05)")
    multires = _off_if_zero(args.multires_noise_iterations, "--multires_noise_iterations")
    if args.multires_noise_discount < 0:
        raise UserInputError(
            f"--multires_noise_discount must be >= 0, got {args.multires_noise_discount}: 0.3 is the default"
        )
    if args.scale_v_pred_loss_like_noise_pred and not args.v_parameterization:
        raise UserInputError(
            "--scale_v_pred_loss_like_noise_pred applies to v-prediction only: add --v_parameterization or drop it"
        )
    _check_timesteps(args.min_timestep, args.max_timestep)
    _check_huber(args.loss_type, args.huber_c, args.huber_scale)
    if args.huber_schedule not in HUBER_SCHEDULES:
        raise UserInputError(
            f"--huber_schedule {args.huber_schedule!r} is unknown: use one of {', '.join(HUBER_SCHEDULES)}"
        )
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
            "fix the two values"
        )


def _check_huber(loss_type: str, c: float, scale: float) -> None:
    if loss_type not in LOSS_TYPES:
        raise UserInputError(f"--loss_type {loss_type!r} is unknown: use one of {', '.join(LOSS_TYPES)}")
    if not c > 0:
        raise UserInputError(f"--huber_c must be > 0, got {c}: 0.1 is the default")
    if not scale > 0:
        raise UserInputError(f"--huber_scale must be > 0, got {scale}: 1.0 is the default")


def sampling_config(args: argparse.Namespace) -> SamplingConfig | None:
    """The sampling flags, the prompt file read and checked (None: nothing would ever be sampled)."""
    return make_sampling_config(
        args.sample_prompts,
        sampler=args.sample_sampler,
        every_n_steps=args.sample_every_n_steps,
        every_n_epochs=args.sample_every_n_epochs,
        at_first=args.sample_at_first,
    )


def validation_config(args: argparse.Namespace, seed: int) -> ValidationConfig:
    """The parsed flags -> a checked `ValidationConfig` (`seed`: the training seed). One-line UserInputError
    for a split outside [0, 1), both sources, a missing folder, or a schedule without validation images."""
    split = float(args.validation_split or 0.0)
    data_dir = None if args.validation_data_dir is None else Path(args.validation_data_dir)
    if not 0.0 <= split < 1.0:
        raise UserInputError(f"--validation_split must be in [0, 1), got {split}: e.g. 0.1 holds out 10% of the images")
    if split > 0 and data_dir is not None:
        raise UserInputError("--validation_split and --validation_data_dir both give validation images: keep one")
    if data_dir is not None and not data_dir.is_dir():
        raise UserInputError(
            f"--validation_data_dir {data_dir} is not a folder: point it at a folder of N_name subfolders"
        )
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
        split=split,
        data_dir=data_dir,
        seed=seed if args.validation_seed is None else args.validation_seed,
        every_n_steps=every_steps,
        every_n_epochs=every_epochs,
        max_steps=max_steps,
        timesteps=timesteps,
    )


def _at_least_one(value: int | None, flag: str) -> int | None:
    if value is not None and value < 1:
        raise UserInputError(f"{flag} must be at least 1, got {value}: pass a positive number or leave the flag out")
    return value


def ema_config(args: argparse.Namespace) -> EMAConfig | None:
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
