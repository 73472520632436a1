"""What a run is made of, in two kinds: the fixed parts set up once from the config (`RunParts`, and inside it
`LossParts`, what turns a batch into the loss) and the loop's mutable state (`LoopState`).

Keeping them apart says what a step may change: the step functions read the parts and write only the state they
are handed. The parts are frozen (their objects - the optimizer, the network - change inside, the set does not).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from library.data.dataset import BucketBatchSampler
from library.files.finite import NonFiniteSteps
from library.model.base_models import Encoder
from library.model.compiled import CompileState
from library.model.loading import SDXLModels
from library.model.precision import PrecisionPlan
from library.report.history import Scalar
from library.train.diagnostics import LoRADiagnostics
from library.train.ema import LoRAEMA
from library.train.loss import LossOptions
from library.train.memory_phases import MemoryPhases
from library.train.run_report import StepTimer
from library.train.saving import LoRASaver
from library.train.train_state import RngSnapshot, TrainProgress
from library.train.validation import ValidationSet
from networks.lora import ParamGroupInfo


@dataclass(frozen=True)
class Schedule:
    """How long the run is, derived once from the loop config and the data."""

    batches_per_epoch: int
    total_steps: int
    num_epochs: int


@dataclass(frozen=True)
class LossParts:
    """Everything `step.batch_loss` needs besides the batch, fixed for the run."""

    models: SDXLModels
    encode: Encoder | None
    """VAE encoder when latents are not cached, else None."""
    noise_scheduler: Any
    plan: PrecisionPlan
    accelerator: Accelerator
    max_token_length: int
    options: LossOptions
    compiled: CompileState | None = None
    """With --torch_compile: whether `models`' UNet (and trained text encoders) still run compiled."""


@dataclass(frozen=True)
class ValidationSource:
    """The held-out batches: the validation set and what its example keys index (the dataset, or with the
    text-encoder cache the dataset plus its cached outputs) with the matching collate."""

    validation: ValidationSet
    source: Any
    collate: Callable[[list[dict]], dict]

    def batches(self) -> Iterator[dict]:
        return self.validation.iter_batches(self.source, self.collate)

    def share(self, rank: int, num_processes: int) -> Iterator[tuple[int, dict]]:
        """(batch number, batch) of the batches process `rank` of `num_processes` computes."""
        return self.validation.iter_share(self.source, self.collate, rank=rank, num_processes=num_processes)


@dataclass(frozen=True)
class ReportBasis:
    """What the run's report (`library.train.report_files`) holds besides the loop's own lists, fixed once the run
    is set up: the settings that ran, the sample prompts, where this run's steps start, and the earlier history a
    resumed run continues."""

    settings: Mapping[str, Scalar]
    """`library.train.trackers.run_hparams`: what the trackers record too."""
    sample_prompts: tuple[str, ...]
    """The prompt of each sample index (the report's sample-grid rows)."""
    first_step: int
    """The step this run started from: 0, or where a resumed state stood."""
    started_at: float
    """`time.time()` at the start of `train`."""
    load_seconds: float
    """Time to load the base model."""
    earlier_history: Mapping[str, Any] | None = None
    """The `history` section of the report a resumed run continues (its steps up to `first_step` are kept)."""


@dataclass(frozen=True)
class RunParts:
    """The fixed parts of one run, built by `library.train.setup_parts` from the config slices."""

    accelerator: Accelerator
    plan: PrecisionPlan
    models: SDXLModels
    loss: LossParts
    network: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    groups: list[ParamGroupInfo]
    """The optimizer's parameter groups, in its order (LoRA+ base/plus, per block, lr, sizes)."""
    loader: DataLoader
    sampler: BucketBatchSampler
    schedule: Schedule
    saver: LoRASaver
    base_metadata: dict[str, str]
    """What every saved file says about this run (progress fields are added per save)."""
    report: ReportBasis
    ema: LoRAEMA | None = None
    validation: ValidationSource | None = None
    memory: MemoryPhases = field(default_factory=MemoryPhases)
    """The peak RAM of each phase (load, cache, set-up, train), for the run report."""

    @property
    def group_descriptions(self) -> list[str]:
        return [group.description for group in self.groups]


@dataclass
class LoopState:
    """What the loop changes as it runs; `progress` is registered with accelerate, so a state folder saves it and a
    resume loads it back."""

    progress: TrainProgress
    non_finite: NonFiniteSteps
    """Steps skipped for a NaN/inf loss or gradient, and how many may be (--max_nan_steps)."""
    timer: StepTimer = field(default_factory=StepTimer)
    rng_at_step: RngSnapshot | None = None
    """Every RNG as the last finished optimizer step left it (what Ctrl-C saves)."""
    losses: list[float] = field(default_factory=list)
    """Loss of every optimizer step run here."""
    lrs: list[dict[str, float]] = field(default_factory=list)
    """The learning rate of every group (by description) each step run here ran with."""
    validation_losses: list[tuple[int, float]] = field(default_factory=list)
    """(step, validation loss) of every evaluation."""
    diagnostics: LoRADiagnostics | None = None
    """The LoRA+ diagnostics' schedule and the copy of the weights it keeps (main process, when on)."""
    diagnostic_values: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    """(step, {tracker name: value}) of every diagnostic step run here."""

    def validated_at(self, step: int) -> bool:
        return bool(self.validation_losses) and self.validation_losses[-1][0] == step
