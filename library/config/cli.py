"""The command line: sd-scripts' flag names and defaults, so existing batch scripts run unchanged.

Only this module and `library.config.build` see the argparse namespace.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from library.train.loss import add_loss_arguments
from library.train.optim import OPTIMIZER_TYPES, SCHEDULERS
from library.train.ema import add_ema_arguments
from library.train.sampling import add_sampling_arguments
from library.train.validation import add_validation_arguments

class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (not the whole usage block), like every other input error."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrorParser(
        prog="train_network.py",
        description="Train an SDXL LoRA (LoRA+ built in) with sd-scripts' command line.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    files = parser.add_argument_group("config files")
    files.add_argument("--config_file", default=None,
                       help="TOML of these arguments (flat, or grouped in tables as sd-scripts writes them); flags "
                            "on the command line win; an unknown key is an error, and so is an sd-scripts option this "
                            "trainer lacks unless it is off")
    files.add_argument("--output_config", action="store_true",
                       help="write the effective arguments as TOML (to --config_file's path, else "
                            "<output_dir>/<output_name>.toml) and exit without training")

    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", required=True,
                       help="SDXL single file (.safetensors, original layout) or diffusers folder")
    model.add_argument("--model_config_dir", default=None,
                       help="diffusers-format config folder for a single file (default: a <stem>_diffusers or "
                            "<stem>_config folder beside it, else the shipped configs/sdxl)")

    data = parser.add_argument_group("data")
    data.add_argument("--train_data_dir", default=None,
                      help="folder of N_name subfolders (N = repeats); required unless --dataset_config")
    data.add_argument("--dataset_config", default=None,
                      help="sd-scripts dataset TOML ([general], [[datasets]], [[datasets.subsets]]); these flags are "
                           "its last fallback")
    data.add_argument("--reg_data_dir", default=None, help="folder of N_name subfolders of regularisation images")
    data.add_argument("--prior_loss_weight", type=float, default=1.0, help="loss weight of regularisation images")
    data.add_argument("--caption_extension", default=".caption")
    data.add_argument("--resolution", default="512", help='training resolution: "W,H" or one number')
    data.add_argument("--enable_bucket", action="store_true", help="aspect-ratio buckets")
    data.add_argument("--min_bucket_reso", type=int, default=256)
    data.add_argument("--max_bucket_reso", type=int, default=1024)
    data.add_argument("--bucket_reso_steps", type=int, default=64)
    data.add_argument("--bucket_no_upscale", action="store_true")
    data.add_argument("--random_crop", action="store_true")
    data.add_argument("--shuffle_caption", action="store_true")
    data.add_argument("--keep_tokens", type=int, default=0)
    data.add_argument("--keep_tokens_separator", default="",
                      help='marks "fixed ||| shuffled ||| fixed suffix" in captions, e.g. "|||"')
    data.add_argument("--caption_separator", default=",", help="separator of the tags in captions")
    data.add_argument("--caption_prefix", default=None, help="text put before every caption")
    data.add_argument("--caption_suffix", default=None, help="text put after every caption")
    data.add_argument("--caption_dropout_rate", type=float, default=0.0, help="chance that a caption becomes empty")
    data.add_argument("--caption_dropout_every_n_epochs", type=int, default=0,
                      help="all captions are empty in every N-th epoch")
    data.add_argument("--caption_tag_dropout_rate", type=float, default=0.0,
                      help="chance that each shuffled tag is left out")
    data.add_argument("--flip_aug", action="store_true", help="mirror images horizontally at random")
    data.add_argument("--skip_bad_images", action="store_true",
                      help="skip an unreadable image with a warning instead of stopping")
    data.add_argument("--cache_latents", action="store_true", help="encode every image once, before training")
    data.add_argument("--cache_latents_to_disk", action="store_true",
                      help="also store latents as sd-scripts-compatible .npz beside the images (implies --cache_latents)")
    data.add_argument("--vae_batch_size", type=int, default=1)
    data.add_argument("--max_data_loader_n_workers", type=int, default=8, help="capped at the CPU count")
    data.add_argument("--persistent_data_loader_workers", action="store_true")

    network = parser.add_argument_group("network")
    network.add_argument("--network_module", default="networks.lora")
    network.add_argument("--network_dim", type=int, default=4)
    network.add_argument("--network_alpha", type=float, default=1.0)
    network.add_argument("--network_dropout", type=float, default=None)
    network.add_argument("--network_args", nargs="*", default=None, help='key=value, e.g. "loraplus_lr_ratio=16"')
    network.add_argument("--network_weights", default=None, help="LoRA file to start from")
    network.add_argument("--dim_from_weights", action="store_true",
                         help="take each module's dim and alpha from --network_weights instead of --network_dim")
    network.add_argument("--network_train_unet_only", action="store_true")
    network.add_argument("--network_train_text_encoder_only", action="store_true")
    network.add_argument("--loraplus_lr_ratio", type=float, default=None,
                         help="LoRA+: lr of B (lora_up) = lr x ratio, for UNet and text encoders")
    network.add_argument("--loraplus_unet_lr_ratio", type=float, default=None, help="LoRA+ ratio for the UNet only")
    network.add_argument("--loraplus_text_encoder_lr_ratio", type=float, default=None,
                         help="LoRA+ ratio for the text encoders only")

    optim = parser.add_argument_group("optimizer and schedule")
    optim.add_argument("--optimizer_type", default="AdamW",
                       help=f"one of {', '.join(OPTIMIZER_TYPES)} (any case), or a class as module.Class")
    optim.add_argument("--optimizer_args", nargs="*", default=None, help="key=value passed to the optimizer")
    optim.add_argument("--learning_rate", type=float, default=2e-6)
    optim.add_argument("--unet_lr", type=float, default=None)
    optim.add_argument("--text_encoder_lr", type=float, nargs="*", default=None,
                       help="one value (or two: TE1 TE2; like sd-scripts, only the first is used)")
    optim.add_argument("--max_grad_norm", type=float, default=1.0, help="0 turns clipping off")
    optim.add_argument("--lr_scheduler", default="constant", help=f"one of {', '.join(SCHEDULERS)}")
    optim.add_argument("--lr_warmup_steps", type=float, default=0, help="steps, or a ratio of all steps if < 1")
    optim.add_argument("--lr_scheduler_num_cycles", type=int, default=1)
    optim.add_argument("--lr_scheduler_power", type=float, default=1.0)
    optim.add_argument("--lr_decay_steps", type=float, default=0,
                       help="decay steps of warmup_stable_decay, or a ratio of all steps if < 1")
    optim.add_argument("--lr_scheduler_timescale", type=int, default=None,
                       help="inverse_sqrt timescale (default: the warmup steps, or 10000 without warmup)")
    optim.add_argument("--lr_scheduler_min_lr_ratio", type=float, default=None,
                       help="lowest lr as a ratio of the initial lr (cosine_with_min_lr, warmup_stable_decay)")
    optim.add_argument("--lr_scheduler_type", default="",
                       help="a scheduler class replacing --lr_scheduler: module.Class, or a torch.optim.lr_scheduler "
                            "name")
    optim.add_argument("--lr_scheduler_args", nargs="*", default=None,
                       help='key=value passed to the scheduler, e.g. "T_max=100"')

    loop = parser.add_argument_group("training")
    loop.add_argument("--train_batch_size", type=int, default=1)
    loop.add_argument("--max_train_steps", type=int, default=1600)
    loop.add_argument("--max_train_epochs", type=int, default=None, help="overrides --max_train_steps")
    loop.add_argument("--gradient_accumulation_steps", type=int, default=1)
    loop.add_argument("--max_nan_steps", type=int, default=0,
                      help="(not in sd-scripts) skip up to N optimizer steps whose loss or gradients are NaN/inf (no "
                           "update; the schedule still advances), then stop; 0: stop at the first one (exit code 3)")
    loop.add_argument("--seed", type=int, default=None)
    loop.add_argument("--gradient_checkpointing", action="store_true")
    loop.add_argument("--max_token_length", type=int, default=None,
                      help="caption tokens: 75 (default), 150 or 225 (encoded in chunks of 75, as sd-scripts)")
    loop.add_argument("--cache_text_encoder_outputs", action="store_true",
                      help="encode every caption once before training (needs --network_train_unet_only)")
    loop.add_argument("--cache_text_encoder_outputs_to_disk", action="store_true",
                      help=("also store them as sd-scripts' <stem>_te_outputs.npz"
                            " (implies --cache_text_encoder_outputs)"))
    loop.add_argument("--text_encoder_cache_variants", type=int, default=1,
                      help="caption variants cached per image, so caption shuffle/dropout works with the cache")

    add_loss_arguments(parser.add_argument_group("noise and loss"))
    add_sampling_arguments(parser)
    add_validation_arguments(parser.add_argument_group("validation"))
    add_ema_arguments(parser.add_argument_group("EMA"))

    precision = parser.add_argument_group("precision and attention")
    precision.add_argument("--mixed_precision", default="no", choices=("no", "fp16", "bf16"))
    precision.add_argument("--fp8_base", action="store_true",
                           help="store the UNet's and text encoders' Linear/Conv weights in float8_e4m3fn, up-cast "
                                "per layer (CUDA and CPU)")
    precision.add_argument("--fp8_base_unet", action="store_true", help="fp8 storage for the UNet only")
    precision.add_argument("--full_fp16", action="store_true",
                           help="LoRA weights in fp16 too (needs --mixed_precision fp16)")
    precision.add_argument("--full_bf16", action="store_true",
                           help="LoRA weights in bf16 too (needs --mixed_precision bf16)")
    precision.add_argument("--no_half_vae", action="store_true",
                           help="VAE in fp32 under bf16 (under fp16 it always runs in fp32: SDXL's VAE overflows)")
    precision.add_argument("--sdpa", action="store_true", help="PyTorch scaled-dot-product attention (default)")
    precision.add_argument("--xformers", action="store_true",
                           help="xformers attention (CUDA; falls back to SDPA with one warning)")
    precision.add_argument("--mem_eff_attn", action="store_true",
                           help="sliced attention: lowest peak memory, slower (any device)")
    precision.add_argument("--lowram", action="store_true",
                           help="accepted for sd-scripts scripts: weights always load tensor by tensor straight to "
                                "the device, and cached-away models are freed unless samples need them")
    precision.add_argument("--highvram", action="store_true",
                           help="keep the VAE and text encoders on the GPU after caching")

    save = parser.add_argument_group("saving and logging")
    save.add_argument("--output_dir", required=True)
    save.add_argument("--output_name", default="last")
    save.add_argument("--save_model_as", default="safetensors", choices=("safetensors",))
    save.add_argument("--save_precision", default=None, choices=("float", "fp16", "bf16"))
    save.add_argument("--save_every_n_epochs", type=int, default=None)
    save.add_argument("--save_every_n_steps", type=int, default=None,
                      help="also save <name>-step<N:08d>.safetensors every N optimizer steps")
    save.add_argument("--save_last_n_epochs", type=int, default=None,
                      help="keep only the last N epoch checkpoints (older ones are removed)")
    save.add_argument("--save_last_n_epochs_state", type=int, default=None,
                      help="keep only the last N epoch states (default: --save_last_n_epochs)")
    save.add_argument("--save_last_n_steps", type=int, default=None,
                      help="keep only step checkpoints from the last N steps")
    save.add_argument("--save_last_n_steps_state", type=int, default=None,
                      help="keep only step states from the last N steps (default: --save_last_n_steps)")
    save.add_argument("--save_state", action="store_true",
                      help="save a resumable state folder (<stem>-state) with every checkpoint and at the end")
    save.add_argument("--save_state_on_train_end", action="store_true",
                      help="save a resumable state folder (<name>-state) at the end only")
    save.add_argument("--resume", default=None,
                      help="state folder to continue from (step, epoch, lr, optimizer, RNG and data order)")
    save.add_argument("--training_comment", default=None)
    save.add_argument("--logging_dir", default=None, help="logs go under this folder (needed for --log_with)")
    save.add_argument("--log_with", default=None, choices=("tensorboard", "wandb", "all"),
                      help="tracker(s); default tensorboard when --logging_dir is given")
    save.add_argument("--log_prefix", default=None, help="prefix of the run folder under --logging_dir")
    save.add_argument("--log_tracker_name", default=None, help="project/run name given to the trackers "
                                                               "(default network_train)")
    return parser


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
        program = _join([python, script])
    return f"{program} {_join([*args, '--resume', str(state)])}"


def _same_file(a: str | None, b: str) -> bool:
    """The same path (not resolved: a virtual environment's python links to the system one, which lacks its
    packages)."""
    return a is not None and os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))


def _join(words: Sequence[str]) -> str:
    return subprocess.list2cmdline(list(words)) if os.name == "nt" else shlex.join(words)
