"""Captions: read one from the file beside an image, and shuffle its tags the way sd-scripts does."""

from __future__ import annotations

import random
from pathlib import Path

from library.errors import UserInputError


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


def process_caption(
    caption: str, *, shuffle: bool, keep_tokens: int, rng: random.Random, separator: str = ","
) -> str:
    """The caption as the model sees it for one step.

    With `shuffle`, the tags (see `split_tags`) after the first `keep_tokens` are shuffled with `rng`, the
    first `keep_tokens` stay in place, and all are joined with ", ". Without it the caption is unchanged.
    """
    if not shuffle:
        return caption
    tags = split_tags(caption, separator)
    fixed, rest = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(rest)
    return ", ".join(fixed + rest)
