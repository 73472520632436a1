"""Validation loss: held-out images scored with fixed timesteps, noise and examples, so the curve is deterministic
and runs with different settings (LoRA+ ratios, learning rates) are comparable point by point.

sd-scripts' flags (`--validation_split`, `--validation_seed`, `--validate_every_n_steps`,
`--validate_every_n_epochs`, `--max_validation_steps`) and its fixed timesteps (4, evenly inside the training
range: 200, 400, 600, 800 by default), plus our `--validation_data_dir`. Deliberate differences from sd-scripts:
- the split never puts an image in both sets (sd-scripts' ceil/round can), is drawn per folder from its own seeded
  RNG (not Python's global `random`), leaves regularisation images in training and keeps >= 1 image on each side;
- a validation example is always the same: no flip, centre crop, caption as written (no shuffle or dropout);
- each (batch, timestep) has its own noise generator (and each batch its own seed of the global RNG), so a value
  does not depend on what ran before it: with several processes each computes a share of the batches, and the mean
  of all their values is the number one process gets.

Torch-free at import time: torch is imported by the functions that compute, so the config reads
`ValidationConfig` without it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from library.errors import UserInputError
from library.train.loss import NUM_TRAIN_TIMESTEPS

if TYPE_CHECKING:
    import torch

    from library.data.dataset import ExampleKey, ImageRecord, TrainDataset
    from library.data.dataset_config import DatasetConfig

VALIDATION_TIMESTEP_COUNT = 4
"""sd-scripts' NUM_VALIDATION_TIMESTEPS: every validation batch is scored at this many timesteps."""

Batch = Any
"""Whatever the caller's collate makes (the trainer's batch dict); only `compute_loss` looks inside."""
LossFn = Callable[[Batch, "torch.Tensor", "torch.Generator"], "torch.Tensor"]


# ----------------------------------------------------------------------------------------------------------
# Config


