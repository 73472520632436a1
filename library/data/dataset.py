"""The training images: scan the datasets (`--dataset_config`, or `N_name` folder trees), place each image in a
bucket, serve bucketed batches.

`scan_train_data_dir` does all the checking, the regularisation balancing and the bucket maths once, at
start-up, and returns plain records (each carrying its subset's options); `TrainDataset` turns a record into
a training example (cached latents, or a decoded image); `BucketBatchSampler` groups examples of one dataset
and one bucket into batches; `collate_examples` stacks them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import random
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from library.data.buckets import (
    crop_offsets,
    make_bucket_resolutions,
    no_upscale_bucket,
    resize_to_cover,
    select_bucket,
)
from library.data.captions import caption_path, process_caption, read_caption
from library.data.dataset_config import (
    BucketConfig,
    DatasetConfig,
    DatasetGroupConfig,
    DatasetSectionConfig,
    SubsetConfig,
)
from library.data.images import IMAGE_EXTENSIONS, image_size, is_image_file, load_image_rgb
from library.errors import UserInputError

logger = logging.getLogger(__name__)

Size = tuple[int, int]
ExampleKey = tuple[int, int] | tuple[int, int, int]
"""(record index, epoch) or (record index, epoch, repeat number within the epoch): what the sampler yields
and `TrainDataset.__getitem__` takes."""

_SUBSET_NAME = re.compile(r"^(\d+)_(.*)$")


@dataclass(frozen=True)
class ImageRecord:
    """One training image and everything decided about it at start-up. Sizes are (w, h)."""

    path: Path
    """The image file."""
    subset: str
    """Name of its folder, e.g. "5_toy" (the key of sd-scripts' dataset metadata)."""
    class_tokens: str
    """The folder name after the repeat count, e.g. "toy"."""
    num_repeats: int
    """How many times the image is used per epoch."""
    caption: str
    """First line of its caption file, or `class_tokens` when it has none (before any shuffling)."""
    original_size: Size
    """Size of the image as displayed (EXIF orientation applied)."""
    bucket: Size
    """The training size: the window cut from the resized image."""
    resized_size: Size
    """Size the image is scaled to before cropping; covers `bucket`."""
    crop_left_top: Size
    """(left, top) of the centre crop in the resized image; random crops are drawn per epoch instead."""
    options: SubsetConfig | None = None
    """The subset it belongs to: captions, flip, crop, is_reg (None: defaults)."""
    dataset_index: int = 0
    """Which `[[datasets]]` block it is from (batches never mix datasets)."""
    batch_size: int | None = None
    """Its `[[datasets]]` block's batch size from `--dataset_config` (None: the sampler's, --train_batch_size)."""

    @property
    def is_reg(self) -> bool:
        """Whether it is a regularisation image."""
        return self.options is not None and self.options.is_reg

    @property
    def used(self) -> bool:
        """False for regularisation images left out by the balancing (0 repeats)."""
        return self.num_repeats > 0


# ----------------------------------------------------------------------------------------------------------
# Scanning


def seeded_rng(*parts: object) -> random.Random:
    """A `random.Random` seeded from `parts` (ints, strings), the same in every process and run."""
    digest = hashlib.sha256(repr(parts).encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def parse_subset_name(name: str) -> tuple[int, str] | None:
    """(repeats, class tokens) from a folder name like "10_my char", or None without the `N_` prefix."""
    match = _SUBSET_NAME.match(name)
    if match is None:
        return None
    return int(match.group(1)), match.group(2)


def bucket_resolutions(cfg: BucketConfig | DatasetConfig) -> list[Size]:
    """The predefined buckets: one per aspect ratio with `enable_bucket`, else just `resolution`."""
    if cfg.enable_bucket:
        return make_bucket_resolutions(cfg.resolution, cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps)
    return [cfg.resolution]


def place_image(
    original_size: Size, cfg: BucketConfig | DatasetConfig, buckets: Sequence[Size]
) -> tuple[Size, Size, Size]:
    """(bucket, resized_size, centre crop (left, top)) of an image of `original_size`.

    Raises ValueError when `bucket_no_upscale` leaves the image no bucket (a side below one step).
    """
    if cfg.enable_bucket and cfg.bucket_no_upscale:
        area = cfg.resolution[0] * cfg.resolution[1]
        bucket, resized = no_upscale_bucket(original_size, area, cfg.bucket_reso_steps)
    else:
        bucket = select_bucket(original_size, buckets)
        resized = resize_to_cover(original_size, bucket)
    return bucket, resized, crop_offsets(resized, bucket, random_crop=False)


def _subset_folders(root: Path) -> tuple[list[tuple[Path, int, str]], list[str]]:
    """The usable `N_name` subfolders of `root` as (folder, repeats, class tokens), and the names skipped."""
    usable, skipped = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        parsed = parse_subset_name(folder.name)
        if parsed is None:
            logger.warning(
                "skipping folder %s: its name does not start with a repeat count; rename it to N_name, e.g. 10_%s",
                folder,
                folder.name,
            )
            skipped.append(folder.name)
        elif parsed[0] == 0:
            logger.warning("skipping folder %s: 0 repeats means its images are never used", folder)
            skipped.append(folder.name)
        else:
            usable.append((folder, parsed[0], parsed[1]))
    return usable, skipped


def _check_unique_stems(folder: Path, images: list[Path]) -> None:
    """Two images with one stem would share a caption file and a latent cache: refuse them."""
    stems = Counter(path.stem for path in images)
    for stem, count in stems.items():
        if count > 1:
            names = ", ".join(sorted(p.name for p in images if p.stem == stem))
            raise UserInputError(
                f"images {names} in {folder} share the name {stem!r} (and so a caption and a latent cache): rename one"
            )


def _check_folder(root: Path, flag: str) -> None:
    if not root.exists():
        raise UserInputError(f"{flag.lstrip('-')} {root} does not exist: check {flag}")
    if not root.is_dir():
        raise UserInputError(f"{flag.lstrip('-')} {root} is not a folder: point {flag} at a folder")


def folder_subsets(root: Path, cfg: DatasetConfig, *, is_reg: bool) -> tuple[list[SubsetConfig], list[str]]:
    """The subsets of an `N_name` tree (`--train_data_dir` / `--reg_data_dir`) with the flags' options,
    and the names of the folders skipped."""
    flag = "--reg_data_dir" if is_reg else "--train_data_dir"
    _check_folder(root, flag)
    folders, skipped = _subset_folders(root)
    subsets = [
        SubsetConfig(
            image_dir=folder,
            num_repeats=repeats,
            class_tokens=class_tokens,
            caption_extension=cfg.caption_extension,
            is_reg=is_reg,
            flip_aug=cfg.flip_aug,
            random_crop=cfg.random_crop,
            caption=cfg.caption_options,
        )
        for folder, repeats, class_tokens in folders
    ]
    return subsets, skipped


def dataset_group(cfg: DatasetConfig) -> DatasetGroupConfig:
    """The datasets to scan: `cfg.dataset_config`, else one dataset of the `N_name` folders under
    `train_data_dir` and `reg_data_dir` with the command-line options."""
    if cfg.dataset_config is not None:
        return cfg.dataset_config
    if cfg.train_data_dir is None:
        raise UserInputError("no training images: give --train_data_dir or --dataset_config")
    subsets, _ = folder_subsets(cfg.train_data_dir, cfg, is_reg=False)
    if cfg.reg_data_dir is not None:
        subsets += folder_subsets(cfg.reg_data_dir, cfg, is_reg=True)[0]
    return DatasetGroupConfig((DatasetSectionConfig(cfg.buckets, cfg.batch_size, tuple(subsets)),))


def balance_reg_repeats(train_count: int, reg_repeats: Sequence[int]) -> list[int]:
    """sd-scripts' rule: the repeats of each regularisation image so that the reg examples per epoch match
    `train_count` (training images with repeats).

    Reg images are taken in order with their own repeats until the count is reached (later ones get 0, i.e.
    are unused); if one round falls short, images get +1 repeat each, in order, until it is reached.
    """
    repeats = [0] * len(reg_repeats)
    if not reg_repeats or train_count <= 0:
        return repeats
    total = 0
    for i, base in enumerate(reg_repeats):
        repeats[i] = base
        total += base
        if total >= train_count:
            return repeats
    while total < train_count:
        for i in range(len(repeats)):
            repeats[i] += 1
            total += 1
            if total >= train_count:
                break
    return repeats


def scan_train_data_dir(cfg: DatasetConfig) -> list[ImageRecord]:
    """Every training image of every dataset, checked, captioned and bucketed; per dataset, training subsets
    then regularisation subsets, each sorted by folder and name.

    Folders without the `N_` prefix are skipped with a warning. Regularisation images get sd-scripts'
    balanced repeats (0 for the unused ones). Raises UserInputError (one line naming the path) for a missing
    folder, no usable images, or an unreadable image (skipped with a warning under `skip_bad_images`).
    """
    group = dataset_group(cfg)
    records: list[ImageRecord] = []
    for dataset_index, section in enumerate(group.datasets):
        buckets = bucket_resolutions(section.buckets)
        train: list[ImageRecord] = []
        reg: list[ImageRecord] = []
        for subset in section.subsets:
            found = _scan_subset(subset, section, dataset_index, buckets, cfg.skip_bad_images)
            if group.source is None:  # the flags' batch size is the sampler's own (--train_batch_size)
                found = [dataclasses.replace(r, batch_size=None) for r in found]
            (reg if subset.is_reg else train).extend(found)
        if reg:
            train_count = sum(r.num_repeats for r in train)
            balanced = balance_reg_repeats(train_count, [r.num_repeats for r in reg])
            reg_count = sum(r.num_repeats for r in reg)
            if reg_count > train_count:
                logger.warning(
                    "%d regularisation images with repeats for %d training images: some are not used",
                    reg_count,
                    train_count,
                )
            reg = [dataclasses.replace(r, num_repeats=n) for r, n in zip(reg, balanced)]
        records += train + reg
    if not any(not r.is_reg for r in records):
        root = cfg.train_data_dir if group.source is None else group.source
        skipped = _subset_folders(cfg.train_data_dir)[1] if group.source is None and cfg.train_data_dir else []
        hint = f" (skipped folders: {', '.join(skipped)})" if skipped else ""
        where = "put images in subfolders named N_name, e.g. 10_mychar" if group.source is None else "check image_dir"
        raise UserInputError(f"no images found in {root}: {where}{hint}")
    return records


def _scan_subset(
    subset: SubsetConfig,
    section: DatasetSectionConfig,
    dataset_index: int,
    buckets: Sequence[Size],
    skip_bad_images: bool,
) -> list[ImageRecord]:
    folder = subset.image_dir
    _check_folder(folder, "image_dir")
    # Hidden files (macOS "._x.png" forks) are skipped, as sd-scripts' glob does.
    images = sorted(
        (p for p in folder.iterdir() if is_image_file(p) and not p.name.startswith(".")), key=lambda p: p.name
    )
    if not images:
        logger.warning("folder %s holds no images (%s); skipping it", folder, " ".join(sorted(IMAGE_EXTENSIONS)))
        return []
    _check_unique_stems(folder, images)
    records = []
    for path in images:
        try:
            records.append(_make_record(path, subset, section, dataset_index, buckets))
        except UserInputError as error:
            if not skip_bad_images or not str(error).startswith("cannot read image"):
                raise
            logger.warning("skipping %s (--skip_bad_images)", str(error).removesuffix("; fix or remove it"))
    return records


def _make_record(
    path: Path, subset: SubsetConfig, section: DatasetSectionConfig, dataset_index: int, buckets: Sequence[Size]
) -> ImageRecord:
    """Check one image and decide its caption, bucket and crop."""
    size = image_size(path)
    try:
        bucket, resized, crop = place_image(size, section.buckets, buckets)
    except ValueError:
        steps = section.buckets.bucket_reso_steps
        raise UserInputError(
            f"image {path} is {size[0]}x{size[1]}, smaller than --bucket_reso_steps {steps}"
            " with --bucket_no_upscale: enlarge or remove it"
        ) from None
    caption = read_caption(path, subset.caption_extension, subset.class_tokens)
    if not caption and not caption_path(path, subset.caption_extension).is_file():
        logger.warning(
            "no caption for %s: no %s file and no class tokens, so it trains with an empty caption",
            path,
            subset.caption_extension,
        )
    return ImageRecord(
        path,
        subset.name,
        subset.class_tokens,
        subset.num_repeats,
        caption,
        size,
        bucket,
        resized,
        crop,
        subset,
        dataset_index,
        section.batch_size,
    )


# ----------------------------------------------------------------------------------------------------------
# Examples


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a (3, H, W) float32 tensor in [-1, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def resize_and_crop(image: Image.Image, resized_size: Size, bucket: Size, crop_left_top: Size) -> Image.Image:
    """Scale `image` to `resized_size` (area averaging when shrinking, Lanczos otherwise) and cut the bucket."""
    if image.size != tuple(resized_size):
        shrinking = resized_size[0] < image.width and resized_size[1] < image.height
        method = Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS
        image = image.resize(tuple(resized_size), method)
    left, top = crop_left_top
    if (left, top) == (0, 0) and image.size == tuple(bucket):
        return image
    return image.crop((left, top, left + bucket[0], top + bucket[1]))


_DEFAULT_OPTIONS = SubsetConfig(Path("."))


def flip_chosen(seed: int, epoch: int, index: int, repeat: int) -> bool:
    """Whether example (epoch, index, repeat) of a `flip_aug` subset is mirrored: a fair coin from the seed."""
    return seeded_rng(seed, epoch, index, repeat, "flip").random() < 0.5


def flipped_crop_left_top(record: ImageRecord, crop_left_top: Size) -> Size:
    """The (left, top) in the mirrored resized image of the window mirrored from `crop_left_top`."""
    left, top = crop_left_top
    return record.resized_size[0] - left - record.bucket[0], top


class TrainDataset(torch.utils.data.Dataset):
    """Training examples from image records; holds the latents once `cache_latents` has computed them.

    Indexed by `(record index, epoch, repeat)`: they seed caption dropout/shuffle, random crop and flip, so
    every example is reproducible without any global random state.
    """

    def __init__(self, records: Sequence[ImageRecord], config: DatasetConfig) -> None:
        self.records: tuple[ImageRecord, ...] = tuple(records)
        self.config = config
        self._latents: dict[int, torch.Tensor] = {}
        self._latents_flipped: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.records)

    def options(self, index: int) -> SubsetConfig:
        """The subset options of record `index`: its own, else the command-line flags'."""
        record = self.records[index]
        if record.options is not None:
            return record.options
        cfg = self.config
        return dataclasses.replace(
            _DEFAULT_OPTIONS, flip_aug=cfg.flip_aug, random_crop=cfg.random_crop, caption=cfg.caption_options
        )

    # -- latents -----------------------------------------------------------------------------------------

    def set_latents(self, index: int, latents: torch.Tensor, flipped: torch.Tensor | None = None) -> None:
        """Keep the (4, h/8, w/8) float32 latents of record `index` (and of its mirror image, for `flip_aug`);
        its image is never decoded again."""
        self._latents[index] = latents
        if flipped is not None:
            self._latents_flipped[index] = flipped

    def has_latents(self, index: int) -> bool:
        """Whether record `index` has all the cached latents it needs (both sides with `flip_aug`)."""
        if index not in self._latents:
            return False
        return not self.options(index).flip_aug or index in self._latents_flipped

    def needs_flipped_latents(self, index: int) -> bool:
        """Whether record `index` is flipped at random, so its cache needs `latents_flipped`."""
        return self.options(index).flip_aug

    @property
    def all_latents_cached(self) -> bool:
        """Whether every used record has cached latents (the VAE is then no longer needed)."""
        return all(self.has_latents(i) for i, record in enumerate(self.records) if record.used)

    # -- examples ----------------------------------------------------------------------------------------

    def load_image_tensor(self, index: int, crop_left_top: Size | None = None, flip: bool = False) -> torch.Tensor:
        """Record `index` decoded, resized and cropped to its bucket (then mirrored with `flip`): (3, H, W) in [-1, 1].

        The crop defaults to the record's own (centre) crop.
        """
        record = self.records[index]
        crop = record.crop_left_top if crop_left_top is None else crop_left_top
        image = resize_and_crop(load_image_rgb(record.path), record.resized_size, record.bucket, crop)
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image_to_tensor(image)

    def caption(self, index: int, epoch: int = 0, repeat: int = 0) -> str:
        """The caption of example (index, epoch, repeat) - the same as `self[key]["caption"]`, without decoding."""
        rng = seeded_rng(self.config.seed, epoch, index, repeat)
        return process_caption(self.records[index].caption, self.options(index).caption, rng=rng, epoch=epoch)

    def captions_vary(self) -> bool:
        """Whether any used record's caption changes between uses (shuffle, caption or tag dropout)."""
        for index, record in enumerate(self.records):
            caption = self.options(index).caption
            if record.used and (
                caption.shuffle_caption
                or caption.caption_dropout_rate > 0
                or caption.caption_dropout_every_n_epochs > 0
                or caption.caption_tag_dropout_rate > 0
            ):
                return True
        return False

    def __getitem__(self, key: ExampleKey | int) -> dict:
        index, epoch, repeat = (key, 0, 0) if isinstance(key, int) else (*key, 0)[:3]
        record = self.records[index]
        options = self.options(index)
        seed = self.config.seed
        flip = options.flip_aug and flip_chosen(seed, epoch, index, repeat)
        example: dict = {}
        crop = record.crop_left_top
        if index in self._latents:
            example["latents"] = self._latents_flipped[index] if flip else self._latents[index]
        else:
            if options.random_crop:
                crop_rng = seeded_rng(seed, epoch, index, "crop")
                crop = crop_offsets(record.resized_size, record.bucket, True, crop_rng)
            example["image"] = self.load_image_tensor(index, crop, flip)
        if flip:
            crop = flipped_crop_left_top(record, crop)
        example["caption"] = self.caption(index, epoch, repeat)
        example["original_size_hw"] = (record.original_size[1], record.original_size[0])
        example["crop_top_left"] = (crop[1], crop[0])
        example["target_size_hw"] = (record.bucket[1], record.bucket[0])
        example["loss_weight"] = self.config.prior_loss_weight if record.is_reg else 1.0
        return example

    # -- metadata ----------------------------------------------------------------------------------------

    @property
    def num_train_images(self) -> int:
        """Training images per epoch, repeats counted, regularisation images not (sd-scripts' `ss_num_train_images`)."""
        return sum(record.num_repeats for record in self.records if not record.is_reg)

    @property
    def num_reg_images(self) -> int:
        """Regularisation images with their folders' repeats, before balancing (sd-scripts' `ss_num_reg_images`)."""
        return sum(record.options.num_repeats for record in self.records if record.is_reg)

    @property
    def num_examples_per_epoch(self) -> int:
        """Examples per epoch: training and (balanced) regularisation images, repeats counted."""
        return sum(record.num_repeats for record in self.records)

    def bucket_counts(self) -> dict[Size, int]:
        """Examples per bucket (w, h), repeats counted, in bucket order."""
        counts: Counter[Size] = Counter()
        for record in self.records:
            if record.used:
                counts[record.bucket] += record.num_repeats
        return dict(sorted(counts.items()))

    def mean_ar_error(self) -> float:
        """Mean |bucket aspect - image aspect| over the used images, repeats not counted (sd-scripts' number)."""
        errors = [
            abs(r.bucket[0] / r.bucket[1] - r.original_size[0] / r.original_size[1]) for r in self.records if r.used
        ]
        return sum(errors) / len(errors) if errors else 0.0

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """Per folder, how many captions hold each comma-separated tag (lower-cased; once per image)."""
        frequency: dict[str, dict[str, int]] = {}
        for record in self.records:
            tags = frequency.setdefault(record.subset, {})
            for tag in record.caption.split(","):
                tag = tag.strip().lower()
                if tag:
                    tags[tag] = tags.get(tag, 0) + 1
        return frequency

    def _dirs_info(self, is_reg: bool) -> dict[str, dict[str, int]]:
        info: dict[str, dict[str, int]] = {}
        for record in self.records:
            if record.is_reg != is_reg:
                continue
            repeats = record.options.num_repeats if record.options is not None else record.num_repeats
            entry = info.setdefault(record.subset, {"n_repeats": repeats, "img_count": 0})
            entry["img_count"] += 1
        return info

    def dataset_dirs_info(self) -> dict[str, dict[str, int]]:
        """Per training folder, its repeat count and number of images (sd-scripts' `ss_dataset_dirs`)."""
        return self._dirs_info(is_reg=False)

    def reg_dataset_dirs_info(self) -> dict[str, dict[str, int]]:
        """Per regularisation folder, its configured repeats and its images (sd-scripts' `ss_reg_dataset_dirs`)."""
        return self._dirs_info(is_reg=True)

    def subsets_info(self) -> list[dict]:
        """One entry per subset, in order, like the `subsets` of sd-scripts' `ss_datasets`."""
        entries: dict[tuple[int, Path], dict] = {}
        for record in self.records:
            options = record.options or self.options(0)
            key = (record.dataset_index, options.image_dir if record.options else record.path.parent)
            if key not in entries:
                caption = options.caption
                entries[key] = {
                    "dataset": record.dataset_index,
                    "image_dir": record.subset,
                    "img_count": 0,
                    "num_repeats": options.num_repeats if record.options else record.num_repeats,
                    "class_tokens": record.class_tokens,
                    "is_reg": record.is_reg,
                    "flip_aug": options.flip_aug,
                    "random_crop": options.random_crop,
                    "shuffle_caption": caption.shuffle_caption,
                    "keep_tokens": caption.keep_tokens,
                    "keep_tokens_separator": caption.keep_tokens_separator,
                    "caption_separator": caption.caption_separator,
                    "caption_prefix": caption.caption_prefix,
                    "caption_suffix": caption.caption_suffix,
                    "caption_dropout_rate": caption.caption_dropout_rate,
                    "caption_dropout_every_n_epochs": caption.caption_dropout_every_n_epochs,
                    "caption_tag_dropout_rate": caption.caption_tag_dropout_rate,
                }
            entries[key]["img_count"] += 1
        return list(entries.values())

    def bucket_report(self) -> str:
        """A short table of the buckets for the start-up log."""
        counts = self.bucket_counts()
        lines = ["bucket (WxH)  images with repeats"]
        lines += [f"{f'{w}x{h}':<13} {count}" for (w, h), count in counts.items()]
        reg = f", {self.num_examples_per_epoch - self.num_train_images} regularisation" if self.num_reg_images else ""
        lines.append(
            f"{len(self.records)} images in {len(counts)} buckets, {self.num_train_images} with repeats{reg};"
            f" mean aspect-ratio error {self.mean_ar_error():.3f}"
        )
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Batching


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of `(index, epoch, repeat)` keys, each from one dataset and one bucket; every image
    `num_repeats` times per epoch.

    Per epoch (seeded by `seed` and the epoch): images are shuffled within their bucket, cut into batches (the
    record's dataset batch size, else `batch_size`; the last one of a bucket may be smaller), and the batches
    shuffled. With several replicas the batch list is padded by wrapping around to a multiple of
    `num_replicas`, and rank r takes batches r, r + num_replicas, ... so every rank runs the same number of steps.
    """

    def __init__(
        self,
        records: TrainDataset | Sequence[ImageRecord],
        batch_size: int,
        seed: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        items = records.records if isinstance(records, TrainDataset) else tuple(records)
        self.batch_size = batch_size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.epoch = 0
        self.skip_batches = 0
        self._members: dict[tuple[int, Size], list[int]] = {}
        self._batch_sizes: dict[tuple[int, Size], int] = {}
        for index, record in enumerate(items):
            group = (record.dataset_index, record.bucket)
            self._members.setdefault(group, []).extend([index] * record.num_repeats)
            self._batch_sizes[group] = record.batch_size or batch_size
        self._members = {group: members for group, members in sorted(self._members.items()) if members}

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Use `epoch` for the next iteration (its shuffles and the keys' epoch), leaving out this rank's first
        `skip_batches` batches (a resumed run continues mid-epoch without loading what it already used)."""
        self.epoch = epoch
        self.skip_batches = skip_batches

    def _total_batches(self) -> int:
        return sum(math.ceil(len(members) / self._batch_sizes[group]) for group, members in self._members.items())

    def epoch_batches(self) -> list[list[int]]:
        """All batches of the current epoch, as record indices, before the split across replicas."""
        rng = seeded_rng(self.seed, self.epoch, "batches")
        batches: list[list[int]] = []
        for group, members in self._members.items():
            members = list(members)
            size = self._batch_sizes[group]
            if self.shuffle:
                rng.shuffle(members)
            batches += [members[start : start + size] for start in range(0, len(members), size)]
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[ExampleKey]]:
        # Each repeat of an image gets its own key, so its caption shuffle differs (as in sd-scripts).
        seen: Counter[int] = Counter()
        keyed: list[list[ExampleKey]] = []
        for batch in self.epoch_batches():
            keys = []
            for index in batch:
                keys.append((index, self.epoch, seen[index]))
                seen[index] += 1
            keyed.append(keys)
        if keyed and self.num_replicas > 1:
            padded_len = len(self) * self.num_replicas
            keyed = [keyed[i % len(keyed)] for i in range(padded_len)]
        yield from keyed[self.rank :: self.num_replicas][self.skip_batches :]

    def __len__(self) -> int:
        return math.ceil(self._total_batches() / self.num_replicas)


def collate_examples(examples: list[dict]) -> dict:
    """Stack examples of one bucket into a batch.

    Returns `latents` (B, 4, h, w) or `images` (B, 3, H, W), `captions`, `original_sizes_hw`,
    `crop_top_lefts`, `target_sizes_hw` (LongTensor (B, 2)) and `loss_weights` (FloatTensor (B,)).
    """
    batch: dict = {}
    if all("latents" in example for example in examples):
        batch["latents"] = torch.stack([example["latents"] for example in examples])
    elif all("image" in example for example in examples):
        batch["images"] = torch.stack([example["image"] for example in examples])
    else:
        raise ValueError("a batch mixes cached latents and images: cache all latents or none")
    batch["captions"] = [example["caption"] for example in examples]
    for source, target in (
        ("original_size_hw", "original_sizes_hw"),
        ("crop_top_left", "crop_top_lefts"),
        ("target_size_hw", "target_sizes_hw"),
    ):
        batch[target] = torch.tensor([list(example[source]) for example in examples], dtype=torch.long)
    batch["loss_weights"] = torch.tensor([float(example["loss_weight"]) for example in examples], dtype=torch.float32)
    return batch
