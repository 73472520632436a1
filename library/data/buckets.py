"""Aspect-ratio buckets: which resolutions exist, which one an image goes to, how it is scaled and cropped.

Pure integer maths, the same numbers as sd-scripts' `make_bucket_resolutions` and `BucketManager`, so a
dataset lands in the same buckets (and reuses the same latent caches) in both trainers. Sizes are (w, h).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

Size = tuple[int, int]


def make_bucket_resolutions(
    max_reso: Size, min_size: int = 256, max_size: int = 1024, divisible: int = 64
) -> list[Size]:
    """All bucket resolutions (w, h) of about the area of `max_reso`, sorted, as sd-scripts builds them.

    The square side floor(sqrt(area)) rounded down to `divisible`, then for each width from `min_size` to
    `max_size` in steps of `divisible` the largest height (a multiple of `divisible`, at most `max_size`) that
    keeps w*h within the area, with its transpose; pairs whose height falls below `min_size` are left out.
    """
    max_area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(max_area) // divisible) * divisible
    resolutions = {(side, side)}
    for width in range(min_size, max_size + 1, divisible):
        height = min(max_size, max_area // width // divisible * divisible)
        if height >= min_size:
            resolutions.add((width, height))
            resolutions.add((height, width))
    return sorted(resolutions)


def select_bucket(image_size: Size, buckets: Sequence[Size]) -> Size:
    """The bucket for an image of `image_size`: itself when it is a bucket, else the nearest aspect ratio.

    Ties go to the first bucket in `buckets` order (sd-scripts' `argmin` over its sorted list).
    """
    if not buckets:
        raise ValueError("select_bucket needs at least one bucket")
    if tuple(image_size) in set(buckets):
        return tuple(image_size)
    aspect = image_size[0] / image_size[1]
    errors = [abs(w / h - aspect) for w, h in buckets]
    return tuple(buckets[errors.index(min(errors))])


def resize_to_cover(image_size: Size, bucket: Size) -> Size:
    """The size to scale an image to so that it covers `bucket` (one side equal, the other at least as long).

    A relatively wider image is matched on height, else on width; sides round half up like sd-scripts.
    """
    width, height = image_size
    if width / height > bucket[0] / bucket[1]:
        scale = bucket[1] / height
    else:
        scale = bucket[0] / width
    resized = (int(width * scale + 0.5), int(height * scale + 0.5))
    return max(resized[0], bucket[0]), max(resized[1], bucket[1])


def _round_to_steps(x: float, divisible: int) -> int:
    """`x` rounded to an integer, then down to a multiple of `divisible`."""
    rounded = int(x + 0.5)
    return rounded - rounded % divisible


def no_upscale_bucket(image_size: Size, max_area: int, divisible: int) -> tuple[Size, Size]:
    """(bucket, resized_size) for `--bucket_no_upscale`: never enlarge, shrink only to fit `max_area`.

    An image above `max_area` is scaled down keeping its aspect ratio, one side snapped to `divisible`
    (whichever keeps the aspect closer); the bucket is the resized size floored to `divisible` on each side,
    so the image is cropped, never padded. Raises ValueError when a side would floor to 0.
    """
    width, height = image_size
    aspect = width / height
    if width * height > max_area:
        resized_width = math.sqrt(max_area * aspect)
        resized_height = max_area / resized_width
        width_rounded = _round_to_steps(resized_width, divisible)
        height_for_width = _round_to_steps(width_rounded / aspect, divisible)
        height_rounded = _round_to_steps(resized_height, divisible)
        width_for_height = _round_to_steps(height_rounded * aspect, divisible)
        error_by_width = abs(width_rounded / max(height_for_width, 1) - aspect)
        error_by_height = abs(width_for_height / max(height_rounded, 1) - aspect)
        if error_by_width < error_by_height:
            resized = (width_rounded, int(width_rounded / aspect + 0.5))
        else:
            resized = (int(height_rounded * aspect + 0.5), height_rounded)
    else:
        resized = (width, height)
    bucket = (resized[0] - resized[0] % divisible, resized[1] - resized[1] % divisible)
    if bucket[0] <= 0 or bucket[1] <= 0:
        raise ValueError(f"image of {width}x{height} is smaller than one bucket step of {divisible}")
    return bucket, resized


def crop_offsets(resized_size: Size, bucket: Size, random_crop: bool, rng: random.Random | None = None) -> Size:
    """(left, top) of the `bucket`-sized window cut from an image of `resized_size`.

    Centred (rounding down) by default; with `random_crop`, drawn uniformly from `rng`, width first.
    """
    spare_w = resized_size[0] - bucket[0]
    spare_h = resized_size[1] - bucket[1]
    if spare_w < 0 or spare_h < 0:
        raise ValueError(f"resized size {resized_size} does not cover bucket {bucket}")
    if random_crop:
        if rng is None:
            raise ValueError("random_crop needs an rng")
        return rng.randint(0, spare_w), rng.randint(0, spare_h)
    return spare_w // 2, spare_h // 2


def sdscripts_crop_ltrb(bucket: Size, original_size: Size) -> tuple[float, float, float, float]:
    """The `crop_ltrb` sd-scripts stores in its latent caches: a letterbox offset, not the real crop.

    It fits (not covers) the original aspect into the bucket and centres it; we only use it to recognise a
    centre-cropped cache written by sd-scripts.
    """
    bucket_aspect = bucket[0] / bucket[1]
    image_aspect = original_size[0] / original_size[1]
    if bucket_aspect > image_aspect:
        fitted_w, fitted_h = bucket[1] * image_aspect, float(bucket[1])
    else:
        fitted_w, fitted_h = float(bucket[0]), bucket[0] / image_aspect
    left = (bucket[0] - fitted_w) // 2
    top = (bucket[1] - fitted_h) // 2
    return left, top, left + fitted_w, top + fitted_h
