"""--cache_text_encoder_outputs: variants, the sd-scripts npz, its validity check, and the loader on cached data."""

from __future__ import annotations

import random
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import library.data.dataset
from library.config.build import config_from_args
from library.config.cli import build_parser
from library.data.dataset import TrainDataset, scan_train_data_dir
from library.data.latent_cache import cache_latents
from library.data.text_encoder_cache import (
    VARIANT_EPOCH_BASE,
    CachedTextDataset,
    cache_text_encoder_outputs,
    pick_variant,
    te_cache_path,
)
from library.errors import UserInputError
from library.model.text_encoding import encode_captions
from library.train.setup_parts import make_loader
from tools.make_demo_dataset import make_demo_dataset

WIDTH1 = 3  # TE1's share of the fake context width


def _fake_encoder(calls: list[list[str]]):
    """Context (B, 5, 5) and pooled (B, 2) derived from the caption text, so equal captions give equal outputs."""

    def encode(captions: list[str]):
        calls.append(list(captions))
        values = torch.tensor([float(sum(map(ord, c)) % 997) for c in captions])
        context = values[:, None, None] + torch.arange(25, dtype=torch.float32).reshape(1, 5, 5)
        return context, torch.stack([values, -values], dim=1)

    return encode


def _shuffled(captions: list[str]):
    def caption_of(index: int, epoch: int) -> str:
        tags = captions[index].split(", ")
        random.Random(f"{index}-{epoch}").shuffle(tags)
        return ", ".join(tags)

    return caption_of


def _images(tmp_path, count: int):
    paths = [tmp_path / f"{i:03d}.png" for i in range(count)]
    for path in paths:
        path.write_bytes(b"")
    return paths


def _cache(paths, caption_of, encode, **kwargs):
    settings = dict(num_variants=1, seed=7, length=5, te1_width=WIDTH1, show_progress=False)
    settings.update(kwargs)
    return cache_text_encoder_outputs(paths, caption_of, encode, **settings)


def test_pick_variant_is_a_fixed_even_hash():
    assert all(pick_variant(1, i, e, r, 1) == 0 for i in range(5) for e in range(5) for r in range(3))
    picks = [pick_variant(1, i, e, r, 4) for i in range(50) for e in range(1, 11) for r in range(2)]
    assert picks == [pick_variant(1, i, e, r, 4) for i in range(50) for e in range(1, 11) for r in range(2)]
    counts = Counter(picks)
    assert sorted(counts) == [0, 1, 2, 3] and min(counts.values()) > 200  # 1000 keys, about 250 each
    assert picks != [pick_variant(2, i, e, r, 4) for i in range(50) for e in range(1, 11) for r in range(2)]


def test_each_distinct_caption_is_encoded_once(tmp_path):
    calls: list[list[str]] = []
    captions = ["a, b", "c, d", "a, b"]
    cache = _cache(_images(tmp_path, 3), lambda i, e: captions[i], _fake_encoder(calls), batch_size=8, num_variants=3)
    assert calls == [["a, b", "c, d"]]  # 3 images x 3 identical variants -> 2 captions, one batch
    assert torch.equal(cache.lookup(0, 1, 0)[0], cache.lookup(2, 5, 1)[0])
    assert not torch.equal(cache.lookup(0, 1, 0)[0], cache.lookup(1, 1, 0)[0])


def test_varying_captions_need_variants(tmp_path):
    with pytest.raises(UserInputError, match="add --text_encoder_cache_variants N"):
        _cache(_images(tmp_path, 2), _shuffled(["a, b, c, d, e, f", "g, h, i, j, k, l"]), _fake_encoder([]))


def test_variants_follow_the_dataset_captions_and_the_hash(tmp_path):
    base = ["a, b, c, d, e, f", "g, h, i, j, k, l"]
    caption_of = _shuffled(base)
    calls: list[list[str]] = []
    encode = _fake_encoder(calls)
    cache = _cache(_images(tmp_path, 2), caption_of, encode, num_variants=4)
    for index in range(2):
        for epoch in range(1, 6):
            for repeat in range(2):
                k = pick_variant(7, index, epoch, repeat, 4)
                context, pooled = cache.lookup(index, epoch, repeat)
                expected = encode([caption_of(index, VARIANT_EPOCH_BASE + k)])
                assert torch.equal(context, expected[0][0]) and torch.equal(pooled, expected[1][0])


def test_disk_cache_uses_sd_scripts_names_and_is_checked(tmp_path):
    paths = _images(tmp_path, 2)
    captions = ["red square", "blue circle"]
    calls: list[list[str]] = []
    first = _cache(paths, lambda i, e: captions[i], _fake_encoder(calls), to_disk=True, model="m1")
    npz_path = te_cache_path(paths[0])
    assert npz_path.name == "000_te_outputs.npz"
    with np.load(npz_path) as npz:
        assert npz["hidden_state1"].shape == (5, WIDTH1) and npz["hidden_state2"].shape == (5, 5 - WIDTH1)
        assert npz["pool2"].shape == (2,) and npz["hidden_state1"].dtype == np.float32
        assert [str(c) for c in npz["captions"]] == ["red square"]
        stored = np.concatenate([npz["hidden_state1"], npz["hidden_state2"]], axis=-1)
    assert np.array_equal(stored, first.lookup(0, 1, 0)[0].numpy())

    calls.clear()
    again = _cache(paths, lambda i, e: captions[i], _fake_encoder(calls), to_disk=True, model="m1")
    assert calls == []  # both loaded from disk
    assert torch.equal(again.lookup(1, 3, 0)[0], first.lookup(1, 3, 0)[0])

    captions[1] = "green triangle"  # a caption changed: only that image is encoded again
    _cache(paths, lambda i, e: captions[i], _fake_encoder(calls), to_disk=True, model="m1")
    assert calls == [["green triangle"]]
    calls.clear()
    _cache(paths, lambda i, e: captions[i], _fake_encoder(calls), to_disk=True, model="m2")  # another model
    assert sorted(calls[0]) == ["green triangle", "red square"]


