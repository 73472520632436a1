"""The command line: sd-scripts' flag names and defaults, so existing batch scripts run unchanged.

Only this module and `library.config.build` see the argparse namespace. Torch-free: `--help` and `--config_file`
parsing load no model library (the names offered come from the torch-free parts of `library.train`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from library.config.argv_edit import join_command
from library.model.compiled import DEFAULT_BACKEND, DYNAMO_BACKENDS, NO_BACKEND
from library.train.loss import HUBER_SCHEDULES, LOSS_TYPES
from library.train.optim import OPTIMIZER_TYPES, SCHEDULERS
from library.train.sampling import DEFAULT_SAMPLER, SAMPLERS

DIAGNOSTICS_EVERY_N_STEPS = 10
"""--diagnostics_every_n_steps's default: one diagnostic cycle costs 6-13% of a bare tiny-SDXL step on one CPU
thread (bench/diagnostics_overhead.py; 16% measured in a real run computing them every step), so every 10 steps
keeps them at 1-2% of the training time, under the 2% the issue asks (issue 13)."""

if TYPE_CHECKING:
    FlagGroup = argparse._ArgumentGroup  # what add_argument_group returns; argparse has no public name for it


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (not the whole usage block), like every other input error."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """sd-scripts' command line, one help group per part of the run (`FLAG_GROUPS`)."""
    parser = _OneLineErrorParser(
        prog="train_network.py",
        description="Train an SDXL LoRA (LoRA+ built in) with sd-scripts' command line.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for title, add_arguments in FLAG_GROUPS:
        add_arguments(parser.add_argument_group(title))
    return parser


def add_config_file_arguments(group: FlagGroup) -> None:
    """`--config_file` and `--output_config` (read and written by `library.config.config_file`)."""
    add = group.add_argument
    add(
        "--config_file",
        default=None,
        help="TOML of these arguments (flat, or grouped in tables as sd-scripts writes them); flags "
        "on the command line win; an unknown key is an error, and so is an sd-scripts option this "
        "trainer lacks unless it is off",
    )
    add(
        "--output_config",
        action="store_true",
        help="write the effective arguments as TOML (to --config_file's path, else "
        "<output_dir>/<output_name>.toml) and exit without training",
    )


def add_model_arguments(group: FlagGroup) -> None:
    """The SDXL base model."""
    add = group.add_argument
    add(
        "--pretrained_model_name_or_path",
        required=True,
        help="SDXL single file (.safetensors, original layout) or diffusers folder",
    )
    add(
        "--model_config_dir",
        default=None,
        help="diffusers-format config folder for a single file (default: a <stem>_diffusers or "
        "<stem>_config folder beside it, else the shipped configs/sdxl)",
    )


def add_data_arguments(group: FlagGroup) -> None:
    """sd-scripts' dataset flags: folders, captions, buckets, latent caching and the data loader."""
    add = group.add_argument
    add(
        "--train_data_dir",
        default=None,
        help="folder of N_name subfolders (N = repeats); required unless --dataset_config",
    )
    add(
        "--dataset_config",
        default=None,
        help="sd-scripts dataset TOML ([general], [[datasets]], [[datasets.subsets]]); these flags are "
        "its last fallback",
    )
    add("--reg_data_dir", default=None, help="folder of N_name subfolders of regularisation images")
    add("--prior_loss_weight", type=float, default=1.0, help="loss weight of regularisation images")
    add("--caption_extension", default=".caption")
    add("--resolution", default="512", help='training resolution: "W,H" or one number')
    add("--enable_bucket", action="store_true", help="aspect-ratio buckets")
    add("--min_bucket_reso", type=int, default=256)
    add("--max_bucket_reso", type=int, default=1024)
    add("--bucket_reso_steps", type=int, default=64)
    add("--bucket_no_upscale", action="store_true")
    add("--random_crop", action="store_true")
    add("--shuffle_caption", action="store_true")
    add("--keep_tokens", type=int, default=0)
    add(
        "--keep_tokens_separator",
        default="",
        help='marks "fixed ||| shuffled ||| fixed suffix" in captions, e.g. "|||"',
    )
    add("--caption_separator", default=",", help="separator of the tags in captions")
    add("--caption_prefix", default=None, help="text put before every caption")
    add("--caption_suffix", default=None, help="text put after every caption")
    add("--caption_dropout_rate", type=float, default=0.0, help="chance that a caption becomes empty")
    add("--caption_dropout_every_n_epochs", type=int, default=0, help="all captions are empty in every N-th epoch")
    add("--caption_tag_dropout_rate", type=float, default=0.0, help="chance that each shuffled tag is left out")
    add("--flip_aug", action="store_true", help="mirror images horizontally at random")
    add("--skip_bad_images", action="store_true", help="skip an unreadable image with a warning instead of stopping")
    add("--cache_latents", action="store_true", help="encode every image once, before training")
    add(
        "--cache_latents_to_disk",
        action="store_true",
        help="also store latents as sd-scripts-compatible .npz beside the images (implies --cache_latents)",
    )
    add("--vae_batch_size", type=int, default=1)
    add("--max_data_loader_n_workers", type=int, default=8, help="capped at the CPU count")
    add("--persistent_data_loader_workers", action="store_true")


def add_network_arguments(group: FlagGroup) -> None:
    """The LoRA network and LoRA+ (sd-scripts' names; the ratios are also `network_args` keys)."""
    add = group.add_argument
    add("--network_module", default="networks.lora")
    add("--network_dim", type=int, default=4)
    add("--network_alpha", type=float, default=1.0)
    add("--network_dropout", type=float, default=None)
    add("--network_args", nargs="*", default=None, help='key=value, e.g. "loraplus_lr_ratio=16"')
    add("--network_weights", default=None, help="LoRA file to start from")
    add(
        "--dim_from_weights",
        action="store_true",
        help="take each module's dim and alpha from --network_weights instead of --network_dim",
    )
    add("--network_train_unet_only", action="store_true")
    add("--network_train_text_encoder_only", action="store_true")
    add(
        "--loraplus_lr_ratio",
        type=float,
        default=None,
        help="LoRA+: lr of B (lora_up) = lr x ratio, for UNet and text encoders",
    )
    add("--loraplus_unet_lr_ratio", type=float, default=None, help="LoRA+ ratio for the UNet only")
    add("--loraplus_text_encoder_lr_ratio", type=float, default=None, help="LoRA+ ratio for the text encoders only")


def add_optimizer_arguments(group: FlagGroup) -> None:
    """The optimizer and the learning-rate schedule (sd-scripts' names, any case)."""
    add = group.add_argument
    add(
        "--optimizer_type",
        default="AdamW",
        help=f"one of {', '.join(OPTIMIZER_TYPES)} (any case), or a class as module.Class",
    )
    add("--optimizer_args", nargs="*", default=None, help="key=value passed to the optimizer")
    add("--learning_rate", type=float, default=2e-6)
    add("--unet_lr", type=float, default=None)
    add(
        "--text_encoder_lr",
        type=float,
        nargs="*",
        default=None,
        help="one value (or two: TE1 TE2; like sd-scripts, only the first is used)",
    )
    add("--max_grad_norm", type=float, default=1.0, help="0 turns clipping off")
    add("--lr_scheduler", default="constant", help=f"one of {', '.join(SCHEDULERS)}")
    add("--lr_warmup_steps", type=float, default=0, help="steps, or a ratio of all steps if < 1")
    add("--lr_scheduler_num_cycles", type=int, default=1)
    add("--lr_scheduler_power", type=float, default=1.0)
    add(
        "--lr_decay_steps",
        type=float,
        default=0,
        help="decay steps of warmup_stable_decay, or a ratio of all steps if < 1",
    )
    add(
        "--lr_scheduler_timescale",
        type=int,
        default=None,
        help="inverse_sqrt timescale (default: the warmup steps, or 10000 without warmup)",
    )
    add(
        "--lr_scheduler_min_lr_ratio",
        type=float,
        default=None,
        help="lowest lr as a ratio of the initial lr (cosine_with_min_lr, warmup_stable_decay)",
    )
    add(
        "--lr_scheduler_type",
        default="",
        help="a scheduler class replacing --lr_scheduler: module.Class, or a torch.optim.lr_scheduler name",
    )
    add("--lr_scheduler_args", nargs="*", default=None, help='key=value passed to the scheduler, e.g. "T_max=100"')


def add_training_arguments(group: FlagGroup) -> None:
    """The length of the run, batches, seed, checkpointing and text-encoder caching."""
    add = group.add_argument
    add("--train_batch_size", type=int, default=1)
    add("--max_train_steps", type=int, default=1600)
    add("--max_train_epochs", type=int, default=None, help="overrides --max_train_steps")
    add("--gradient_accumulation_steps", type=int, default=1)
    add(
        "--max_nan_steps",
        type=int,
        default=0,
        help="(not in sd-scripts) skip up to N optimizer steps whose loss or gradients are NaN/inf (no "
        "update; the schedule still advances), then stop; 0: stop at the first one (exit code 3)",
    )
    add("--seed", type=int, default=None)
    add("--gradient_checkpointing", action="store_true")
    add(
        "--max_token_length",
        type=int,
        default=None,
        help="caption tokens: 75 (default), 150 or 225 (encoded in chunks of 75, as sd-scripts)",
    )
    add(
        "--cache_text_encoder_outputs",
        action="store_true",
        help="encode every caption once before training (needs --network_train_unet_only)",
    )
    add(
        "--cache_text_encoder_outputs_to_disk",
        action="store_true",
        help=("also store them as sd-scripts' <stem>_te_outputs.npz (implies --cache_text_encoder_outputs)"),
    )
    add(
        "--text_encoder_cache_variants",
        type=int,
        default=1,
        help="caption variants cached per image, so caption shuffle/dropout works with the cache",
    )
    add(
        "--ddp_timeout",
        type=_positive_minutes,
        default=None,
        help="several processes: minutes a process waits in a collective (gradient average, barrier) for the others "
        "before the run stops with one line (default: torch's, 30 for CPU/gloo and 10 for GPU/NCCL)",
    )


def add_precision_arguments(group: FlagGroup) -> None:
    """Mixed precision, fp8 / fp16 weight storage, attention and memory placement."""
    add = group.add_argument
    add("--mixed_precision", default="no", choices=("no", "fp16", "bf16"))
    add(
        "--fp8_base",
        action="store_true",
        help="store the UNet's and text encoders' Linear/Conv weights in float8_e4m3fn, up-cast "
        "per layer (CUDA and CPU)",
    )
    add("--fp8_base_unet", action="store_true", help="fp8 storage for the UNet only")
    add("--full_fp16", action="store_true", help="LoRA weights in fp16 too (needs --mixed_precision fp16)")
    add("--full_bf16", action="store_true", help="LoRA weights in bf16 too (needs --mixed_precision bf16)")
    add(
        "--no_half_vae",
        action="store_true",
        help="VAE in fp32 under bf16 (under fp16 it always runs in fp32: SDXL's VAE overflows)",
    )
    add("--sdpa", action="store_true", help="PyTorch scaled-dot-product attention (default)")
    add("--xformers", action="store_true", help="xformers attention (CUDA; falls back to SDPA with one warning)")
    add("--mem_eff_attn", action="store_true", help="sliced attention: lowest peak memory, slower (any device)")
    add(
        "--lowram",
        action="store_true",
        help="accepted for sd-scripts scripts: weights always load tensor by tensor straight to "
        "the device, and cached-away models are freed unless samples need them",
    )
    add("--highvram", action="store_true", help="keep the VAE and text encoders on the GPU after caching")
    add(
        "--torch_compile",
        action="store_true",
        help="compile the UNet (and the text encoders when they train) with torch.compile; where it cannot compile, "
        "training runs uncompiled after one warning line saying why",
    )
    add(
        "--dynamo_backend",
        default=DEFAULT_BACKEND,
        choices=(*DYNAMO_BACKENDS, NO_BACKEND),
        help="torch.compile's backend under --torch_compile (sd-scripts' names; 'no', as GUI configs write, "
        "compiles nothing)",
    )


def add_output_arguments(group: FlagGroup) -> None:
    """Output files, checkpoints, states, resuming and trackers."""
    add = group.add_argument
    add("--output_dir", required=True)
    add("--output_name", default="last")
    add("--save_model_as", default="safetensors", choices=("safetensors",))
    add("--save_precision", default=None, choices=("float", "fp16", "bf16"))
    add("--save_every_n_epochs", type=int, default=None)
    add(
        "--save_every_n_steps",
        type=int,
        default=None,
        help="also save <name>-step<N:08d>.safetensors every N optimizer steps",
    )
    add(
        "--save_last_n_epochs",
        type=int,
        default=None,
        help="keep only the last N epoch checkpoints (older ones are removed)",
    )
    add(
        "--save_last_n_epochs_state",
        type=int,
        default=None,
        help="keep only the last N epoch states (default: --save_last_n_epochs)",
    )
    add("--save_last_n_steps", type=int, default=None, help="keep only step checkpoints from the last N steps")
    add(
        "--save_last_n_steps_state",
        type=int,
        default=None,
        help="keep only step states from the last N steps (default: --save_last_n_steps)",
    )
    add(
        "--save_state",
        action="store_true",
        help="save a resumable state folder (<stem>-state) with every checkpoint and at the end",
    )
    add(
        "--save_state_on_train_end",
        action="store_true",
        help="save a resumable state folder (<name>-state) at the end only",
    )
    add("--resume", default=None, help="state folder to continue from (step, epoch, lr, optimizer, RNG and data order)")
    add("--training_comment", default=None)
    add("--logging_dir", default=None, help="logs go under this folder (needed for --log_with)")
    add(
        "--log_with",
        default=None,
        choices=("tensorboard", "wandb", "all"),
        help="tracker(s); default tensorboard when --logging_dir is given",
    )
    add("--log_prefix", default=None, help="prefix of the run folder under --logging_dir")
    add("--log_tracker_name", default=None, help="project/run name given to the trackers (default network_train)")
    add(
        "--diagnostics_every_n_steps",
        type=_off_or_positive,
        default=DIAGNOSTICS_EVERY_N_STEPS,
        help="every N optimizer steps, log the LoRA+ diagnostics (per component: norms of A, B and the weight change "
        "B·A, and one step's update relative to the weights) to the trackers and the run report; 0: off. At 10 "
        "they cost under 2%% of the training time",
    )


def add_loss_arguments(group: FlagGroup) -> None:
    """sd-scripts' noise and loss flags, with its names and defaults (so its batch scripts and TOMLs run)."""
    add = group.add_argument
    add(
        "--noise_offset",
        type=float,
        default=None,
        help="noise offset: add this * N(0,1) per sample and channel to the noise (around 0.1 is usual)",
    )
    add(
        "--noise_offset_random_strength",
        action="store_true",
        help="use a random offset in [0, --noise_offset) per batch",
    )
    add(
        "--adaptive_noise_scale",
        type=float,
        default=None,
        help="add |latent channel mean| * this to --noise_offset (needs --noise_offset)",
    )
    add(
        "--multires_noise_iterations",
        type=int,
        default=None,
        help="multi-resolution (pyramid) noise with this many levels (around 6-10 is usual)",
    )
    add(
        "--multires_noise_discount",
        type=float,
        default=0.3,
        help="weight decay per pyramid level (only with --multires_noise_iterations)",
    )
    add(
        "--ip_noise_gamma",
        type=float,
        default=None,
        help="input perturbation noise: extra noise on the model input only (around 0.1 is usual)",
    )
    add(
        "--ip_noise_gamma_random_strength",
        action="store_true",
        help="use a random gamma in [0, --ip_noise_gamma) per batch",
    )
    add(
        "--min_snr_gamma",
        type=float,
        default=None,
        help="min-SNR weighting gamma (5 is the paper's recommendation); lower is stronger",
    )
    add("--v_parameterization", action="store_true", help="train a v-prediction model (target = velocity)")
    add(
        "--scale_v_pred_loss_like_noise_pred",
        action="store_true",
        help="scale the v-prediction loss like the noise-prediction loss (needs --v_parameterization)",
    )
    add("--debiased_estimation_loss", action="store_true", help="debiased estimation loss weighting")
    add(
        "--zero_terminal_snr",
        action="store_true",
        help="rescale the noise schedule's betas to reach zero SNR at the last timestep",
    )
    add("--min_timestep", type=int, default=None, help="lowest training timestep, 0-999 (default 0)")
    add("--max_timestep", type=int, default=None, help="highest training timestep (exclusive), 1-1000 (default 1000)")
    add("--loss_type", default="l2", choices=LOSS_TYPES, help="per-element loss")
    add(
        "--huber_schedule",
        default="snr",
        choices=HUBER_SCHEDULES,
        help="how the Huber threshold varies over timesteps (huber and smooth_l1 only)",
    )
    add("--huber_c", type=float, default=0.1, help="Huber threshold c (huber and smooth_l1 only)")
    add(
        "--huber_scale",
        type=float,
        default=1.0,
        help="multiplier of the Huber threshold in the constant and exponential schedules",
    )


def _off_or_positive(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (off) or more, not {value}")
    return value


def _positive_minutes(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of minutes above 0, not {text}")
    return value


def add_sampling_arguments(group: FlagGroup) -> None:
    """sd-scripts' sampling flags, names and defaults unchanged."""
    group.add_argument(
        "--sample_prompts",
        default=None,
        help="prompt file (.txt, .toml or .json, sd-scripts' format); images go to <output_dir>/sample",
    )
    group.add_argument(
        "--sample_every_n_steps",
        type=_off_or_positive,
        default=None,
        help="sample every N optimizer steps (ignored when --sample_every_n_epochs is given)",
    )
    group.add_argument(
        "--sample_every_n_epochs",
        type=_off_or_positive,
        default=None,
        help="sample at the end of every N-th epoch (overrides --sample_every_n_steps)",
    )
    group.add_argument("--sample_at_first", action="store_true", help="also sample before the first step")
    group.add_argument(
        "--sample_sampler",
        default=DEFAULT_SAMPLER,
        choices=SAMPLERS,
        help="sampler (diffusers scheduler) of the sample images; a prompt's --ss overrides it",
    )


def add_validation_arguments(group: FlagGroup) -> None:
    """sd-scripts' validation flags (names and defaults), plus `--validation_data_dir`."""
    add = group.add_argument
    add(
        "--validation_split",
        type=float,
        default=0.0,
        help="fraction of the training images (per folder; regularisation images excluded) held out for the "
        "validation loss, e.g. 0.1",
    )
    add(
        "--validation_data_dir",
        type=Path,
        default=None,
        help="folder of N_name subfolders (like --train_data_dir) used as validation images instead of a split",
    )
    add(
        "--validation_seed",
        type=int,
        default=None,
        help="seed of the split, the validation batches and their noise (default: --seed); keep it fixed to "
        "compare runs",
    )
    add(
        "--validate_every_n_steps",
        type=int,
        default=None,
        help="also compute the validation loss every N optimizer steps (it always runs at epoch ends, see "
        "--validate_every_n_epochs)",
    )
    add(
        "--validate_every_n_epochs",
        type=int,
        default=None,
        help="compute the validation loss at the end of every N-th epoch (default: every epoch)",
    )
    add(
        "--max_validation_steps", type=int, default=None, help="use at most this many validation batches (default: all)"
    )


def add_ema_arguments(group: FlagGroup) -> None:
    """Our EMA flags (sd-scripts has none)."""
    add = group.add_argument
    add(
        "--ema_decay",
        type=float,
        default=None,
        help="also keep an exponential moving average of the LoRA weights with this decay (e.g. 0.999) and save it "
        "as <output_name>-ema.safetensors beside each LoRA file",
    )
    add(
        "--ema_update_after_step",
        type=int,
        default=0,
        help="with --ema_decay: the average copies the weights for this many steps before it starts averaging",
    )
    add(
        "--ema_warmup",
        action="store_true",
        help="with --ema_decay: decay min(ema_decay, (1+t)/(10+t)) at the t-th update, for short runs",
    )


FLAG_GROUPS: tuple[tuple[str, Callable[[FlagGroup], None]], ...] = (
    ("config files", add_config_file_arguments),
    ("model", add_model_arguments),
    ("data", add_data_arguments),
    ("network", add_network_arguments),
    ("optimizer and schedule", add_optimizer_arguments),
    ("training", add_training_arguments),
    ("noise and loss", add_loss_arguments),
    ("sample images during training", add_sampling_arguments),
    ("validation", add_validation_arguments),
    ("EMA", add_ema_arguments),
    ("precision and attention", add_precision_arguments),
    ("saving and logging", add_output_arguments),
)
"""The help groups in --help order (also the tables of `--output_config`'s TOML), each with the function that
adds its flags."""


ENTRY_SCRIPTS = ("train_network.py", "sdxl_train_network.py")


def resume_command(argv: Sequence[str], state: Path, program: str | None = None) -> str:
    """The command line that continues an interrupted run: this run's own arguments with `--resume STATE` in
    place of any `--resume` they had (argparse takes the last one anyway), quoted for this OS's shell.

    `program`: how the script was started (default `python <sys.argv[0]>`, with this interpreter's full path when
    plain `python` would find another one)."""
    args: list[str] = []
    skip_next = False
    for arg in argv:
        if skip_next:
            skip_next = False
        elif arg == "--resume":
            skip_next = True
        elif not arg.startswith("--resume="):
            args.append(arg)
    if program is None:
        python = "python" if _same_file(shutil.which("python"), sys.executable) else sys.executable
        script = sys.argv[0] if Path(sys.argv[0]).name in ENTRY_SCRIPTS else "train_network.py"  # else: in-process
        program = join_command([python, script])
    return f"{program} {join_command([*args, '--resume', str(state)])}"


def _same_file(a: str | None, b: str) -> bool:
    """The same path (not resolved: a virtual environment's python links to the system one, which lacks its
    packages)."""
    return a is not None and os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))
