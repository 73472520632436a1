"""The checks that need several slices of the configuration: would anything train, can the optimizer run the
planned groups, does the text-encoder cache fit the network and the captions, does a resumed state leave anything to
train, and can the output folders take the first save (and how large it will be). Each takes typed slices (never
the namespace), is cheap (at most a file header is read) and raises one `UserInputError` line, so
`library.config.build` runs them all before any model loads.
"""

from __future__ import annotations

import math
from pathlib import Path

from library.data.dataset_config import DatasetConfig
from library.errors import UserInputError
from library.files.output_checks import FirstSave, check_free_space, check_output_folder, estimate_first_save
from library.files.weight_files import read_safetensors_header
from library.model.model_files import ModelShapes
from library.model.precision import save_dtype
from library.train.optim import is_adaptive, per_group_lr_problem
from library.train.run_config import LoopConfig, NetworkConfig, OptimizerConfig, OutputConfig
from library.train.train_state import check_resume_folder, launched_processes, saved_progress
from networks.block_weights import (
    EMBEDDING_BLOCK,
    LR_WEIGHT_KEYS,
    OUT_BLOCK,
    block_dims_and_alphas,
    block_index,
    block_lr_weights,
)
from networks.lora_size import diffusers_lora_layers, lora_parameter_count, single_file_lora_layers
from networks.loraplus import LoRAPlusRule, planned_groups
from networks.network_args import LoRAPlusRatios


# --- Would anything train? --------------------------------------------------------------------------------------------
def check_network_trains(network: NetworkConfig, optimizer: OptimizerConfig) -> None:
    """Refuse a run in which no LoRA weight would change (see `check_something_trains`), reading at most the
    --network_weights header (its module names under --dim_from_weights)."""
    file_names = None
    if network.weights is not None and network.dim_from_weights:
        file_names = [key.partition(".")[0] for key in read_safetensors_header(network.weights)[0]]
    check_something_trains(
        optimizer.learning_rate,
        optimizer.unet_lr,
        optimizer.text_encoder_lr,
        network.train_unet,
        network.train_text_encoder,
        unet_empty=unet_without_modules(network.args, network.dim, network.alpha, file_names),
        text_encoder_empty=(
            "the --network_weights file has no text-encoder modules"
            if file_names is not None and not any(n.startswith("lora_te") for n in file_names)
            else None
        ),
    )


def check_something_trains(
    learning_rate: float,
    unet_lr: float | None,
    text_encoder_lr: list[float] | None,
    train_unet: bool,
    train_text_encoder: bool,
    unet_empty: str | None = None,
    text_encoder_empty: str | None = None,
) -> None:
    """Refuse a run in which no LoRA weight would change: each component is not trained, at lr 0, or gets no
    modules (`unet_empty` / `text_encoder_empty` say why, e.g. every block lr weight is 0)."""
    te_lr, te_flag = (
        (text_encoder_lr[0], "--text_encoder_lr") if text_encoder_lr else (learning_rate, "--learning_rate")
    )
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
    advice = (
        "give a learning rate above 0"
        if all("learning rate 0" in r or "not trained" in r for r in reasons)
        else "change one of these"
    )
    raise UserInputError(f"nothing would train ({'; '.join(reasons)}): {advice}")


def unet_without_modules(
    network_args: dict[str, str], dim: int, alpha: float, weights_names: list[str] | None
) -> str | None:
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
    if blocks is not None and not any(
        blocks.dims[b] > 0 or (blocks.conv_dims is not None and blocks.conv_dims[b] > 0) for b in adapted
    ):
        return "every block dim is 0 (block_dims, conv_block_dims)"
    return None


def _block_or(lora_name: str, default: int) -> int:
    try:
        return block_index(lora_name)
    except ValueError:  # not an SDXL UNet name: loading the network reports it
        return default


# --- Can the optimizer run the planned groups? ------------------------------------------------------------------------
def planned_group_lrs(
    learning_rate: float,
    unet_lr: float | None,
    text_encoder_lr: list[float] | None,
    loraplus: LoRAPlusRatios,
    train_unet: bool,
    train_text_encoder: bool,
) -> dict[str, float]:
    """The learning rate of every optimizer group the run will have (before block weights), by name: the LoRA+
    rule of `networks.loraplus`, for a network with modules in each trained component."""
    rule = LoRAPlusRule.from_rates(learning_rate, unet_lr, text_encoder_lr, loraplus)
    groups = planned_groups(rule, train_text_encoder=train_text_encoder, train_unet=train_unet)
    return {group.description: group.lr for group in groups}