def test_disk_cache_with_another_length_is_recomputed(tmp_path):
    paths = _images(tmp_path, 1)
    calls: list[list[str]] = []
    _cache(paths, lambda i, e: "x", _fake_encoder(calls), to_disk=True)
    calls.clear()
    _cache(paths, lambda i, e: "x", _fake_encoder(calls), to_disk=True, length=152)  # e.g. --max_token_length 150
    assert calls == [["x"]]  # the stored 5-token states do not fit: encoded again


# ------------------------------------------------------------------------------------------------------------
# With the real dataset and the tiny SDXL


def _dataset(tmp_path, model, *extra: str) -> TrainDataset:
    data = tmp_path / "data"
    if not data.exists():
        make_demo_dataset(data, count=4, min_side=64, max_side=128, repeats=2, name="toy", seed=0)
    argv = [
        "--pretrained_model_name_or_path",
        str(model),
        "--train_data_dir",
        str(data),
        "--output_dir",
        str(tmp_path / "out"),
        "--resolution",
        "64",
        "--enable_bucket",
        "--min_bucket_reso",
        "64",
        "--max_bucket_reso",
        "128",
        "--caption_extension",
        ".txt",
        "--train_batch_size",
        "2",
        "--seed",
        "3",
        "--network_train_unet_only",
        *extra,
    ]
    cfg = config_from_args(build_parser().parse_args(argv))
    return TrainDataset(scan_train_data_dir(cfg.data), cfg.data)


def _cache_for(dataset, models, num_variants=1, max_token_length=75):
    return cache_text_encoder_outputs(
        [r.path for r in dataset.records],
        lambda i, e: dataset[(i, e, 0)]["caption"],
        lambda caps: encode_captions(models, caps, max_token_length),
        num_variants=num_variants,
        seed=dataset.config.seed,
        length=max_token_length + 2,
        te1_width=models.text_encoder1.config.hidden_size,
        show_progress=False,
    )


def test_cached_outputs_equal_encoding_the_dataset_caption(tmp_path, tiny_sdxl, tiny_models):
    dataset = _dataset(tmp_path, tiny_sdxl.single_file, "--shuffle_caption", "--keep_tokens", "1")
    cache = _cache_for(dataset, tiny_models, num_variants=3, max_token_length=150)
    wrapped = CachedTextDataset(dataset, cache)
    for key in [(0, 1, 0), (1, 2, 1), (3, 7, 0)]:
        example = wrapped[key]
        k = pick_variant(dataset.config.seed, key[0], key[1], key[2], 3)
        caption = dataset[(key[0], VARIANT_EPOCH_BASE + k, 0)]["caption"]
        with torch.no_grad():
            context, pooled = encode_captions(tiny_models, [caption], 150)
        assert example["text_context"].shape == (152, context.shape[-1])
        assert torch.allclose(example["text_context"], context[0], atol=1e-5)
        assert torch.allclose(example["text_pooled"], pooled[0], atol=1e-5)


def test_cached_loader_never_decodes_an_image(tmp_path, tiny_sdxl, tiny_models, monkeypatch):
    """Cached latents + cached text outputs: 0 image decodes, in the main process and in 2 persistent workers."""
    dataset = _dataset(tmp_path, tiny_sdxl.single_file)
    vae = tiny_models.vae

    def encode(images):
        return vae.encode(images).latent_dist.sample()

    decodes = Counter()
    original = library.data.dataset.load_image_rgb

    def counting(path):
        decodes["n"] += 1
        return original(path)

    monkeypatch.setattr(library.data.dataset, "load_image_rgb", counting)
    with torch.no_grad():
        cache_latents(dataset, encode, to_disk=False, show_progress=False)
    assert decodes["n"] == len(dataset.records)  # once each, to cache
    cache = _cache_for(dataset, tiny_models)
    assert decodes["n"] == len(dataset.records)  # captions came from the cached-latent examples: no decode

    def refuse(path):
        raise AssertionError(f"decoded {path}")

    monkeypatch.setattr(library.data.dataset, "load_image_rgb", refuse)  # a decode in a worker fails the run
    accelerator = SimpleNamespace(num_processes=1, process_index=0)
    batches = {}
    for workers, persistent in ((0, False), (2, True)):
        loop = SimpleNamespace(
            batch_size=2, seed=3, max_data_loader_n_workers=workers, persistent_data_loader_workers=persistent
        )
        loader, sampler = make_loader(dataset, loop, accelerator, cache)
        seen = []
        for epoch in (1, 2):
            sampler.set_epoch(epoch)
            for batch in loader:
                assert "images" not in batch and batch["text_context"].shape[:2] == (batch["latents"].shape[0], 77)
                seen.append((batch["latents"].sum().item(), batch["text_context"].sum().item()))
        batches[workers] = seen
    assert len(batches[0]) == 8 and batches[0] == batches[2]
