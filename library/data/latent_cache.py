"""Latent caching: encode every image once, keep the latents in memory and, optionally, in sd-scripts' npz files.

The npz files sit beside the images under sd-scripts' name (`<stem>_<W>x<H>_sdxl.npz`) with its keys, so a
cache made by either trainer is used by the other. Unlike sd-scripts we check that a cache fits the bucket
the image is in now (latent shape, original size, crop) and recompute it when it does not. With several processes
each encodes a share of the missing images and writes their files, and every process gets every latent
(`library.data.process_share`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from library.data.buckets import sdscripts_crop_ltrb
from library.data.dataset import ImageRecord, TrainDataset
from library.data.process_share import ONE_PROCESS, CachePass, ProcessShare
from library.errors import UserInputError
from library.files.atomic import DAMAGED, NPZ_READ_ERRORS, npz_damage, write_npz_atomic
from library.files.stale_files import remove_stale_cache_temps

logger = logging.getLogger(__name__)

LATENT_CHANNELS = 4
LATENT_STRIDE = 8
NPZ_KEYS = ("latents", "original_size", "crop_ltrb")
"""Keys every cache file must hold (`latents` (C, H, W) float32, `original_size` [W, H], `crop_ltrb` [l, t, r, b])."""

Encoder = Callable[[torch.Tensor], torch.Tensor]
"""(B, 3, H, W) images in [-1, 1] -> (B, 4, H/8, W/8) unscaled latents."""


def npz_cache_path(image_path: Path, original_size: tuple[int, int]) -> Path:
    """`<stem>_<W:04d>x<H:04d>_sdxl.npz` beside the image: sd-scripts' SDXL latent cache name."""
    image_path = Path(image_path)
    width, height = original_size
    return image_path.with_name(f"{image_path.stem}_{width:04d}x{height:04d}_sdxl.npz")


def expected_latent_shape(bucket: tuple[int, int]) -> tuple[int, int, int]:
    """(C, H, W) of the latents of an image in `bucket` (w, h)."""
    return LATENT_CHANNELS, bucket[1] // LATENT_STRIDE, bucket[0] // LATENT_STRIDE


def crop_ltrb(record: ImageRecord) -> tuple[int, int, int, int]:
    """The real crop window of a record in its resized image: (left, top, right, bottom)."""
    left, top = record.crop_left_top
    return left, top, left + record.bucket[0], top + record.bucket[1]


def _crop_matches(stored: np.ndarray, record: ImageRecord) -> bool:
    """Whether a stored `crop_ltrb` describes this record's crop: ours, or sd-scripts' letterbox value.

    sd-scripts always caches centre crops and stores a letterbox offset instead of the crop, so its value
    identifies the same pixels as our centre crop.
    """
    stored = np.asarray(stored, dtype=np.float64).reshape(-1)
    if stored.shape != (4,):
        return False
    if np.allclose(stored, crop_ltrb(record), atol=1e-3):
        return True
    return np.allclose(stored, sdscripts_crop_ltrb(record.bucket, record.original_size), atol=1e-3)


CachedLatents = tuple[torch.Tensor, torch.Tensor | None]
"""(latents, latents of the mirrored image or None)."""


VAE_KEY = "vae_fingerprint"
"""Our extra npz key: which VAE made the latents. sd-scripts ignores it; files without it are trusted."""


