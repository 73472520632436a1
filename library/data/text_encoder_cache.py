"""Text-encoder output caching for UNet-only training: encode each image's caption once, then train without TEs.

Every image gets `num_variants` captions: variant k is the caption the dataset produces for the synthetic
epoch `VARIANT_EPOCH_BASE + k` (so with caption shuffle or dropout on, the variants are k different draws
of the same processing the uncached run would do). At train time the example keyed (index, epoch, repeat)
uses variant `pick_variant(seed, index, epoch, repeat, num_variants)`, a fixed hash, the same in every
process, worker and run. sd-scripts refuses the cache when captions vary; with one variant we refuse too.

On disk the outputs sit beside the image as sd-scripts' SDXL text-encoder cache `<stem>_te_outputs.npz`,
keys `hidden_state1` (75n+2, 768), `hidden_state2` (75n+2, 1280), `pool2` (1280,) in float32 (variant 0, so
sd-scripts reads our files). We add `captions` (the cached caption of every variant), `model` (an
identifier of the base model), and `hidden_state1_<k>` / `hidden_state2_<k>` / `pool2_<k>` for variants
k >= 1; a file whose captions, model or shapes differ from this run's is recomputed.

With several processes each encodes a share of the distinct captions, every process gets all of them, and each
missing file is written by one process (`library.data.process_share`). This module knows captions only through
`caption_of(index, epoch) -> str`, and examples only as dicts.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from library.data.process_share import ONE_PROCESS, CachePass, ProcessShare
from library.errors import UserInputError
from library.files.atomic import DAMAGED, NPZ_READ_ERRORS, npz_damage, write_npz_atomic
from library.files.stale_files import remove_stale_cache_temps

logger = logging.getLogger(__name__)

TE_CACHE_SUFFIX = "_te_outputs.npz"
"""sd-scripts' `TEXT_ENCODER_OUTPUTS_CACHE_SUFFIX`."""
VARIANT_EPOCH_BASE = 10_000
"""Variant k's caption is the dataset's caption for epoch VARIANT_EPOCH_BASE + k (no training epoch gets there)."""

CaptionOf = Callable[[int, int], str]
"""(record index, epoch) -> the processed caption the dataset would give that example."""
CaptionEncoder = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]
"""Captions -> (context (B, L, D1 + D2), pooled (B, P)), without gradients."""


def te_cache_path(image_path: Path) -> Path:
    """`<stem>_te_outputs.npz` beside the image."""
    image_path = Path(image_path)
    return image_path.with_name(image_path.stem + TE_CACHE_SUFFIX)


