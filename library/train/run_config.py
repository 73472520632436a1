"""The typed configuration of one run: frozen dataclasses, one slice per part of the run, built once from the command
line by `library.config.build` and read by everything below it.

The slices that belong to one part live beside it (`LossOptions` in `loss`, `SamplingConfig` in `sampling`,
`ValidationConfig` in `validation`, `EMAConfig` in `ema`, `DatasetConfig` in `library.data.dataset_config`,
`PrecisionConfig` in `library.model.precision`, `CompileConfig` in `library.model.compiled`); the slices here are those
of the recipe itself, and `TrainConfig` gathers them all. Nothing here reads the command line: the train wing imports
nothing from `library.config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from library.data.dataset_config import DatasetConfig
from library.model.compiled import CompileConfig
from library.model.precision import PrecisionConfig
from library.train.ema import EMAConfig
from library.train.loss import LossOptions
from library.train.sampling import SamplingConfig
from library.train.validation import ValidationConfig
from networks.network_args import LoRAPlusRatios


@dataclass(frozen=True)
class ModelConfig:
    path: Path
    """SDXL single file or diffusers folder."""
    config_dir: Path | None
    """Config folder for a single file (None: found beside it, else configs/sdxl)."""


@dataclass(frozen=True)
class NetworkConfig:
    module: str
    """Python module with create_network (sd-scripts' `--network_module`)."""
    dim: int
    alpha: float
    dropout: float | None
    args: dict[str, str]
    """Raw network_args strings, LoRA+ flags folded in (recorded in `ss_network_args`)."""
    loraplus: LoRAPlusRatios
    """Effective LoRA+ ratio per component."""
    weights: Path | None
    dim_from_weights: bool
    """Build modules (dims, alphas, conv) from `weights` rather than from dim/alpha/args."""
    train_unet: bool
    train_text_encoder: bool


@dataclass(frozen=True)
class OptimizerConfig:
    optimizer_type: str
    optimizer_args: dict[str, str]
    learning_rate: float
    unet_lr: float | None
    text_encoder_lr: list[float] | None
    max_grad_norm: float
    lr_scheduler: str
    lr_warmup_steps: float
    """Steps, or a ratio of all steps when < 1."""
    lr_scheduler_num_cycles: int
    lr_scheduler_power: float
    lr_decay_steps: float = 0
    """warmup_stable_decay's decay: steps, or a ratio of all steps when < 1."""
    lr_scheduler_timescale: int | None = None
    lr_scheduler_min_lr_ratio: float | None = None
    lr_scheduler_type: str | None = None
    """A scheduler class (module.Class) replacing --lr_scheduler."""
    lr_scheduler_args: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LoopConfig:
    batch_size: int
    max_train_steps: int
    max_train_epochs: int | None
    gradient_accumulation_steps: int
    seed: int
    """sd-scripts draws a random seed when none is given; we record whichever is used."""
    seed_given: bool
    max_data_loader_n_workers: int
    persistent_data_loader_workers: bool
    cache_latents: bool
    cache_latents_to_disk: bool
    vae_batch_size: int
    max_token_length: int = 75
    """Caption tokens per text-encoder pass set: 75, 150 or 225 (chunks of 75, sd-scripts' rule)."""
    cache_text_encoder_outputs: bool = False
    """Encode every caption (variant) once before training; the text encoders then leave the device."""
    cache_text_encoder_outputs_to_disk: bool = False
    """Also keep them in sd-scripts' `<stem>_te_outputs.npz` beside each image."""
    text_encoder_cache_variants: int = 1
    """Caption variants cached per image (more than 1 lets caption shuffle and dropout work with the cache)."""
    max_nan_steps: int = 0
    """Optimizer steps with a NaN/inf loss or gradients that may be skipped before the run stops (0: stop at the
    first)."""
    ddp_timeout_minutes: float | None = None
    """Several processes: how long a process waits in a collective for the others before the run stops (sd-scripts'
    `--ddp_timeout`); None: torch's default for the backend."""


@dataclass(frozen=True)
class OutputConfig:
    output_dir: Path
    output_name: str
    save_precision: str | None
    save_every_n_epochs: int | None
    training_comment: str | None
    logging_dir: Path | None
    log_prefix: str | None
    save_every_n_steps: int | None = None
    save_last_n_epochs: int | None = None
    save_last_n_epochs_state: int | None = None
    save_last_n_steps: int | None = None
    save_last_n_steps_state: int | None = None
    save_state: bool = False
    """A state folder with every checkpoint and at the end."""
    save_state_on_train_end: bool = False
    resume: Path | None = None
    log_with: tuple[str, ...] = ()
    """Trackers: "tensorboard", "wandb"."""
    log_tracker_name: str | None = None
    diagnostics_every_n_steps: int = 0
    """Log the LoRA+ diagnostics (`library.train.diagnostics`) every N optimizer steps; 0: off (the command line's
    default is `library.config.cli.DIAGNOSTICS_EVERY_N_STEPS`)."""


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig
    data: DatasetConfig
    network: NetworkConfig
    optimizer: OptimizerConfig
    precision: PrecisionConfig
    loop: LoopConfig
    output: OutputConfig
    loss: LossOptions = LossOptions()
    """Noise shaping, timestep range, loss type and weighting (sd-scripts' loss flags)."""
    sampling: SamplingConfig | None = None
    """Sample prompts and when to render them (None: no samples)."""
    validation: ValidationConfig | None = None
    """Held-out images and when to compute the validation loss (None or not `.enabled`: none)."""
    ema: EMAConfig | None = None
    """EMA of the LoRA weights (None: off)."""
    compile: CompileConfig | None = None
    """torch.compile of the models a step calls (None: off, `--torch_compile` not given)."""