def validation_timesteps(
    low: int = 0, high: int = NUM_TRAIN_TIMESTEPS, count: int = VALIDATION_TIMESTEP_COUNT
) -> tuple[int, ...]:
    """`count` timesteps evenly inside [low, high], ends excluded: sd-scripts' `linspace(low, high, count + 2)[1:-1]`
    (200, 400, 600, 800 for the full range). Fixed timesteps take the biggest source of noise out of the curve."""
    return tuple(low + (high - low) * k // (count + 1) for k in range(1, count + 1))


@dataclass(frozen=True)
class ValidationConfig:
    """Where the validation images come from and when the loss is computed."""

    split: float = 0.0
    """Fraction of each training folder held out (0: no split)."""
    data_dir: Path | None = None
    """`N_name` folder tree of validation images (instead of a split)."""
    seed: int = 0
    """Seed of the split, the batch order and the noise (`--validation_seed`, else the training seed)."""
    every_n_steps: int | None = None
    """Also validate after every N-th optimizer step."""
    every_n_epochs: int | None = None
    """Validate at the end of every N-th epoch (None: every epoch, as sd-scripts)."""
    max_steps: int | None = None
    """At most this many validation batches (None: all)."""
    timesteps: tuple[int, ...] = validation_timesteps()
    """The fixed timesteps, inside the training range (--min_timestep / --max_timestep)."""

    @property
    def enabled(self) -> bool:
        """Whether there are validation images at all."""
        return self.split > 0 or self.data_dir is not None

    def is_due(self, step: int, epoch_end: int | None = None) -> bool:
        """sd-scripts' rule. Call with `epoch_end` None after each optimizer step (`step` = steps done) and with the
        1-based epoch number at each epoch's end: steps every `every_n_steps` (if set); epoch ends every
        `every_n_epochs` (every epoch if unset) - both can fire at the same step, run it once then."""
        if not self.enabled:
            return False
        if epoch_end is None:
            return self.every_n_steps is not None and step > 0 and step % self.every_n_steps == 0
        return self.every_n_epochs is None or epoch_end % self.every_n_epochs == 0


# ----------------------------------------------------------------------------------------------------------
# Which images


def _seeded_int(*parts: object) -> int:
    """A 63-bit int from `parts` (sha256 of their repr): the same in every process and run, touching no RNG."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode("utf-8")).digest()[:8], "big") >> 1


def split_records(
    records: Sequence[ImageRecord], fraction: float, seed: int
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(training, validation) records: per image, not per repeat; validation records get 1 repeat.

    Per folder, round(n * fraction) of its images (at most n - 1, so no folder leaves training) are chosen by
    an RNG seeded from (seed, dataset, folder name) alone - not the folder's full path, so the dataset can move
    to another machine and keep its split; if that makes none, one image of the largest folder is taken.
    Regularisation images always stay in training. Deterministic for (records, fraction, seed); the orders of
    both lists follow `records`. Raises UserInputError when no training image would be left.
    """
    if fraction <= 0:
        return list(records), []
    folders: dict[tuple[int, str], list[int]] = {}
    for index, record in enumerate(records):
        if not record.is_reg:
            folders.setdefault((record.dataset_index, str(record.path.parent)), []).append(index)

    def shuffled(key: tuple[int, str], members: list[int]) -> list[int]:
        ordered = sorted(members, key=lambda i: records[i].path.name)
        rng = random.Random(_seeded_int("validation_split", seed, key[0], Path(key[1]).name))
        return rng.sample(ordered, len(ordered))

    chosen: set[int] = set()
    for key, members in sorted(folders.items()):
        count = min(math.floor(len(members) * fraction + 0.5), len(members) - 1)
        chosen.update(shuffled(key, members)[:count])
    if not chosen and folders:
        key, members = max(sorted(folders.items()), key=lambda item: len(item[1]))
        chosen.add(shuffled(key, members)[0])
    train = [record for i, record in enumerate(records) if i not in chosen]
    if not any(not record.is_reg for record in train):
        raise UserInputError(
            f"--validation_split {fraction} leaves no training image ({len(chosen)} images): "
            "add images or use --validation_data_dir"
        )
    validation = [dataclasses.replace(records[i], num_repeats=1) for i in sorted(chosen)]
    return train, validation


def scan_validation_dir(data: DatasetConfig, directory: Path) -> list[ImageRecord]:
    """The images of a `--validation_data_dir` tree, bucketed like the training images (1 repeat each)."""
    from library.data.dataset import scan_train_data_dir

    cfg = dataclasses.replace(data, train_data_dir=Path(directory), reg_data_dir=None, dataset_config=None)
    return [dataclasses.replace(record, num_repeats=1) for record in scan_train_data_dir(cfg)]


def _fixed(record: ImageRecord) -> ImageRecord:
    """The record without random augmentation: no flip or random crop, the caption as written (prefix/suffix kept)."""
    options = record.options
    if options is None:
        return record
    caption = dataclasses.replace(
        options.caption,
        shuffle_caption=False,
        caption_dropout_rate=0.0,
        caption_dropout_every_n_epochs=0,
        caption_tag_dropout_rate=0.0,
    )
    return dataclasses.replace(
        record, options=dataclasses.replace(options, flip_aug=False, random_crop=False, caption=caption)
    )


# ----------------------------------------------------------------------------------------------------------
# The fixed batches


@dataclass(frozen=True)
class ValidationSet:
    """The validation examples and their fixed batches. Every example has the key (index, 0, 0), so it is the same
    example at every evaluation; the batch order is shuffled once by the validation seed (a cap then takes a mix
    of buckets), then never changes."""

    dataset: TrainDataset
    """The validation records (augmentation off). Cache its latents / text outputs like the training set's."""
    batches: tuple[tuple[ExampleKey, ...], ...]
    """Keys of each batch, in evaluation order."""

    def __len__(self) -> int:
        return len(self.batches)

    def iter_batches(self, source: Any = None, collate: Callable[[list[dict]], Batch] | None = None) -> Iterator[Batch]:
        """The collated batches in order. `source`: what to index with the keys (default the dataset; e.g. a
        `CachedTextDataset` of it); `collate`: default `collate_examples`."""
        for _, batch in self.iter_share(source, collate):
            yield batch

    def iter_share(
        self,
        source: Any = None,
        collate: Callable[[list[dict]], Batch] | None = None,
        *,
        rank: int = 0,
        num_processes: int = 1,
    ) -> Iterator[tuple[int, Batch]]:
        """(batch number, collated batch) of the batches process `rank` of `num_processes` computes: numbers rank,
        rank + num_processes, ... (all of them for one process); `source` and `collate` as in `iter_batches`."""
        from library.data.dataset import collate_examples

        source = self.dataset if source is None else source
        collate = collate_examples if collate is None else collate
        for number in range(rank, len(self.batches), num_processes):
            yield number, collate([source[key] for key in self.batches[number]])


def build_validation_set(
    records: Sequence[ImageRecord], data: DatasetConfig, batch_size: int, seed: int, max_batches: int | None = None
) -> ValidationSet:
    """A `ValidationSet` of `records` (from `split_records` or `scan_validation_dir`): bucketed batches of
    `batch_size` (a `--dataset_config` dataset's own batch size wins), at most `max_batches`."""
    from library.data.dataset import BucketBatchSampler, TrainDataset

    plain = dataclasses.replace(
        data,
        flip_aug=False,
        random_crop=False,
        shuffle_caption=False,
        caption_dropout_rate=0.0,
        caption_dropout_every_n_epochs=0,
        caption_tag_dropout_rate=0.0,
    )
    dataset = TrainDataset([_fixed(dataclasses.replace(r, num_repeats=1)) for r in records], plain)
    sampler = BucketBatchSampler(dataset, batch_size, seed)  # epoch 0, 1 repeat: keys (index, 0, 0)
    batches = tuple(tuple(keys) for keys in sampler)
    if max_batches is not None:
        batches = batches[:max_batches]
    return ValidationSet(dataset, batches)


# ----------------------------------------------------------------------------------------------------------
# The loss


def _batch_size(batch: Batch) -> int:
    """Examples in a batch: its `loss_weights` (the trainer's batches), else the first tensor's or list's length."""
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, Mapping):
        if "loss_weights" in batch:
            return len(batch["loss_weights"])
        for value in batch.values():
            if isinstance(value, (torch.Tensor, list, tuple)):
                return len(value)
    raise TypeError(f"cannot tell the size of a {type(batch).__name__} batch: give it a loss_weights entry")


