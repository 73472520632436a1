"""The training images: scan a `N_name` folder tree, place each image in a bucket, serve bucketed batches.

`scan_train_data_dir` does all the checking and the bucket maths once, at start-up, and returns plain
records; `TrainDataset` turns a record into a training example (cached latents, or a decoded image);
`BucketBatchSampler` groups examples of one bucket into batches; `collate_examples` stacks them.
"""

from __future__ import annotations

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

from library.buckets import crop_offsets, make_bucket_resolutions, no_upscale_bucket, resize_to_cover, select_bucket
from library.captions import process_caption, read_caption
from library.errors import UserInputError
from library.images import IMAGE_EXTENSIONS, image_size, is_image_file, load_image_rgb

logger = logging.getLogger(__name__)

Size = tuple[int, int]
ExampleKey = tuple[int, int] | tuple[int, int, int]
"""(record index, epoch) or (record index, epoch, repeat number within the epoch)."""
"""(record index, epoch): what the sampler yields and `TrainDataset.__getitem__` takes."""

_SUBSET_NAME = re.compile(r"^(\d+)_(.*)$")


@dataclass(frozen=True)
class DatasetConfig:
    """How the training images are found, bucketed and turned into examples (sd-scripts' flag names)."""

    train_data_dir: Path
    """Folder holding one subfolder per image set, named `N_name` (N repeats, `name` = class tokens)."""
    caption_extension: str = ".caption"
    """Suffix of the caption file beside each image, dot included (sd-scripts' default is ".caption")."""
    resolution: Size = (512, 512)
    """(w, h) training resolution: the image size without buckets, the target area with them."""
    enable_bucket: bool = False
    """Sort images into aspect-ratio buckets of about the area of `resolution` instead of one square crop."""
    min_bucket_reso: int = 256
    """Shortest bucket side in pixels."""
    max_bucket_reso: int = 1024
    """Longest bucket side in pixels."""
    bucket_reso_steps: int = 64
    """Bucket sides are multiples of this (a multiple of 8, the VAE's stride)."""
    bucket_no_upscale: bool = False
    """Never enlarge an image: small images get a bucket of their own size (floored to the step)."""
    shuffle_caption: bool = False
    """Shuffle the comma-separated tags of each caption every time it is used."""
    keep_tokens: int = 0
    """With `shuffle_caption`, the first this many tags stay in place."""
    random_crop: bool = False
    """Crop a random window instead of the centre when an image is larger than its bucket (not with cached latents)."""
    batch_size: int = 1
    """Images per batch; a batch holds one bucket only, so the last batch of a bucket can be smaller."""
    seed: int = 0
    """Seed of every random choice in the data (batch order, caption shuffles, random crops)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "train_data_dir", Path(self.train_data_dir))
        object.__setattr__(self, "resolution", (int(self.resolution[0]), int(self.resolution[1])))
        width, height = self.resolution
        if width <= 0 or height <= 0:
            raise UserInputError(f"--resolution {width},{height} must be positive, e.g. --resolution 1024")
        if self.batch_size < 1:
            raise UserInputError(f"--train_batch_size {self.batch_size} must be at least 1")
        if self.keep_tokens < 0:
            raise UserInputError(f"--keep_tokens {self.keep_tokens} must be 0 or more")
        if not self.enable_bucket:
            if width % 8 or height % 8:
                raise UserInputError(f"--resolution {width},{height} must be a multiple of 8 on each side")
            return
        if self.bucket_reso_steps <= 0 or self.bucket_reso_steps % 8:
            raise UserInputError(
                f"--bucket_reso_steps {self.bucket_reso_steps} must be a positive multiple of 8, e.g. 64"
            )
        if self.min_bucket_reso > min(width, height):
            raise UserInputError(
                f"--min_bucket_reso {self.min_bucket_reso} is larger than --resolution {width},{height}: lower it"
            )
        if self.max_bucket_reso < max(width, height):
            raise UserInputError(
                f"--max_bucket_reso {self.max_bucket_reso} is smaller than --resolution {width},{height}: raise it"
            )


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


def bucket_resolutions(cfg: DatasetConfig) -> list[Size]:
    """The predefined buckets: one per aspect ratio with `enable_bucket`, else just `resolution`."""
    if cfg.enable_bucket:
        return make_bucket_resolutions(cfg.resolution, cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps)
    return [cfg.resolution]


def place_image(original_size: Size, cfg: DatasetConfig, buckets: Sequence[Size]) -> tuple[Size, Size, Size]:
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
                folder, folder.name,
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


def scan_train_data_dir(cfg: DatasetConfig) -> list[ImageRecord]:
    """Every training image under `cfg.train_data_dir`, checked, captioned and bucketed, sorted by folder and name.

    Folders without the `N_` prefix are skipped with a warning. Raises UserInputError (one line naming the
    path) for a missing folder, a tree without usable images, or an unreadable image.
    """
    root = cfg.train_data_dir
    if not root.exists():
        raise UserInputError(f"train_data_dir {root} does not exist: check --train_data_dir")
    if not root.is_dir():
        raise UserInputError(f"train_data_dir {root} is not a folder: point --train_data_dir at a folder")
    folders, skipped = _subset_folders(root)
    buckets = bucket_resolutions(cfg)
    records: list[ImageRecord] = []
    for folder, repeats, class_tokens in folders:
        # Hidden files (macOS "._x.png" forks) are skipped, as sd-scripts' glob does.
        images = sorted(
            (p for p in folder.iterdir() if is_image_file(p) and not p.name.startswith(".")), key=lambda p: p.name
        )
        if not images:
            logger.warning("folder %s holds no images (%s); skipping it", folder, " ".join(sorted(IMAGE_EXTENSIONS)))
            continue
        _check_unique_stems(folder, images)
        for path in images:
            records.append(_make_record(path, folder.name, repeats, class_tokens, cfg, buckets))
    if not records:
        hint = f" (skipped folders: {', '.join(skipped)})" if skipped else ""
        raise UserInputError(
            f"no images found in {root}: put images in subfolders named N_name, e.g. 10_mychar{hint}"
        )
    return records


def _make_record(
    path: Path, subset: str, repeats: int, class_tokens: str, cfg: DatasetConfig, buckets: Sequence[Size]
) -> ImageRecord:
    """Check one image and decide its caption, bucket and crop."""
    size = image_size(path)
    try:
        bucket, resized, crop = place_image(size, cfg, buckets)
    except ValueError:
        raise UserInputError(
            f"image {path} is {size[0]}x{size[1]}, smaller than --bucket_reso_steps {cfg.bucket_reso_steps}"
            " with --bucket_no_upscale: enlarge or remove it"
        ) from None
    caption = read_caption(path, cfg.caption_extension, class_tokens)
    return ImageRecord(path, subset, class_tokens, repeats, caption, size, bucket, resized, crop)


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


class TrainDataset(torch.utils.data.Dataset):
    """Training examples from image records; holds the latents once `cache_latents` has computed them.

    Indexed by `(record index, epoch)`: the epoch seeds the caption shuffle and random crop, so every
    example is reproducible without any global random state.
    """

    def __init__(self, records: Sequence[ImageRecord], config: DatasetConfig) -> None:
        self.records: tuple[ImageRecord, ...] = tuple(records)
        self.config = config
        self._latents: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.records)

    # -- latents -----------------------------------------------------------------------------------------

    def set_latents(self, index: int, latents: torch.Tensor) -> None:
        """Keep the (4, h/8, w/8) float32 latents of record `index`; its image is never decoded again."""
        self._latents[index] = latents

    def has_latents(self, index: int) -> bool:
        """Whether record `index` has cached latents."""
        return index in self._latents

    @property
    def all_latents_cached(self) -> bool:
        """Whether every record has cached latents (the VAE is then no longer needed)."""
        return len(self._latents) == len(self.records)

    # -- examples ----------------------------------------------------------------------------------------

    def load_image_tensor(self, index: int, crop_left_top: Size | None = None) -> torch.Tensor:
        """Record `index` decoded, resized and cropped to its bucket: (3, H, W) in [-1, 1].

        The crop defaults to the record's own (centre) crop.
        """
        record = self.records[index]
        crop = record.crop_left_top if crop_left_top is None else crop_left_top
        image = resize_and_crop(load_image_rgb(record.path), record.resized_size, record.bucket, crop)
        return image_to_tensor(image)

    def __getitem__(self, key: ExampleKey | int) -> dict:
        index, epoch, repeat = (key, 0, 0) if isinstance(key, int) else (*key, 0)[:3]
        record = self.records[index]
        cfg = self.config
        example: dict = {}
        crop = record.crop_left_top
        if index in self._latents:
            example["latents"] = self._latents[index]
        else:
            if cfg.random_crop:
                crop_rng = seeded_rng(cfg.seed, epoch, index, "crop")
                crop = crop_offsets(record.resized_size, record.bucket, True, crop_rng)
            example["image"] = self.load_image_tensor(index, crop)
        rng = seeded_rng(cfg.seed, epoch, index, repeat)
        example["caption"] = process_caption(
            record.caption, shuffle=cfg.shuffle_caption, keep_tokens=cfg.keep_tokens, rng=rng
        )
        example["original_size_hw"] = (record.original_size[1], record.original_size[0])
        example["crop_top_left"] = (crop[1], crop[0])
        example["target_size_hw"] = (record.bucket[1], record.bucket[0])
        example["loss_weight"] = 1.0
        return example

    # -- metadata ----------------------------------------------------------------------------------------

    @property
    def num_train_images(self) -> int:
        """Images per epoch, repeats counted (sd-scripts' `ss_num_train_images`)."""
        return sum(record.num_repeats for record in self.records)

    def bucket_counts(self) -> dict[Size, int]:
        """Images per bucket (w, h), repeats counted, in bucket order."""
        counts: Counter[Size] = Counter()
        for record in self.records:
            counts[record.bucket] += record.num_repeats
        return dict(sorted(counts.items()))

    def mean_ar_error(self) -> float:
        """Mean |bucket aspect - image aspect| over the images, repeats not counted (sd-scripts' number)."""
        errors = [
            abs(r.bucket[0] / r.bucket[1] - r.original_size[0] / r.original_size[1]) for r in self.records
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

    def dataset_dirs_info(self) -> dict[str, dict[str, int]]:
        """Per folder, its repeat count and number of images (sd-scripts' `ss_dataset_dirs`)."""
        info: dict[str, dict[str, int]] = {}
        for record in self.records:
            entry = info.setdefault(record.subset, {"n_repeats": record.num_repeats, "img_count": 0})
            entry["img_count"] += 1
        return info

    def bucket_report(self) -> str:
        """A short table of the buckets for the start-up log."""
        counts = self.bucket_counts()
        lines = ["bucket (WxH)  images with repeats"]
        lines += [f"{f'{w}x{h}':<13} {count}" for (w, h), count in counts.items()]
        lines.append(
            f"{len(self.records)} images in {len(counts)} buckets, {self.num_train_images} with repeats;"
            f" mean aspect-ratio error {self.mean_ar_error():.3f}"
        )
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Batching


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of `(index, epoch)` keys, each from one bucket; every image `num_repeats` times per epoch.

    Per epoch (seeded by `seed` and the epoch): images are shuffled within their bucket, cut into batches of
    `batch_size` (the last one of a bucket may be smaller), and the batches shuffled. With several replicas
    the batch list is padded by wrapping around to a multiple of `num_replicas`, and rank r takes batches
    r, r + num_replicas, ... so every rank runs the same number of steps.
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
        self._members: dict[Size, list[int]] = {}
        for index, record in enumerate(items):
            self._members.setdefault(record.bucket, []).extend([index] * record.num_repeats)
        self._members = dict(sorted(self._members.items()))

    def set_epoch(self, epoch: int) -> None:
        """Use `epoch` for the next iteration (its shuffles and the keys' epoch)."""
        self.epoch = epoch

    def _total_batches(self) -> int:
        return sum(math.ceil(len(members) / self.batch_size) for members in self._members.values())

    def epoch_batches(self) -> list[list[int]]:
        """All batches of the current epoch, as record indices, before the split across replicas."""
        rng = seeded_rng(self.seed, self.epoch, "batches")
        batches: list[list[int]] = []
        for members in self._members.values():
            members = list(members)
            if self.shuffle:
                rng.shuffle(members)
            batches += [members[start : start + self.batch_size] for start in range(0, len(members), self.batch_size)]
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
        yield from keyed[self.rank :: self.num_replicas]

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
