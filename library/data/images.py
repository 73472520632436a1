"""Image files: which ones we train on, their size from the header, and decoding them as RGB."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from library.errors import UserInputError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
"""Suffixes (lower case) of the files taken as training images; matched case-insensitively."""

_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # the EXIF orientations that rotate by 90 degrees


def is_image_file(path: Path) -> bool:
    """Whether `path` is a file with one of `IMAGE_EXTENSIONS` (any case)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _unreadable(path: Path, error: Exception) -> UserInputError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return UserInputError(f"cannot read image {path}: {reason}; fix or remove it")


def _check_complete(image: Image.Image) -> None:
    """Raise if the file behind a freshly opened `image` is truncated or corrupt, decoding as little as possible.

    PNG: `verify()` walks every chunk and checks its CRC. JPEG: a draft decode at 1/8 scale still reads the
    whole entropy-coded stream. Other formats: a full decode.
    """
    if image.format == "PNG":
        image.verify()
        return
    if image.format == "JPEG":
        image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
    image.load()


def image_size(path: Path) -> tuple[int, int]:
    """(w, h) of the image as displayed (EXIF orientation applied), after checking the file is complete.

    Raises UserInputError naming the file when it cannot be opened or is truncated/corrupt.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            _check_complete(image)
        with Image.open(path) as image:  # verify() spends the first handle; the header is cheap to read again
            width, height = image.size
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except (OSError, SyntaxError, ValueError, RuntimeError, Image.DecompressionBombError) as error:
        raise _unreadable(path, error) from None
    if orientation in _TRANSPOSING_ORIENTATIONS:
        return height, width
    return width, height


def load_image_rgb(path: Path) -> Image.Image:
    """The decoded image in RGB, EXIF orientation applied, transparency composited on white.

    Raises UserInputError naming the file when it cannot be decoded.
    """
    path = Path(path)
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
            image.load()
            return _to_rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise _unreadable(path, error) from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB pixels of any PIL image; transparent areas become white, 16/32-bit grey is scaled to 8 bits."""
    if image.mode.startswith("I;16") or image.mode == "I":
        # PIL's own conversion clips these at 255 (a 16-bit PNG turns white): scale the full range instead.
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        return Image.fromarray(np.clip(array * (255.0 / top) + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        scale = 255.0 if array.max() <= 1.0 else 1.0
        return Image.fromarray(np.clip(array * scale + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode in ("P", "L", "RGB") and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image