def pick_variant(seed: int, index: int, epoch: int, repeat: int, num_variants: int) -> int:
    """The variant an example uses: a hash of (seed, index, epoch, repeat) mod `num_variants`."""
    if num_variants <= 1:
        return 0
    digest = hashlib.sha256(repr(("te-variant", seed, index, epoch, repeat)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_variants


def variant_captions(caption_of: CaptionOf, index: int, num_variants: int) -> list[str]:
    """The caption of each variant of record `index`."""
    return [caption_of(index, VARIANT_EPOCH_BASE + k) for k in range(num_variants)]


def check_captions_fixed(caption_of: CaptionOf, first_captions: Sequence[str]) -> None:
    """With one variant the cache must hold every caption the run would see: refuse captions that vary
    (seen as record i's caption for a second synthetic epoch differing from `first_captions[i]`)."""
    for index, first in enumerate(first_captions):
        if caption_of(index, VARIANT_EPOCH_BASE + 1) != first:
            raise UserInputError(
                "--cache_text_encoder_outputs with caption shuffle or dropout would train on one fixed caption per "
                "image: add --text_encoder_cache_variants N (e.g. 8) to cache N caption variants per image, "
                "or turn shuffling and dropout off"
            )


@dataclass(frozen=True)
class TextEncoderCache:
    """(context, pooled) for every record and variant."""

    outputs: dict[int, list[tuple[torch.Tensor, torch.Tensor]]]
    """Record index -> per variant (context (L, D), pooled (P,))."""
    num_variants: int
    seed: int
    made: CachePass | None = None
    """What the pass that made the cache did (the items it encoded are captions)."""

    def lookup(self, index: int, epoch: int, repeat: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.outputs[index][pick_variant(self.seed, index, epoch, repeat, self.num_variants)]


def _load(
    npz_path: Path, captions: list[str], model: str, length: int, te1_width: int
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]] | None, str]:
    """The variants stored in `npz_path` when they fit this run, else (None, why not)."""
    if not npz_path.exists():
        return None, "no cache file"
    if npz_path.is_dir():
        return None, "a folder is in its place"  # writing it fails with one line
    try:
        with np.load(npz_path) as npz:
            if "captions" not in npz.files or [str(c) for c in npz["captions"]] != captions:
                return None, "its captions differ"
            if "model" not in npz.files or str(npz["model"]) != model:
                return None, "it was made with another base model"
            outputs = []
            for k in range(len(captions)):
                suffix = "" if k == 0 else f"_{k}"
                h1, h2, pool = (npz[f"{key}{suffix}"] for key in ("hidden_state1", "hidden_state2", "pool2"))
                if h1.shape[0] != length or h2.shape[0] != length or h1.shape[1] != te1_width:
                    return None, f"its states are {h1.shape[0]} tokens long, this run needs {length}"
                context = torch.from_numpy(np.concatenate([h1, h2], axis=-1).astype(np.float32))
                outputs.append((context, torch.from_numpy(pool.astype(np.float32))))
    except NPZ_READ_ERRORS as error:
        return None, npz_damage(error)
    return outputs, ""


def _save(
    npz_path: Path, captions: list[str], model: str, outputs: list[tuple[torch.Tensor, torch.Tensor]], te1_width: int
) -> None:
    arrays: dict[str, np.ndarray] = {"captions": np.array(captions), "model": np.array(model)}
    for k, (context, pooled) in enumerate(outputs):
        suffix = "" if k == 0 else f"_{k}"
        context = context.detach().to("cpu", torch.float32)
        arrays[f"hidden_state1{suffix}"] = context[:, :te1_width].numpy()
        arrays[f"hidden_state2{suffix}"] = context[:, te1_width:].numpy()
        arrays[f"pool2{suffix}"] = pooled.detach().to("cpu", torch.float32).numpy()
    write_npz_atomic(npz_path, arrays, what="text-encoder cache", flag="--cache_text_encoder_outputs_to_disk")


def _load_files(
    image_paths: Sequence[Path], captions: dict[int, list[str]], model: str, length: int, te1_width: int
) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The outputs of every image whose cache file fits this run (the others are logged and left out)."""
    remove_stale_cache_temps({Path(path).parent for path in image_paths})  # what killed runs left
    outputs = {}
    for index, path in enumerate(image_paths):
        loaded, reason = _load(te_cache_path(path), captions[index], model, length, te1_width)
        if loaded is not None:
            outputs[index] = loaded
        elif reason.startswith(DAMAGED):
            logger.warning("text-encoder cache %s: %s; recomputing it", te_cache_path(path), reason)
        elif te_cache_path(path).exists():
            logger.info("recomputing text-encoder cache %s: %s", te_cache_path(path), reason)
    return outputs


def _encode_all(
    captions: Sequence[str], encode: CaptionEncoder, dtype: torch.dtype, batch_size: int, show_progress: bool
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(context, pooled) of each of `captions`, on the CPU in `dtype`."""
    encoded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    step = max(1, batch_size)
    with tqdm(
        total=len(captions),
        desc="caching text encoder outputs",
        unit="caption",
        disable=not show_progress or not captions,
    ) as progress:
        for start in range(0, len(captions), step):
            chunk = list(captions[start : start + step])
            with torch.no_grad():
                context, pooled = encode(chunk)
            for caption, c, p in zip(chunk, context, pooled):
                encoded[caption] = (c.detach().to("cpu", dtype).clone(), p.detach().to("cpu", dtype).clone())
            progress.update(len(chunk))
    return encoded


def cache_text_encoder_outputs(
    image_paths: Sequence[Path],
    caption_of: CaptionOf,
    encode: CaptionEncoder,
    *,
    num_variants: int,
    seed: int,
    length: int,
    te1_width: int,
    dtype: torch.dtype = torch.float32,
    to_disk: bool = False,
    model: str = "",
    batch_size: int = 8,
    show_progress: bool = True,
    share: ProcessShare = ONE_PROCESS,
) -> TextEncoderCache:
    """Encode every distinct caption (all variants of all records) once and return the cache (with what the pass
    did: `TextEncoderCache.made`).

    `image_paths[i]` is record i's image (for the npz beside it); `length` is the context length
    (max_token_length + 2) and `te1_width` TE1's hidden size (where a context splits into the two npz keys).
    Outputs are kept on the CPU in `dtype`. With several processes (`share`) each encodes its share of the
    distinct captions, every process gets all of them through the collective, and each missing file is written
    by one process (`library.data.process_share`).
    """
    if num_variants < 1:
        raise UserInputError(f"--text_encoder_cache_variants {num_variants} must be at least 1")
    captions = {index: variant_captions(caption_of, index, num_variants) for index in range(len(image_paths))}
    if num_variants == 1:
        check_captions_fixed(caption_of, [captions[index][0] for index in range(len(image_paths))])
    loaded = _load_files(image_paths, captions, model, length, te1_width) if to_disk else {}
    missing = share.agree(index for index in range(len(image_paths)) if index not in loaded)
    work = sorted({caption for index in missing for caption in captions[index]})
    mine = share.mine(work)
    encoded = _encode_all(mine, encode, dtype, batch_size, show_progress)
    # Only cuts the exchange into rounds, so an over-estimate will do: TE2 is at most 3 times as wide as TE1.
    item_bytes = length * 4 * te1_width * torch.finfo(dtype).bits // 8
    encoded = share.exchange(work, encoded, lambda caption: item_bytes)

    outputs = {index: [(c.to(dtype), p.to(dtype)) for c, p in loaded[index]] for index in loaded}
    for index in missing:
        outputs[index] = [encoded[caption] for caption in captions[index]]
    written = share.mine(missing) if to_disk else []
    for index in written:
        _save(te_cache_path(image_paths[index]), captions[index], model, outputs[index], te1_width)
    made = CachePass(len(image_paths), len(image_paths) - len(missing), len(work), len(mine), len(written))
    return TextEncoderCache(outputs, num_variants, seed, made)


class CachedTextDataset(torch.utils.data.Dataset):
    """A dataset's examples with their cached `text_context` / `text_pooled` added (keys as the dataset takes)."""

    def __init__(self, dataset, cache: TextEncoderCache) -> None:
        self.dataset = dataset
        self.cache = cache

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch, repeat = (key, 0, 0) if isinstance(key, int) else (*key, 0)[:3]
        example = dict(self.dataset[key])
        example["text_context"], example["text_pooled"] = self.cache.lookup(index, epoch, repeat)
        return example


def collate_with_text_outputs(examples: list[dict], base: Callable[[list[dict]], dict]) -> dict:
    """`base`'s batch plus `text_context` (B, L, D) and `text_pooled` (B, P) stacked from the examples."""
    batch = base(examples)
    batch["text_context"] = torch.stack([example["text_context"] for example in examples])
    batch["text_pooled"] = torch.stack([example["text_pooled"] for example in examples])
    return batch