def load_cached_latents(
    npz_path: Path, record: ImageRecord, *, need_flipped: bool = False, vae_fingerprint: str | None = None
) -> tuple[CachedLatents | None, str]:
    """((latents, flipped latents or None), "") from a cache file that fits `record`, else (None, why not).

    With `need_flipped` (a `flip_aug` subset) the file must also hold `latents_flipped` of the same shape. A file
    that records another VAE than `vae_fingerprint` does not fit (one made by sd-scripts records none).
    """
    if not npz_path.exists():
        return None, "no cache file"
    if npz_path.is_dir():
        return None, "a folder is in its place"  # writing it fails with one line
    flipped = None
    try:
        with np.load(npz_path) as npz:
            missing = [key for key in NPZ_KEYS if key not in npz.files]
            if need_flipped and "latents_flipped" not in npz.files:
                missing.append("latents_flipped (needed by flip_aug)")
            if missing:
                return None, f"it lacks {', '.join(missing)}"
            latents = npz["latents"]
            original_size = npz["original_size"].reshape(-1).tolist()
            stored_crop = npz["crop_ltrb"]
            if need_flipped:
                flipped = npz["latents_flipped"]
            stored_vae = str(npz[VAE_KEY]) if VAE_KEY in npz.files else None
    except NPZ_READ_ERRORS as error:
        return None, npz_damage(error)
    if vae_fingerprint is not None and stored_vae is not None and stored_vae != vae_fingerprint:
        return None, f"it was made by another VAE ({stored_vae}, this one is {vae_fingerprint})"
    expected = expected_latent_shape(record.bucket)
    if tuple(latents.shape) != expected:
        return None, f"its latents are {tuple(latents.shape)}, the bucket {record.bucket} needs {expected}"
    if flipped is not None and tuple(flipped.shape) != expected:
        return None, f"its latents_flipped are {tuple(flipped.shape)}, the bucket {record.bucket} needs {expected}"
    if [int(v) for v in original_size] != list(record.original_size):
        return None, f"it was made from an image of {original_size}, this one is {list(record.original_size)}"
    if not _crop_matches(stored_crop, record):
        return None, f"its crop {np.asarray(stored_crop).tolist()} differs from {list(crop_ltrb(record))}"

    def tensor(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))

    return (tensor(latents), None if flipped is None else tensor(flipped)), ""


def save_cached_latents(
    npz_path: Path,
    latents: torch.Tensor,
    record: ImageRecord,
    flipped: torch.Tensor | None = None,
    vae_fingerprint: str | None = None,
) -> None:
    """Write a cache file atomically (temporary file, then rename) with sd-scripts' keys
    (`latents_flipped` too when `flipped` is given)."""
    arrays = {
        "latents": latents.detach().to("cpu", torch.float32).numpy(),
        "original_size": np.array(record.original_size),
        "crop_ltrb": np.array(crop_ltrb(record)),
    }
    if flipped is not None:
        arrays["latents_flipped"] = flipped.detach().to("cpu", torch.float32).numpy()
    if vae_fingerprint is not None:
        arrays[VAE_KEY] = np.array(vae_fingerprint)
    write_npz_atomic(npz_path, arrays, what="latent cache", flag="--cache_latents_to_disk")


def _encode_checked(encode: Encoder, images: torch.Tensor, bucket: tuple[int, int]) -> torch.Tensor:
    with torch.no_grad():
        latents = encode(images)
    expected = (images.shape[0], *expected_latent_shape(bucket))
    if tuple(latents.shape) != expected:
        raise RuntimeError(f"encode returned latents of shape {tuple(latents.shape)}, expected {expected}")
    return latents.detach().to("cpu", torch.float32)


