"""Captions: read one from the file beside an image, and turn it into the text of one step the way sd-scripts does.

Order (sd-scripts' `process_caption`): prefix/suffix, whole-caption dropout, then - only when shuffling or tag
dropout is on - split into fixed / shuffled / fixed-suffix tags, shuffle, tag dropout, join with ", ".
Every random choice comes from the `random.Random` the caller passes (seeded per example): no global RNG.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from library.errors import UserInputError


@dataclass(frozen=True)
class CaptionOptions:
    """How a subset's captions are changed at every use (sd-scripts' subset keys of the same names)."""

    shuffle_caption: bool = False
    """Shuffle the tags after the fixed ones every time the caption is used."""
    keep_tokens: int = 0
    """The first this many tags stay in place (when `keep_tokens_separator` is not in the caption)."""
    keep_tokens_separator: str = ""
    """Marks "fixed | shuffled | fixed suffix" inside a caption (e.g. "|||"); overrides `keep_tokens` when present."""
    caption_separator: str = ","
    """What separates tags (they are joined back with ", ")."""
    caption_prefix: str = ""
    """Put before every caption, with a space."""
    caption_suffix: str = ""
    """Put after every caption, with a space."""
    caption_dropout_rate: float = 0.0
    """Probability that a whole caption becomes "" (unconditional training)."""
    caption_dropout_every_n_epochs: int = 0
    """Every caption is "" in epochs that are multiples of this (0: never)."""
    caption_tag_dropout_rate: float = 0.0
    """Probability that each non-fixed tag is left out."""

    def __post_init__(self) -> None:
        for name in ("caption_dropout_rate", "caption_tag_dropout_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise UserInputError(f"{name} {value} must be between 0 and 1")
        if self.keep_tokens < 0:
            raise UserInputError(f"keep_tokens {self.keep_tokens} must be 0 or more")
        if self.caption_dropout_every_n_epochs < 0:
            every = self.caption_dropout_every_n_epochs
            raise UserInputError(f"caption_dropout_every_n_epochs {every} must be 0 or more")
        if not self.caption_separator:
            raise UserInputError('caption_separator must not be empty (sd-scripts\' default is ",")')


def caption_path(image_path: Path, caption_extension: str) -> Path:
    """`<stem><caption_extension>` beside the image (`caption_extension` keeps its dot, e.g. ".txt")."""
    return image_path.with_name(image_path.stem + caption_extension)


def read_caption(image_path: Path, caption_extension: str, fallback: str) -> str:
    """The caption of `image_path`: the first non-empty line of its caption file, stripped.

    `fallback` (the folder's class tokens) when there is no caption file; "" when the file has no text.
    A BOM is dropped. Raises UserInputError for a file that is not UTF-8 or cannot be read.
    """
    path = caption_path(Path(image_path), caption_extension)
    if not path.is_file():
        return fallback
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserInputError(f"caption file {path} is not UTF-8: re-save it with UTF-8 encoding") from None
    except OSError as error:
        raise UserInputError(f"cannot read caption file {path}: {error.strerror or error}; fix or remove it") from None
    for line in text.splitlines():
        line = line.strip().lstrip("\ufeff").strip()
        if line:
            return line
    return ""


def split_tags(caption: str, separator: str = ",") -> list[str]:
    """The caption's tags: split on `separator`, stripped, empty ones dropped."""
    return [tag.strip() for tag in caption.split(separator) if tag.strip()]


def add_prefix_suffix(caption: str, prefix: str, suffix: str) -> str:
    """`prefix caption suffix`, each joined with one space when given (as sd-scripts)."""
    if prefix:
        caption = f"{prefix} {caption}"
    if suffix:
        caption = f"{caption} {suffix}"
    return caption


def is_caption_dropped(options: CaptionOptions, epoch: int, rng: random.Random) -> bool:
    """Whether the whole caption is dropped this time. Draws from `rng` only when `caption_dropout_rate` > 0."""
    dropped = options.caption_dropout_rate > 0 and rng.random() < options.caption_dropout_rate
    every = options.caption_dropout_every_n_epochs
    return dropped or (every > 0 and epoch % every == 0)


def split_fixed_tags(caption: str, options: CaptionOptions) -> tuple[list[str], list[str], list[str]]:
    """(fixed, flexible, fixed suffix) tags: by `keep_tokens_separator` when the caption holds it, else the
    first `keep_tokens` tags are fixed and there is no suffix."""
    separator, sep = options.keep_tokens_separator, options.caption_separator
    if separator and separator in caption:
        fixed_part, flexible_part = caption.split(separator, 1)
        suffix_part = ""
        if separator in flexible_part:
            flexible_part, suffix_part = flexible_part.split(separator, 1)
        return split_tags(fixed_part, sep), split_tags(flexible_part, sep), split_tags(suffix_part, sep)
    tags = split_tags(caption, sep)
    return tags[: options.keep_tokens], tags[options.keep_tokens :], []


def process_caption(
    caption: str,
    options: CaptionOptions | None = None,
    *,
    rng: random.Random,
    epoch: int = 0,
    shuffle: bool | None = None,
    keep_tokens: int | None = None,
    separator: str | None = None,
) -> str:
    """The caption as the model sees it for one step (see the module docstring for the order).

    `caption` is already the first line of its file (or the class tokens). Draws from `rng` in a fixed order:
    caption dropout, shuffle, tag dropout - each only when its option is on. `shuffle`, `keep_tokens` and
    `separator` are shorthands that override `options`.
    """
    options = options or CaptionOptions()
    overrides = {}
    if shuffle is not None:
        overrides["shuffle_caption"] = shuffle
    if keep_tokens is not None:
        overrides["keep_tokens"] = keep_tokens
    if separator is not None:
        overrides["caption_separator"] = separator
    if overrides:
        options = CaptionOptions(**{**options.__dict__, **overrides})

    caption = add_prefix_suffix(caption, options.caption_prefix, options.caption_suffix)
    if is_caption_dropped(options, epoch, rng):
        return ""
    if not (options.shuffle_caption or options.caption_tag_dropout_rate > 0):
        return caption
    fixed, flexible, fixed_suffix = split_fixed_tags(caption, options)
    if options.shuffle_caption:
        rng.shuffle(flexible)
    if options.caption_tag_dropout_rate > 0:
        flexible = [tag for tag in flexible if rng.random() >= options.caption_tag_dropout_rate]
    return ", ".join(fixed + flexible + fixed_suffix)
