"""Latent caching in memory and in sd-scripts' npz files, with a fake encoder (8x average pooling)."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from library.data.buckets import sdscripts_crop_ltrb
from library.data.dataset import BucketBatchSampler, DatasetConfig, TrainDataset, collate_examples, scan_train_data_dir
from library.data.latent_cache import cache_latents, npz_cache_path
from library.errors import UserInputError


class FakeEncoder:
    """Pools 8x8 blocks and appends the channel mean as a 4th channel; counts what it is asked to encode."""

    def __init__(self):
        self.batches: list[tuple[int, ...]] = []

    @property
    def images(self) -> int:
        return sum(shape[0] for shape in self.batches)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.batches.append(tuple(images.shape))
        pooled = F.avg_pool2d(images, 8)
        return torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1)


def write_image(path: Path, size, colour) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def cfg(tmp_path) -> DatasetConfig:
    root = tmp_path / "train"
    write_image(root / "3_toy" / "a.png", (100, 100), (255, 0, 0))  # bucket 128x128
    write_image(root / "3_toy" / "b.png", (150, 100), (0, 255, 0))  # bucket 160x96
    write_image(root / "3_toy" / "c.png", (128, 128), (0, 0, 255))  # bucket 128x128
    return DatasetConfig(
        root,
        caption_extension=".txt",
        resolution=(128, 128),
        enable_bucket=True,
        min_bucket_reso=64,
        max_bucket_reso=256,
        bucket_reso_steps=32,
    )


def make_dataset(cfg) -> TrainDataset:
    return TrainDataset(scan_train_data_dir(cfg), cfg)


def test_npz_cache_path_is_sdscripts_name():
    assert npz_cache_path(Path("/d/5_toy/img.01.png"), (832, 1216)) == Path("/d/5_toy/img.01_0832x1216_sdxl.npz")
    assert npz_cache_path(Path("x.jpg"), (12345, 7)) == Path("x_12345x0007_sdxl.npz")


def test_cache_in_memory_batches_by_bucket(cfg):
    dataset = make_dataset(cfg)
    encode = FakeEncoder()
    cache_latents(dataset, encode, to_disk=False, batch_size=4, show_progress=False)
    assert sorted(encode.batches) == [(1, 3, 96, 160), (2, 3, 128, 128)]
    assert not list(cfg.train_data_dir.rglob("*.npz"))
    example = dataset[(0, 0)]
    assert "image" not in example
    assert example["latents"].shape == (4, 16, 16)
    assert torch.allclose(example["latents"][:, 0, 0], torch.tensor([1.0, -1.0, -1.0, -1 / 3]))
    assert dataset[(1, 0)]["latents"].shape == (4, 12, 20)
    assert dataset.all_latents_cached


def test_cache_to_disk_writes_sdscripts_npz(cfg):
    dataset = make_dataset(cfg)
    encode = FakeEncoder()
    cache_latents(dataset, encode, to_disk=True, batch_size=1, show_progress=False)
    assert encode.images == 3 and all(shape[0] == 1 for shape in encode.batches)
    path = npz_cache_path(dataset.records[1].path, (150, 100))
    assert path.name == "b_0150x0100_sdxl.npz"
    with np.load(path) as npz:
        assert set(npz.files) == {"latents", "original_size", "crop_ltrb"}
        assert npz["latents"].shape == (4, 12, 20) and npz["latents"].dtype == np.float32
        assert npz["original_size"].tolist() == [150, 100]
        assert npz["crop_ltrb"].tolist() == [0, 5, 160, 101]  # resized 160x107, 5 px off the top
    assert not list(cfg.train_data_dir.rglob("*.tmp"))


def test_cache_reused_without_encoding(cfg):
    cache_latents(make_dataset(cfg), FakeEncoder(), to_disk=True, show_progress=False)
    dataset = make_dataset(cfg)
    encode = FakeEncoder()
    cache_latents(dataset, encode, to_disk=True, show_progress=False)
    assert encode.batches == []
    assert dataset.all_latents_cached
    assert dataset[(1, 0)]["latents"].shape == (4, 12, 20)


def test_stale_shape_is_recomputed(cfg, caplog):
    dataset = make_dataset(cfg)
    record = dataset.records[1]
    path = npz_cache_path(record.path, record.original_size)
    np.savez(
        path,
        latents=np.zeros((4, 8, 8), np.float32),
        original_size=np.array([150, 100]),
        crop_ltrb=np.array([0, 5, 160, 101]),
    )
    encode = FakeEncoder()
    with caplog.at_level("INFO"):
        cache_latents(dataset, encode, to_disk=True, show_progress=False)
    assert encode.images == 3
    assert "b_0150x0100_sdxl.npz" in caplog.text and "(4, 8, 8)" in caplog.text
    with np.load(path) as npz:
        assert npz["latents"].shape == (4, 12, 20)


@pytest.mark.parametrize(
    "stale",
    [
        {"latents": np.zeros((4, 12, 20), np.float32)},  # keys missing
        {
            "latents": np.zeros((4, 12, 20), np.float32),
            "original_size": np.array([100, 150]),
            "crop_ltrb": np.array([0, 5, 160, 101]),
        },  # another image size
        {
            "latents": np.zeros((4, 12, 20), np.float32),
            "original_size": np.array([150, 100]),
            "crop_ltrb": np.array([3, 0, 163, 96]),
        },  # another crop
    ],
)
def test_mismatched_cache_is_recomputed(cfg, stale):
    dataset = make_dataset(cfg)
    record = dataset.records[1]
    np.savez(npz_cache_path(record.path, record.original_size), **stale)
    encode = FakeEncoder()
    cache_latents(dataset, encode, to_disk=True, show_progress=False)
    assert encode.images == 3
    assert not torch.all(dataset[(1, 0)]["latents"] == 0)


def test_corrupt_cache_is_recomputed(cfg):
    dataset = make_dataset(cfg)
    record = dataset.records[0]
    npz_cache_path(record.path, record.original_size).write_bytes(b"garbage")
    encode = FakeEncoder()
    cache_latents(dataset, encode, to_disk=True, show_progress=False)
    assert encode.images == 3


def test_sdscripts_cache_with_letterbox_crop_is_reused(cfg):
    dataset = make_dataset(cfg)
    record = dataset.records[1]
    ltrb = np.array(sdscripts_crop_ltrb(record.bucket, record.original_size))  # what sd-scripts writes
    np.savez(
        npz_cache_path(record.path, record.original_size),
        latents=np.ones((4, 12, 20), np.float32),
        original_size=np.array(record.original_size),
        crop_ltrb=ltrb,
    )
    encode = FakeEncoder()
    cache_latents(dataset, encode, to_disk=True, show_progress=False)
    assert encode.images == 2
    assert torch.all(dataset[(1, 0)]["latents"] == 1)


def test_random_crop_refused(cfg):
    from dataclasses import replace

    cfg = replace(cfg, random_crop=True)
    with pytest.raises(UserInputError, match="--random_crop"):
        cache_latents(make_dataset(cfg), FakeEncoder(), to_disk=False, show_progress=False)


def test_wrong_encoder_shape_is_a_bug(cfg):
    with pytest.raises(RuntimeError, match="expected"):
        cache_latents(make_dataset(cfg), lambda x: x, to_disk=False, show_progress=False)


def test_cached_batches_collate(cfg):
    dataset = make_dataset(cfg)
    cache_latents(dataset, FakeEncoder(), to_disk=False, show_progress=False)
    sampler = BucketBatchSampler(dataset, batch_size=4, seed=0)
    batches = [collate_examples([dataset[key] for key in keys]) for keys in sampler]
    assert sorted(b["latents"].shape[0] for b in batches) == [2, 3, 4]  # 6 in 128x128, 3 in 160x96
    for batch in batches:
        h, w = batch["target_sizes_hw"][0].tolist()
        assert batch["latents"].shape[1:] == (4, h // 8, w // 8)


# -- flip_aug (issue 4) ----------------------------------------------------------------------------------


def test_flip_aug_caches_both_sides_and_picks_one_per_key(cfg):
    from dataclasses import replace

    from library.data.dataset import flip_chosen

    cfg = replace(cfg, flip_aug=True, seed=7)
    dataset = make_dataset(cfg)
    encode = FakeEncoder()
    cache_latents(dataset, encode, to_disk=True, batch_size=4, show_progress=False)
    # Each bucket batch is encoded twice: as is and mirrored.
    assert sorted(encode.batches) == [(1, 3, 96, 160), (1, 3, 96, 160), (2, 3, 128, 128), (2, 3, 128, 128)]
    path = npz_cache_path(dataset.records[1].path, (150, 100))
    with np.load(path) as npz:
        assert set(npz.files) == {"latents", "original_size", "crop_ltrb", "latents_flipped"}
        assert np.allclose(npz["latents_flipped"], npz["latents"][:, :, ::-1])  # pooling commutes with the mirror
    choices = [flip_chosen(7, 1, 1, repeat) for repeat in range(4)]
    assert choices == [False, True, True, True]
    plain, flipped = dataset[(1, 1, 0)], dataset[(1, 1, 1)]
    assert torch.equal(flipped["latents"], plain["latents"].flip(-1))
    # 150x100 -> 160x107, window 160x96 at top 5: the mirrored window has the same left (0) and top.
    assert flipped["crop_top_left"] == plain["crop_top_left"] == (5, 0)
    # Reused from disk with both keys.
    again, encode = make_dataset(cfg), FakeEncoder()
    cache_latents(again, encode, to_disk=True, show_progress=False)
    assert encode.batches == [] and again.all_latents_cached


def test_cache_without_flip_is_recomputed_when_flip_is_needed(cfg, caplog):
    from dataclasses import replace

    cache_latents(make_dataset(cfg), FakeEncoder(), to_disk=True, show_progress=False)
    dataset, encode = make_dataset(replace(cfg, flip_aug=True)), FakeEncoder()
    with caplog.at_level("INFO"):
        cache_latents(dataset, encode, to_disk=True, show_progress=False)
    assert encode.images == 6  # 3 images, each as is and mirrored
    assert "latents_flipped" in caplog.text
    # A flip cache serves a run without flip too.
    encode = FakeEncoder()
    cache_latents(make_dataset(cfg), encode, to_disk=True, show_progress=False)
    assert encode.batches == []


def test_unused_reg_images_are_not_encoded(cfg, tmp_path):
    from dataclasses import replace

    for i in range(3):
        write_image(tmp_path / "reg" / "9_toy" / f"r{i}.png", (100, 100), (9, 9, 9))
    dataset = make_dataset(replace(cfg, reg_data_dir=tmp_path / "reg"))
    # 9 training examples (3 x 3): r0 alone covers them (9 repeats); r1, r2 are unused.
    assert [r.num_repeats for r in dataset.records if r.is_reg] == [9, 0, 0]
    encode = FakeEncoder()
    cache_latents(dataset, encode, to_disk=False, show_progress=False)
    assert encode.images == 4 and dataset.all_latents_cached


def test_cache_made_by_another_vae_is_recomputed(tmp_path):
    """A cache that records a different VAE fingerprint is re-encoded; one without a fingerprint (sd-scripts')
    is trusted."""
    import numpy as np
    from PIL import Image

    from library.data.dataset import DatasetConfig, TrainDataset, scan_train_data_dir
    from library.data.latent_cache import VAE_KEY, cache_latents, npz_cache_path

    folder = tmp_path / "1_x"
    folder.mkdir()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(folder / "a.png")
    cfg = DatasetConfig(tmp_path, resolution=(64, 64))
    calls = []

    def encode(images):
        calls.append(images.shape[0])
        return torch.nn.functional.avg_pool2d(images, 8)[:, :1].repeat(1, 4, 1, 1)

    def run(fingerprint):
        dataset = TrainDataset(scan_train_data_dir(cfg), cfg)
        cache_latents(dataset, encode, to_disk=True, show_progress=False, vae_fingerprint=fingerprint)

    run("vae-a")
    run("vae-a")
    assert len(calls) == 1
    npz = npz_cache_path(folder / "a.png", (64, 64))
    assert str(np.load(npz)[VAE_KEY]) == "vae-a"
    run("vae-b")
    assert len(calls) == 2 and str(np.load(npz)[VAE_KEY]) == "vae-b"
    # An sd-scripts cache has no fingerprint: it is used as is.
    with np.load(npz) as data:
        arrays = {k: data[k] for k in data.files if k != VAE_KEY}
    np.savez(npz, **arrays)
    run("vae-c")
    assert len(calls) == 2