def _encode_batch(
    encode: Encoder, dataset: TrainDataset, indices: list[int], with_flipped: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Latents of the records `indices` (one bucket), and of their mirror images with `with_flipped`."""
    images = torch.stack([dataset.load_image_tensor(index) for index in indices])
    bucket = dataset.records[indices[0]].bucket
    latents = _encode_checked(encode, images, bucket)
    flipped = _encode_checked(encode, torch.flip(images, dims=[3]), bucket) if with_flipped else None
    return latents, flipped


def _check_cache_files(dataset: TrainDataset, indices: list[int], vae_fingerprint: str | None) -> list[int]:
    """Give each of the records `indices` whose npz fits its latents; the others (file missing or not fitting)."""
    missing = []
    for index in indices:
        record = dataset.records[index]
        npz_path = npz_cache_path(record.path, record.original_size)
        cached, reason = load_cached_latents(
            npz_path, record, need_flipped=dataset.needs_flipped_latents(index), vae_fingerprint=vae_fingerprint
        )
        if cached is not None:
            dataset.set_latents(index, *cached)
            continue
        if reason.startswith(DAMAGED):
            logger.warning("latent cache %s: %s; recomputing it", npz_path, reason)
        elif npz_path.exists():
            logger.info("recomputing latent cache %s: %s", npz_path, reason)
        missing.append(index)
    return missing


def _latent_bytes(dataset: TrainDataset, index: int) -> int:
    """Bytes of one record's cached latents (float32, twice with the mirror image's)."""
    channels, height, width = expected_latent_shape(dataset.records[index].bucket)
    return 4 * channels * height * width * (2 if dataset.needs_flipped_latents(index) else 1)


def cache_latents(
    dataset: TrainDataset,
    encode: Encoder,
    *,
    to_disk: bool,
    batch_size: int = 1,
    show_progress: bool = True,
    vae_fingerprint: str | None = None,
    share: ProcessShare = ONE_PROCESS,
) -> CachePass:
    """Give every used record of `dataset` its latents, so training never decodes an image again.

    Records of `flip_aug` subsets also get the latents of their mirror image (npz key `latents_flipped`, as
    sd-scripts); a cache file without them is recomputed. With `to_disk`, a fitting npz beside the image is
    loaded instead of encoding, and new latents are written there. Images are encoded in batches of up to
    `batch_size` from one bucket. `encode` gets (B, 3, H, W) images in [-1, 1] and returns unscaled
    (B, 4, H/8, W/8) latents.

    With several processes (`share`) each encodes its share of the missing images and writes their files, and
    every process ends with every record's latents (`library.data.process_share`); every process must call this
    for the same datasets in the same order.
    """
    if any(dataset.options(i).random_crop for i, record in enumerate(dataset.records) if record.used):
        raise UserInputError(
            "--random_crop cannot be used with --cache_latents (a cached latent holds one fixed crop): drop one of them"
        )
    todo = [index for index, record in enumerate(dataset.records) if record.used and not dataset.has_latents(index)]
    if to_disk:  # what killed runs left beside the images
        remove_stale_cache_temps({dataset.records[index].path.parent for index in todo})
        missing = _check_cache_files(dataset, todo, vae_fingerprint)
    else:
        missing = todo
    # The same order in every process: by bucket and mirror flag (a batch holds one bucket), then index.
    work = sorted(
        share.agree(missing),
        key=lambda index: (dataset.records[index].bucket, dataset.needs_flipped_latents(index), index),
    )
    mine = share.mine(work)

    def write(index: int, latents: CachedLatents) -> None:  # as it goes: an interrupted pass keeps its files
        record = dataset.records[index]
        path = npz_cache_path(record.path, record.original_size)
        save_cached_latents(path, latents[0], record, latents[1], vae_fingerprint)

    done = _encode_share(dataset, encode, mine, batch_size, show_progress, write if to_disk else None)
    for index, latents in share.exchange(work, done, partial(_latent_bytes, dataset)).items():
        dataset.set_latents(index, *latents)
    return CachePass(len(todo), len(todo) - len(work), len(work), len(mine), len(mine) if to_disk else 0)


def _encode_share(
    dataset: TrainDataset,
    encode: Encoder,
    indices: list[int],
    batch_size: int,
    show_progress: bool,
    on_encoded: Callable[[int, CachedLatents], None] | None,
) -> dict[int, CachedLatents]:
    """The latents (and mirror latents where needed) of the records `indices`, encoded in batches from one bucket;
    `on_encoded` (writing the file) is called for each as soon as it is encoded."""
    pending: dict[tuple[tuple[int, int], bool], list[int]] = {}
    for index in indices:
        pending.setdefault((dataset.records[index].bucket, dataset.needs_flipped_latents(index)), []).append(index)
    done: dict[int, CachedLatents] = {}
    with tqdm(total=len(indices), desc="caching latents", unit="img", disable=not show_progress or not indices) as bar:
        for bucket, with_flipped in sorted(pending):
            group = pending[(bucket, with_flipped)]
            step = max(1, batch_size)
            for start in range(0, len(group), step):
                chunk = group[start : start + step]
                latents, flipped = _encode_batch(encode, dataset, chunk, with_flipped)
                for i, index in enumerate(chunk):
                    done[index] = (latents[i].clone(), flipped[i].clone() if flipped is not None else None)
                    if on_encoded is not None:
                        on_encoded(index, done[index])
                bar.update(len(chunk))
    return done