def check_optimizer_fits_groups(
    optimizer_type: str,
    group_lrs: dict[str, float],
    network_args: dict[str, str],
    optimizer_args: dict[str, str] | None = None,
) -> None:
    """Refuse, before any model loads, an optimizer that would crash on (or ignore) per-group rates."""
    problem = per_group_lr_problem(optimizer_type, group_lrs, optimizer_args)
    if problem is None and is_adaptive(optimizer_type):
        block_keys = [key for key in LR_WEIGHT_KEYS if key in network_args]
        if block_keys:
            problem = (
                f"--optimizer_type {optimizer_type} estimates one step size for all parameter groups and cannot "
                f"take block lr weights ({', '.join(block_keys)}); remove them or use AdamW, AdamW8bit or Lion"
            )
    if problem:
        raise UserInputError(problem)


# --- The text-encoder cache ------------------------------------------------------------------------------------------
CAPTION_VARYING_FLAGS = (
    "shuffle_caption",
    "caption_dropout_rate",
    "caption_tag_dropout_rate",
    "caption_dropout_every_n_epochs",
)
"""Flags (and `DatasetConfig` fields) that make an image's caption change between uses."""


def check_text_encoder_cache(loop: LoopConfig, data: DatasetConfig, train_text_encoder: bool) -> None:
    """Cached text-encoder outputs fit the run: UNet-only training, and caption variants when captions vary."""
    if not loop.cache_text_encoder_outputs:
        return
    if train_text_encoder:
        raise UserInputError(
            "--cache_text_encoder_outputs needs --network_train_unet_only: text-encoder LoRA "
            "cannot train on cached text-encoder outputs"
        )
    varying = [f"--{name}" for name in CAPTION_VARYING_FLAGS if getattr(data, name)]
    if varying and loop.text_encoder_cache_variants == 1:
        raise UserInputError(
            f"--cache_text_encoder_outputs would freeze the captions that {', '.join(varying)} changes every step: "
            "add --text_encoder_cache_variants N (e.g. 8) to cache N caption variants per image"
        )


# --- Resuming ---------------------------------------------------------------------------------------------------------
def check_resume(resume: Path, loop: LoopConfig, with_ema: bool) -> None:
    """A state to resume from leaves something to train, and its folder is complete (with the EMA when this run
    keeps one); nothing left to train is reported first (there is nothing to fix in the folder then)."""
    check_resume_trains(resume, loop.max_train_steps, loop.max_train_epochs)
    check_resume_folder(resume, with_ema=with_ema, processes=launched_processes())


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
        raise UserInputError(
            f"--resume {resume}: that state is at step {progress.step} (epoch {progress.epoch}), "
            f"already the end of {length}; nothing would train: give a longer run"
        )


# --- The output folders and the first save ----------------------------------------------------------------------------
def check_output_room(output: OutputConfig, first_save: FirstSave) -> None:
    """The output (and logging) folder can be written to, and the output disk has room for the first save."""
    check_output_folder(output.output_dir, "--output_dir")
    if output.logging_dir is not None:
        check_output_folder(output.logging_dir, "--logging_dir")
    check_free_space(output.output_dir, "--output_dir", first_save)


def first_save_estimate(
    shapes: ModelShapes, network: NetworkConfig, optimizer_type: str, output: OutputConfig, with_ema: bool
) -> FirstSave:
    """The size of the run's first save, from the model's tensor shapes and the network slice (or, with
    --dim_from_weights, the LoRA file's own tensors); see `library.files.output_checks.estimate_first_save`."""
    if network.weights is not None and network.dim_from_weights:
        entries = read_safetensors_header(network.weights)[0]
        parameters = sum(math.prod(entry.shape) for entry in entries.values())
        tensors = len(entries)
    else:
        parameters, tensors = _planned_lora_size(shapes, network)
    return estimate_first_save(
        parameters,
        tensors,
        save_dtype(output.save_precision).itemsize,
        ema=with_ema,
        save_state=bool(output.save_state or output.save_state_on_train_end),
        optimizer_type=optimizer_type,
    )


def _planned_lora_size(shapes: ModelShapes, network: NetworkConfig) -> tuple[int, int]:
    """(parameters, tensors) of the LoRA the network flags build on a model of these shapes."""
    network_args = network.args
    conv_dim = int(network_args["conv_dim"]) if "conv_dim" in network_args else None
    blocks = block_dims_and_alphas(
        network_args, network.dim, network.alpha, conv_dim, 1.0 if conv_dim else None, block_lr_weights(network_args)
    )  # alphas: no size
    include_conv = bool(conv_dim) if blocks is None else blocks.conv_dims is not None
    if shapes.single_file is not None:
        layers = single_file_lora_layers(shapes.single_file, include_conv)
    else:
        parts = shapes.components
        layers = diffusers_lora_layers(parts["text_encoder1"], parts["text_encoder2"], parts["unet"], include_conv)
    unet_rank = None
    if blocks is not None:
        unet_rank = lambda layer: (blocks.dim_and_alpha(layer.lora_name, layer.is_conv3x3) or (0,))[0]  # noqa: E731
    return lora_parameter_count(
        layers,
        dim=network.dim,
        conv_dim=conv_dim,
        train_unet=network.train_unet,
        train_text_encoder=network.train_text_encoder,
        unet_rank=unet_rank,
    )
