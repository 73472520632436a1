"""The dataset layout: sd-scripts' `--dataset_config` TOML (`[general]`, `[[datasets]]`, `[[datasets.subsets]]`)
and the `N_name` folder trees of `--train_data_dir` / `--reg_data_dir`, as typed frozen dataclasses.

A value is looked up subset > dataset > general > command line, as in sd-scripts. Unknown keys are errors
that name the key, the file and the nearest valid key (sd-scripts ignores them silently). Keys of sd-scripts
options we do not implement are accepted (with one note) while off and refused by name when on, as in
`--config_file`.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from library.data.captions import CaptionOptions
from library.errors import UserInputError
from library.files.toml_io import TomlFileError, read_toml
from library.sdscripts_options import UNIMPLEMENTED_DATASET_KEYS, is_off, refusal

Size = tuple[int, int]


@dataclass(frozen=True)
class SubsetConfig:
    """One folder of images and how its examples are made (sd-scripts' DreamBooth subset)."""

    image_dir: Path
    """The folder holding the images (not searched recursively)."""
    num_repeats: int = 1
    """How many times each image is used per epoch."""
    class_tokens: str = ""
    """The caption of an image without a caption file."""
    caption_extension: str = ".caption"
    """Suffix of the caption file beside each image, dot included."""
    is_reg: bool = False
    """Regularisation images: loss weighted by `--prior_loss_weight`, balanced to the training images' count."""
    flip_aug: bool = False
    """Mirror each example horizontally with probability 1/2 (cached latents: both are cached)."""
    random_crop: bool = False
    """A random window instead of the centre when an image is larger than its bucket (not with cached latents)."""
    caption: CaptionOptions = field(default_factory=CaptionOptions)
    """Prefix/suffix, dropout, shuffle and kept tags of this subset's captions."""
    name: str = ""
    """Key of this subset in the metadata (`ss_dataset_dirs`): the folder's name unless given."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_dir", Path(self.image_dir))
        if not self.name:
            object.__setattr__(self, "name", self.image_dir.name)
        if self.num_repeats < 1:
            raise UserInputError(f"num_repeats {self.num_repeats} of {self.image_dir} must be at least 1")


@dataclass(frozen=True)
class BucketConfig:
    """How one dataset's images are sized (sd-scripts' dataset keys of the same names). Sizes are (w, h)."""

    resolution: Size = (512, 512)
    """The image size without buckets, the target area with them."""
    enable_bucket: bool = False
    """Aspect-ratio buckets of about the area of `resolution` instead of one size."""
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    """Bucket sides are multiples of this (a multiple of 8, the VAE's stride)."""
    bucket_no_upscale: bool = False
    """Never enlarge an image: small images get a bucket of their own size (floored to the step)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "resolution", (int(self.resolution[0]), int(self.resolution[1])))
        width, height = self.resolution
        if width <= 0 or height <= 0:
            raise UserInputError(f"--resolution {width},{height} must be positive, e.g. --resolution 1024")
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
class DatasetSectionConfig:
    """One `[[datasets]]` block: its buckets, its batch size and its subsets."""

    buckets: BucketConfig
    batch_size: int
    """Images per batch; a batch holds images of one dataset and one bucket."""
    subsets: tuple[SubsetConfig, ...]

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UserInputError(f"batch_size {self.batch_size} must be at least 1")


@dataclass(frozen=True)
class DatasetGroupConfig:
    """Everything `--dataset_config` describes (or the folder flags do)."""

    datasets: tuple[DatasetSectionConfig, ...]
    source: Path | None = None
    """The TOML file it came from (None: built from --train_data_dir / --reg_data_dir)."""


# DatasetConfig is defined after the schema below (it needs CLI_FALLBACK_KEYS).


# ----------------------------------------------------------------------------------------------------------
# The TOML schema: key -> (type, where it may appear).

_SUBSET_ONLY = {"image_dir": str, "is_reg": bool}
_SUBSET_ASCENDABLE = {
    "num_repeats": int,
    "class_tokens": str,
    "caption_extension": str,
    "keep_tokens": int,
    "keep_tokens_separator": str,
    "caption_separator": str,
    "shuffle_caption": bool,
    "flip_aug": bool,
    "random_crop": bool,
    "caption_prefix": str,
    "caption_suffix": str,
    "caption_dropout_rate": float,
    "caption_dropout_every_n_epochs": int,
    "caption_tag_dropout_rate": float,
}
_DATASET_ONLY = {
    "resolution": (int, list),
    "enable_bucket": bool,
    "min_bucket_reso": int,
    "max_bucket_reso": int,
    "bucket_reso_steps": int,
    "bucket_no_upscale": bool,
    "batch_size": int,
}
_CAPTION_KEYS = tuple(f.name for f in fields(CaptionOptions))

CLI_FALLBACK_KEYS = tuple(_SUBSET_ASCENDABLE) + tuple(_DATASET_ONLY)
"""Keys whose command-line value is the last fallback (`--train_batch_size` is `batch_size`)."""


def _fail(path: Path, where: str, message: str) -> UserInputError:
    return UserInputError(f"--dataset_config {path}: {where}: {message}")


def _check_keys(
    table: Mapping,
    allowed: Mapping[str, object],
    path: Path,
    where: str,
    hint: str = "",
    ignored: set[str] | None = None,
) -> None:
    """Refuse unknown keys. Where sd-scripts' own keys may appear (`ignored` given), those we lack are refused
    when on, else added to `ignored`."""
    for key in table:
        if key in allowed:
            continue
        if key in UNIMPLEMENTED_DATASET_KEYS and ignored is not None:
            if not is_off(UNIMPLEMENTED_DATASET_KEYS, key, table):
                raise _fail(path, where, refusal(UNIMPLEMENTED_DATASET_KEYS, key, table[key]))
            ignored.add(key)
            continue
        if key in _DATASET_ONLY or key in _SUBSET_ONLY or key in _SUBSET_ASCENDABLE:
            raise _fail(path, where, f"'{key}' is not allowed here{hint}")
        near = difflib.get_close_matches(key, list(allowed), n=1)
        suggestion = f"; did you mean '{near[0]}'?" if near else ""
        raise _fail(path, where, f"unknown key '{key}'{suggestion}")


def _check_type(key: str, value: object, expected, path: Path, where: str) -> object:
    types = expected if isinstance(expected, tuple) else (expected,)
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) and bool not in types:
        raise _fail(path, where, f"'{key}' must be {' or '.join(t.__name__ for t in types)}, not {value!r}")
    if not isinstance(value, types):
        raise _fail(path, where, f"'{key}' must be {' or '.join(t.__name__ for t in types)}, not {value!r}")
    return value


def _resolution(value: object, path: Path, where: str) -> Size:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    raise _fail(path, where, f"'resolution' must be one number or [width, height], not {value!r}")


def _typed(table: Mapping, schema: Mapping[str, object], path: Path, where: str) -> dict:
    return {key: _check_type(key, value, schema[key], path, where) for key, value in table.items() if key in schema}


def load_dataset_config(path: Path, cli: Mapping[str, object]) -> DatasetGroupConfig:
    """Read and validate `--dataset_config`. `cli` holds the command-line value of every `CLI_FALLBACK_KEYS`
    key (the last fallback). Raises UserInputError naming the file for any problem."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"--dataset_config: file not found: {path}")
    try:
        document = read_toml(path)
    except TomlFileError as error:
        raise UserInputError(f"--dataset_config {path} {error}") from None
    ignored: set[str] = set()
    _check_keys(document, {"general": dict, "datasets": list}, path, "top level")
    general = document.get("general", {})
    if not isinstance(general, dict):
        raise _fail(path, "top level", "'general' must be a table: [general]")
    _check_keys(
        general,
        {**_SUBSET_ASCENDABLE, **_DATASET_ONLY},
        path,
        "[general]",
        " (image_dir and is_reg belong in [[datasets.subsets]])",
        ignored,
    )
    general = _typed(general, {**_SUBSET_ASCENDABLE, **_DATASET_ONLY}, path, "[general]")
    datasets = document.get("datasets", [])
    if not isinstance(datasets, list) or not datasets:
        raise _fail(path, "top level", "no [[datasets]] block: add one with at least one [[datasets.subsets]]")
    sections = []
    for d_index, dataset in enumerate(datasets):
        where = f"[[datasets]] #{d_index + 1}"
        if not isinstance(dataset, dict):
            raise _fail(path, where, f"must be a table ([[datasets]]), not {dataset!r}")
        _check_keys(
            dataset,
            {**_SUBSET_ASCENDABLE, **_DATASET_ONLY, "subsets": list},
            path,
            where,
            " (image_dir and is_reg belong in [[datasets.subsets]])",
            ignored,
        )
        subsets = dataset.get("subsets", [])
        if not isinstance(subsets, list) or not subsets:
            raise _fail(path, where, "no [[datasets.subsets]] block: add one with image_dir")
        dataset_values = _typed(dataset, {**_SUBSET_ASCENDABLE, **_DATASET_ONLY}, path, where)
        chain = [dataset_values, general, dict(cli)]
        sections.append(_section(chain, subsets, path, where, ignored))
    if ignored:
        logging.getLogger(__name__).warning(
            "note: --dataset_config %s: ignoring sd-scripts keys this trainer does not implement, all off or "
            "without effect here: %s",
            path,
            ", ".join(sorted(ignored)),
        )
    return DatasetGroupConfig(tuple(sections), path)


def _lookup(key: str, chain: list[Mapping], default: object = None) -> object:
    for layer in chain:
        if key in layer and layer[key] is not None:
            return layer[key]
    return default


def _section(chain: list[Mapping], subsets: list, path: Path, where: str, ignored: set[str]) -> DatasetSectionConfig:
    try:
        buckets = BucketConfig(
            resolution=_resolution(_lookup("resolution", chain, 512), path, where),
            enable_bucket=bool(_lookup("enable_bucket", chain, False)),
            min_bucket_reso=int(_lookup("min_bucket_reso", chain, 256)),
            max_bucket_reso=int(_lookup("max_bucket_reso", chain, 1024)),
            bucket_reso_steps=int(_lookup("bucket_reso_steps", chain, 64)),
            bucket_no_upscale=bool(_lookup("bucket_no_upscale", chain, False)),
        )
        configs = []
        for s_index, subset in enumerate(subsets):
            s_where = f"{where}, [[datasets.subsets]] #{s_index + 1}"
            if not isinstance(subset, dict):
                raise _fail(path, s_where, "must be a table")
            _check_keys(
                subset,
                {**_SUBSET_ONLY, **_SUBSET_ASCENDABLE},
                path,
                s_where,
                " (dataset keys such as resolution and batch_size belong in [[datasets]] or [general])",
                ignored,
            )
            values = _typed(subset, {**_SUBSET_ONLY, **_SUBSET_ASCENDABLE}, path, s_where)
            if "image_dir" not in values:
                raise _fail(path, s_where, "'image_dir' is required")
            configs.append(subset_from_values(values, chain))
        return DatasetSectionConfig(buckets, int(_lookup("batch_size", chain, 1)), tuple(configs))
    except UserInputError as error:
        if str(error).startswith("--dataset_config"):
            raise
        raise _fail(path, where, str(error)) from None


def subset_from_values(values: Mapping[str, object], chain: list[Mapping]) -> SubsetConfig:
    """A SubsetConfig from the subset's own `values`, falling back through `chain` (dataset, general, cli)."""
    full = [values, *chain]
    caption = CaptionOptions(**{key: _lookup(key, full, getattr(CaptionOptions, key)) for key in _CAPTION_KEYS})
    return SubsetConfig(
        image_dir=Path(str(values["image_dir"])),
        num_repeats=int(_lookup("num_repeats", full, 1)),
        class_tokens=str(_lookup("class_tokens", full, "")),
        caption_extension=str(_lookup("caption_extension", full, ".caption")),
        is_reg=bool(values.get("is_reg", False)),
        flip_aug=bool(_lookup("flip_aug", full, False)),
        random_crop=bool(_lookup("random_crop", full, False)),
        caption=caption,
    )


@dataclass(frozen=True)
class DatasetConfig:
    """How the training images are found, bucketed and turned into examples (sd-scripts' flag names).

    With `dataset_config` (the parsed `--dataset_config` TOML) the folders and per-dataset values come from it
    and these flags are only its last fallback; otherwise `train_data_dir` (and `reg_data_dir`) are scanned.
    """

    train_data_dir: Path | None = None
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
    """Seed of every random choice in the data (batch order, caption shuffles, random crops, flips)."""
    keep_tokens_separator: str = ""
    """Marks fixed | shuffled | fixed-suffix parts inside captions (e.g. "|||")."""
    caption_separator: str = ","
    """What separates tags in captions."""
    caption_prefix: str = ""
    """Put before every caption (with a space)."""
    caption_suffix: str = ""
    """Put after every caption (with a space)."""
    caption_dropout_rate: float = 0.0
    """Probability that a whole caption becomes ""."""
    caption_dropout_every_n_epochs: int = 0
    """Every caption is "" in epochs that are multiples of this (0: never)."""
    caption_tag_dropout_rate: float = 0.0
    """Probability that each non-fixed tag is left out."""
    flip_aug: bool = False
    """Mirror examples horizontally with probability 1/2."""
    reg_data_dir: Path | None = None
    """Folder of `N_name` subfolders of regularisation images."""
    prior_loss_weight: float = 1.0
    """Loss weight of regularisation examples."""
    skip_bad_images: bool = False
    """Skip an unreadable image with one warning instead of stopping."""
    dataset_config: DatasetGroupConfig | None = None
    """The parsed `--dataset_config` file; None: scan `train_data_dir` / `reg_data_dir`."""

    def __post_init__(self) -> None:
        for name in ("train_data_dir", "reg_data_dir"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        object.__setattr__(self, "resolution", (int(self.resolution[0]), int(self.resolution[1])))
        if self.batch_size < 1:
            raise UserInputError(f"--train_batch_size {self.batch_size} must be at least 1")
        if self.prior_loss_weight < 0:
            raise UserInputError(f"--prior_loss_weight {self.prior_loss_weight} must be 0 or more")
        _ = self.caption_options  # building them validates the caption flags
        if self.dataset_config is None:
            _ = self.buckets  # and the bucket flags

    @property
    def buckets(self) -> BucketConfig:
        """The bucket flags as one dataset's BucketConfig."""
        return BucketConfig(
            self.resolution,
            self.enable_bucket,
            self.min_bucket_reso,
            self.max_bucket_reso,
            self.bucket_reso_steps,
            self.bucket_no_upscale,
        )

    @property
    def caption_options(self) -> CaptionOptions:
        """The caption flags as one subset's CaptionOptions."""
        return CaptionOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(CaptionOptions)})

    def cli_values(self) -> dict[str, object]:
        """The command-line value of every `--dataset_config` key: the last fallback of the TOML."""
        values = {key: getattr(self, key) for key in CLI_FALLBACK_KEYS if hasattr(self, key)}
        values["resolution"] = list(self.resolution)
        return values