def validation_loss(
    batches: Iterable[Batch],
    compute_loss: LossFn,
    *,
    timesteps: Sequence[int],
    seed: int,
    device: torch.device | str | None = None,
) -> float:
    """Mean of `compute_loss(batch, timesteps (B,) long, generator)` over every batch and every fixed timestep
    (`validation_losses` of all the batches, averaged)."""
    return mean_validation_loss(
        validation_losses(enumerate(batches), compute_loss, timesteps=timesteps, seed=seed, device=device)
    )


LossItem = tuple[int, int, float]
"""(batch number, timestep number, loss) of one validation batch at one fixed timestep."""


def validation_losses(
    numbered_batches: Iterable[tuple[int, Batch]],
    compute_loss: LossFn,
    *,
    timesteps: Sequence[int],
    seed: int,
    device: torch.device | str | None = None,
) -> list[LossItem]:
    """`compute_loss(batch, timesteps (B,) long, generator)` of each (batch number b, batch) at each fixed timestep.

    Every value depends on (seed, b, i) and the weights alone, not on which batches ran before it, so processes
    can each compute a share of the batches (`ValidationSet.iter_share`) and `mean_validation_loss` of all their
    items is the number one process gets. The generator of (batch b, timestep i) is a CPU `torch.Generator`
    seeded from (seed, b, i); pass it to `noise_batch(..., timesteps=, generator=)` so the noise is the same at
    every call, on every device. Any draw that still uses the global RNG (VAE posterior sampling, say) happens
    under a forked global RNG (CPU and `device`) seeded per batch, so it is fixed too and the training RNG stream
    is left exactly as it was. Runs under `torch.no_grad()`; the caller puts the network in eval mode (dropouts
    off) and back.
    """
    import torch

    devices = []
    if device is not None and torch.device(device).type == "cuda":
        index = torch.device(device).index
        devices = [torch.cuda.current_device() if index is None else index]
    python_state = random.getstate()
    items: list[LossItem] = []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            for b, batch in numbered_batches:
                torch.manual_seed(_seeded_int("validation_global", seed, b))
                size = _batch_size(batch)
                for i, timestep in enumerate(timesteps):
                    generator = torch.Generator("cpu").manual_seed(_seeded_int("validation_noise", seed, b, i))
                    steps = torch.full((size,), int(timestep), dtype=torch.long)
                    items.append((b, i, float(compute_loss(batch, steps, generator).detach().float())))
    finally:
        random.setstate(python_state)
    return items


def mean_validation_loss(items: Iterable[LossItem]) -> float:
    """The mean of every (batch, timestep) loss, summed in (batch, timestep) order: the same number whichever
    process computed which item."""
    ordered = sorted(items)
    if not ordered:
        raise ValueError("no validation batches (or no timesteps) to compute a loss on")
    total = 0.0
    for _, _, loss in ordered:
        total += loss
    return total / len(ordered)


def validation_logs(loss: float, train_average: float | None = None) -> dict[str, float]:
    """What to log: `loss/validation`, and with the training loss's moving average, the gap
    `loss/validation_divergence` (sd-scripts' `.../step_divergence`: validation minus training)."""
    logs = {"loss/validation": loss}
    if train_average is not None:
        logs["loss/validation_divergence"] = loss - train_average
    return logs


def validation_metadata(cfg: ValidationConfig) -> dict[str, str]:
    """The `ss_*` keys sd-scripts writes for its validation flags (str() of the values, "None" when unset). The
    seed is the one used (sd-scripts writes the flag, "None" when it fell back to --seed)."""
    return {
        "ss_validation_seed": str(cfg.seed),
        "ss_validation_split": str(cfg.split),
        "ss_max_validation_steps": str(cfg.max_steps),
        "ss_validate_every_n_epochs": str(cfg.every_n_epochs),
        "ss_validate_every_n_steps": str(cfg.every_n_steps),
    }
