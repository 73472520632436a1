"""Scanning the N_name tree, examples, batching by bucket, and collation, on tiny generated images."""

from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from library.data.dataset import (
    BucketBatchSampler,
    DatasetConfig,
    TrainDataset,
    collate_examples,
    parse_subset_name,
    scan_train_data_dir,
)
from library.errors import UserInputError
from tools.make_demo_dataset import make_demo_dataset


def write_image(path: Path, size: tuple[int, int], colour=(200, 30, 30), caption: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    return path


def small_config(root: Path, **overrides) -> DatasetConfig:
    # Buckets of (128, 128)'s area, sides 64..256 in steps of 32:
    # (64,192) (64,224) (64,256) (96,160) (128,128) (160,96) (192,64) (224,64) (256,64)
    fields = dict(
        train_data_dir=root,
        caption_extension=".txt",
        resolution=(128, 128),
        enable_bucket=True,
        min_bucket_reso=64,
        max_bucket_reso=256,
        bucket_reso_steps=32,
        batch_size=2,
        seed=7,
    )
    fields.update(overrides)
    return DatasetConfig(**fields)


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "train"
    write_image(root / "5_toy" / "a.png", (100, 100), caption="toy, red, square, simple background")
    write_image(root / "5_toy" / "b.png", (150, 100))  # no caption: class tokens
    write_image(root / "5_toy" / "c.JPG", (100, 150), caption="toy, tall")
    write_image(root / "2_my bg" / "d.png", (128, 128), caption="background, Plain")
    (root / "5_toy" / "notes.md").write_text("not an image")
    (root / "5_toy" / "._a.png").write_bytes(b"macOS resource fork, not an image")
    return root


def test_parse_subset_name():
    assert parse_subset_name("10_my_char") == (10, "my_char")
    assert parse_subset_name("3_") == (3, "")
    assert parse_subset_name("mychar") is None
    assert parse_subset_name("x_mychar") is None


def test_scan_records(tree):
    records = scan_train_data_dir(small_config(tree))
    assert [(r.subset, r.path.name) for r in records] == [
        ("2_my bg", "d.png"),
        ("5_toy", "a.png"),
        ("5_toy", "b.png"),
        ("5_toy", "c.JPG"),
    ]
    d, a, b, c = records
    assert (d.num_repeats, d.class_tokens, d.caption) == (2, "my bg", "background, Plain")
    assert (a.num_repeats, a.class_tokens) == (5, "toy")
    assert b.caption == "toy"
    assert (a.original_size, a.bucket, a.resized_size, a.crop_left_top) == ((100, 100), (128, 128), (128, 128), (0, 0))
    # 150x100 (1.5) -> 160x96 (1.67); cover by width: 100 * 160 / 150 = 106.7 -> 107 high, 5 px cropped at the top.
    assert (b.bucket, b.resized_size, b.crop_left_top) == ((160, 96), (160, 107), (0, 5))
    assert (c.bucket, c.resized_size, c.crop_left_top) == ((96, 160), (107, 160), (5, 0))


def test_scan_without_buckets_uses_resolution(tree):
    records = scan_train_data_dir(small_config(tree, enable_bucket=False, resolution=(64, 64)))
    b = records[2]
    assert (b.bucket, b.resized_size, b.crop_left_top) == ((64, 64), (96, 64), (16, 0))


def test_scan_no_upscale(tree):
    records = scan_train_data_dir(small_config(tree, bucket_no_upscale=True))
    b = records[2]
    assert (b.bucket, b.resized_size, b.crop_left_top) == ((128, 96), (150, 100), (11, 2))


def test_scan_missing_dir(tmp_path):
    with pytest.raises(UserInputError, match=r"nope.*does not exist"):
        scan_train_data_dir(small_config(tmp_path / "nope"))


def test_scan_empty_dir(tmp_path):
    with pytest.raises(UserInputError, match=r"no images found in .*N_name, e\.g\. 10_mychar"):
        scan_train_data_dir(small_config(tmp_path))


def test_scan_images_at_top_level_only(tmp_path):
    write_image(tmp_path / "a.png", (64, 64))
    with pytest.raises(UserInputError, match="no images found"):
        scan_train_data_dir(small_config(tmp_path))


def test_scan_folder_without_prefix_is_skipped_with_warning(tree, caplog):
    write_image(tree / "mychar" / "x.png", (64, 64))
    records = scan_train_data_dir(small_config(tree))
    assert all(r.subset != "mychar" for r in records)
    assert "mychar" in caplog.text and "10_mychar" in caplog.text


def test_scan_only_unprefixed_folder_errors_and_names_it(tmp_path):
    write_image(tmp_path / "mychar" / "x.png", (64, 64))
    with pytest.raises(UserInputError, match=r"no images found.*skipped.*mychar"):
        scan_train_data_dir(small_config(tmp_path))


def test_scan_broken_image_names_it(tree):
    data = (tree / "5_toy" / "a.png").read_bytes()
    (tree / "5_toy" / "broken.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserInputError, match=r"cannot read image .*broken\.png.*fix or remove it"):
        scan_train_data_dir(small_config(tree))


def test_scan_not_an_image_names_it(tree):
    (tree / "5_toy" / "fake.jpg").write_bytes(b"this is text")
    with pytest.raises(UserInputError, match=r"fake\.jpg"):
        scan_train_data_dir(small_config(tree))


def test_scan_same_stem_twice(tree):
    write_image(tree / "5_toy" / "a.jpg", (64, 64))
    with pytest.raises(UserInputError, match=r"a\.jpg, a\.png.*rename one"):
        scan_train_data_dir(small_config(tree))


def test_config_checks_bucket_limits(tmp_path):
    with pytest.raises(UserInputError, match="--min_bucket_reso"):
        small_config(tmp_path, min_bucket_reso=256)
    with pytest.raises(UserInputError, match="--max_bucket_reso"):
        small_config(tmp_path, max_bucket_reso=64)


def test_metadata(tree):
    dataset = TrainDataset(scan_train_data_dir(small_config(tree)), small_config(tree))
    assert len(dataset) == 4
    assert dataset.num_train_images == 2 + 5 * 3
    assert dataset.bucket_counts() == {(96, 160): 5, (128, 128): 7, (160, 96): 5}
    assert dataset.dataset_dirs_info() == {
        "2_my bg": {"n_repeats": 2, "img_count": 1},
        "5_toy": {"n_repeats": 5, "img_count": 3},
    }
    assert dataset.tag_frequency() == {
        "2_my bg": {"background": 1, "plain": 1},
        "5_toy": {"toy": 3, "red": 1, "square": 1, "simple background": 1, "tall": 1},
    }
    report = dataset.bucket_report()
    assert "160x96" in report and "17 with repeats" in report


def test_example_from_image(tree):
    cfg = small_config(tree, shuffle_caption=True, keep_tokens=1)
    dataset = TrainDataset(scan_train_data_dir(cfg), cfg)
    example = dataset[(2, 0)]  # b.png: 150x100 in the 160x96 bucket
    assert "latents" not in example
    assert example["image"].shape == (3, 96, 160)
    assert example["image"].dtype == torch.float32
    red = torch.tensor([200, 30, 30]) / 127.5 - 1
    assert torch.allclose(example["image"][:, 48, 80], red, atol=0.02)
    assert example["original_size_hw"] == (100, 150)
    assert example["crop_top_left"] == (5, 0)
    assert example["target_size_hw"] == (96, 160)
    assert example["loss_weight"] == 1.0


def test_caption_shuffle_is_seeded_by_epoch_and_index(tree):
    cfg = small_config(tree, shuffle_caption=True, keep_tokens=1)
    dataset = TrainDataset(scan_train_data_dir(cfg), cfg)
    captions = {dataset[(1, epoch)]["caption"] for epoch in range(20)}
    assert all(c.startswith("toy, ") for c in captions)
    assert len(captions) > 2
    assert dataset[(1, 3)]["caption"] == dataset[(1, 3)]["caption"]
    again = TrainDataset(scan_train_data_dir(cfg), cfg)
    assert [again[(1, e)]["caption"] for e in range(5)] == [dataset[(1, e)]["caption"] for e in range(5)]


def test_random_crop_changes_per_epoch(tree):
    cfg = small_config(tree, random_crop=True)
    dataset = TrainDataset(scan_train_data_dir(cfg), cfg)
    crops = {dataset[(2, epoch)]["crop_top_left"] for epoch in range(20)}
    assert all(left == 0 and 0 <= top <= 11 for top, left in crops)
    assert len(crops) > 3
    assert dataset[(2, 4)]["crop_top_left"] == dataset[(2, 4)]["crop_top_left"]


def _batches(sampler):
    return list(iter(sampler))


def test_sampler_batches_one_bucket_and_counts_repeats(tree):
    cfg = small_config(tree)
    dataset = TrainDataset(scan_train_data_dir(cfg), cfg)
    sampler = BucketBatchSampler(dataset, batch_size=2, seed=7)
    sampler.set_epoch(3)
    batches = _batches(sampler)
    # buckets hold 7, 5 and 5 images with repeats: 4 + 3 + 3 batches of up to 2
    assert len(batches) == len(sampler) == 10
    assert sorted(len(b) for b in batches) == [1, 1, 1] + [2] * 7
    for batch in batches:
        assert len({dataset.records[i].bucket for i, _, _ in batch}) == 1
        assert all(epoch == 3 for _, epoch, _ in batch)
    seen = Counter(i for batch in batches for i, _, _ in batch)
    assert seen == {0: 2, 1: 5, 2: 5, 3: 5}
    # Each repeat of an image has its own key (0, 1, ...), so its caption shuffle can differ.
    repeats = sorted(r for batch in batches for i, _, r in batch if i == 1)
    assert repeats == [0, 1, 2, 3, 4]


def test_sampler_is_seeded_per_epoch(tree):
    cfg = small_config(tree)
    records = scan_train_data_dir(cfg)
    first = BucketBatchSampler(records, batch_size=2, seed=7)
    second = BucketBatchSampler(records, batch_size=2, seed=7)
    assert _batches(first) == _batches(second)
    orders = set()
    for epoch in range(6):
        first.set_epoch(epoch)
        orders.add(tuple(tuple(i for i, _, _ in b) for b in _batches(first)))
    assert len(orders) > 1


def test_sampler_without_shuffle_keeps_order(tree):
    records = scan_train_data_dir(small_config(tree))
    sampler = BucketBatchSampler(records, batch_size=4, seed=0, shuffle=False)
    indices = [[i for i, _, _ in batch] for batch in sampler]
    # buckets in (w, h) order: (96,160) c x5, (128,128) d x2 + a x5, (160,96) b x5
    assert indices == [[3, 3, 3, 3], [3], [0, 0, 1, 1], [1, 1, 1], [2, 2, 2, 2], [2]]


def test_sampler_ddp_split(tree):
    records = scan_train_data_dir(small_config(tree))
    full = BucketBatchSampler(records, batch_size=2, seed=1)
    full.set_epoch(2)
    all_batches = _batches(full)
    ranks = []
    for rank in range(3):
        sampler = BucketBatchSampler(records, batch_size=2, seed=1, num_replicas=3, rank=rank)
        sampler.set_epoch(2)
        ranks.append(_batches(sampler))
        assert len(sampler) == 4  # ceil(10 / 3)
    assert [len(r) for r in ranks] == [4, 4, 4]
    padded = all_batches + all_batches[:2]
    for rank in range(3):
        assert ranks[rank] == padded[rank::3]


def test_collate_images_and_dataloader(tree):
    cfg = small_config(tree)
    dataset = TrainDataset(scan_train_data_dir(cfg), cfg)
    sampler = BucketBatchSampler(dataset, batch_size=2, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_examples)
    batches = list(loader)
    assert len(batches) == len(sampler)
    for batch in batches:
        size = len(batch["captions"])
        h, w = batch["target_sizes_hw"][0].tolist()
        assert batch["images"].shape == (size, 3, h, w)
        for key in ("original_sizes_hw", "crop_top_lefts", "target_sizes_hw"):
            assert batch[key].dtype == torch.long and batch[key].shape == (size, 2)
        assert batch["loss_weights"].dtype == torch.float32 and batch["loss_weights"].shape == (size,)


def test_collate_latents():
    example = {
        "latents": torch.zeros(4, 12, 20),
        "caption": "x",
        "original_size_hw": (100, 150),
        "crop_top_left": (5, 0),
        "target_size_hw": (96, 160),
        "loss_weight": 1.0,
    }
    batch = collate_examples([example, dict(example, caption="y")])
    assert batch["latents"].shape == (2, 4, 12, 20)
    assert "images" not in batch
    assert batch["captions"] == ["x", "y"]
    assert batch["crop_top_lefts"].tolist() == [[5, 0], [5, 0]]


def test_demo_dataset_scans(tmp_path):
    folder = make_demo_dataset(tmp_path / "demo", count=4, min_side=64, max_side=128, repeats=3, name="toy", seed=1)
    assert folder.name == "3_toy"
    cfg = DatasetConfig(
        tmp_path / "demo",
        caption_extension=".txt",
        resolution=(128, 128),
        enable_bucket=True,
        min_bucket_reso=64,
        max_bucket_reso=256,
        bucket_reso_steps=32,
    )
    records = scan_train_data_dir(cfg)
    assert len(records) == 4
    assert all(r.caption.startswith("toy, ") for r in records)
    # Aspects come in pairs (1:1, 1:1, 4:3, 4:3): two buckets of two images each.
    assert len({r.bucket for r in records}) == 2
    assert records[0].bucket == records[1].bucket != records[2].bucket == records[3].bucket
    assert all(64 <= side <= 128 for r in records for side in r.original_size)


# -- regularisation images, flip_aug, --skip_bad_images (issue 4) ---------------------------------------------

from library.data.dataset import balance_reg_repeats, flip_chosen  # noqa: E402


@pytest.mark.parametrize(
    "train, reg, expected",
    [
        (10, [1, 1, 1], [4, 3, 3]),  # one round (3) short of 10: +1 each in order until 10
        (4, [2, 2, 2], [2, 2, 0]),  # the first images reach 4: the third is unused
        (5, [3, 3], [3, 3]),  # the round that crosses the count is kept whole
        (3, [1], [3]),
        (0, [2, 2], [0, 0]),
        (7, [], []),
    ],
)
def test_balance_reg_repeats_is_sd_scripts_rule(train, reg, expected):
    assert balance_reg_repeats(train, reg) == expected


def test_reg_images_weights_counts_and_metadata(tree, tmp_path):
    reg_root = tmp_path / "reg"
    for name in ("r1.png", "r2.png", "r3.png"):
        write_image(reg_root / "1_toy" / name, (100, 100), caption="a toy")
    cfg = small_config(tree, reg_data_dir=reg_root, prior_loss_weight=0.25)
    dataset = TrainDataset(scan_train_data_dir(cfg), cfg)
    reg = [r for r in dataset.records if r.is_reg]
    # 2 + 5 * 3 = 17 training images with repeats; 3 reg images of 1 repeat grow to 6 + 6 + 5.
    assert dataset.num_train_images == 17
    assert [r.num_repeats for r in reg] == [6, 6, 5]
    assert dataset.num_reg_images == 3
    assert dataset.num_examples_per_epoch == 34
    assert dataset.dataset_dirs_info() == {
        "2_my bg": {"n_repeats": 2, "img_count": 1},
        "5_toy": {"n_repeats": 5, "img_count": 3},
    }
    assert dataset.reg_dataset_dirs_info() == {"1_toy": {"n_repeats": 1, "img_count": 3}}
    index = dataset.records.index(reg[0])
    assert dataset[(index, 1)]["loss_weight"] == 0.25
    assert dataset[(0, 1)]["loss_weight"] == 1.0
    sampler = BucketBatchSampler(dataset, batch_size=2, seed=7)
    keys = [key for batch in sampler for key in batch]
    assert len(keys) == 34
    assert sum(dataset.records[i].is_reg for i, *_ in keys) == 17
    batch = collate_examples([dataset[(index, 1)], dataset[(1, 1)]])
    assert batch["loss_weights"].tolist() == [0.25, 1.0]


def test_unused_reg_images_are_not_sampled(tree, tmp_path):
    reg_root = tmp_path / "reg"
    for i in range(4):
        write_image(reg_root / "10_toy" / f"r{i}.png", (100, 100))
    cfg = small_config(tree, reg_data_dir=reg_root)
    dataset = TrainDataset(scan_train_data_dir(cfg), cfg)
    # 17 training examples: r0 (10) + r1 (10) cross 17; r2, r3 unused.
    assert [r.num_repeats for r in dataset.records if r.is_reg] == [10, 10, 0, 0]
    assert dataset.num_reg_images == 40
    keys = [key for batch in BucketBatchSampler(dataset, 2, 0) for key in batch]
    assert len(keys) == 37
    assert sum(dataset.bucket_counts().values()) == 37


def test_flip_choice_is_a_seeded_coin():
    assert [flip_chosen(7, 1, i, 0) for i in range(8)] == [True, False, True, False, True, True, True, False]
    flips = [flip_chosen(0, e, i, r) for e in range(10) for i in range(20) for r in range(5)]
    assert 0.45 < sum(flips) / len(flips) < 0.55


def test_flip_aug_mirrors_image_and_crop(tmp_path):
    root = tmp_path / "train"
    image = Image.new("RGB", (150, 100), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 20, 100))  # white stripe on the left
    (root / "1_x").mkdir(parents=True)
    image.save(root / "1_x" / "a.png")
    cfg = small_config(root, flip_aug=True, seed=7)
    dataset = TrainDataset(scan_train_data_dir(cfg), cfg)
    record = dataset.records[0]
    assert (record.bucket, record.resized_size, record.crop_left_top) == ((160, 96), (160, 107), (0, 5))
    plain = cfg.seed, 1, 0, 1  # flip_chosen(7, 1, 0, 1) is False, (7, 1, 0, 0) is True
    assert flip_chosen(*plain) is False and flip_chosen(7, 1, 0, 0) is True
    unflipped, flipped = dataset[(0, 1, 1)], dataset[(0, 1, 0)]
    assert torch.equal(flipped["image"], unflipped["image"].flip(-1))
    assert unflipped["image"][:, :, 0].mean() > 0.9 and flipped["image"][:, :, -1].mean() > 0.9
    # A 160-wide window of a 160-wide image: mirrored left is 160 - 0 - 160 = 0; top stays.
    assert unflipped["crop_top_left"] == flipped["crop_top_left"] == (5, 0)


def test_skip_bad_images_warns_once_and_goes_on(tree, caplog):
    (tree / "5_toy" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(UserInputError, match="broken.png"):
        scan_train_data_dir(small_config(tree))
    records = scan_train_data_dir(small_config(tree, skip_bad_images=True))
    assert [r.path.name for r in records] == ["d.png", "a.png", "b.png", "c.JPG"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "broken.png" in r.getMessage()]
    assert len(warnings) == 1 and "--skip_bad_images" in warnings[0] and "\n" not in warnings[0]


def test_flipped_crop_is_the_mirrored_window(tree):
    from library.data.dataset import flipped_crop_left_top

    records = scan_train_data_dir(small_config(tree))
    c = records[3]  # 100x150 -> resized 107x160, bucket 96x160, centre crop left 5
    assert (c.resized_size, c.bucket, c.crop_left_top) == ((107, 160), (96, 160), (5, 0))
    assert flipped_crop_left_top(c, c.crop_left_top) == (6, 0)  # 107 - 5 - 96


def test_caption_helper_matches_examples_and_reports_variation(tree):
    cfg = small_config(tree, caption_tag_dropout_rate=0.5)
    dataset = TrainDataset(scan_train_data_dir(cfg), cfg)
    assert all(dataset.caption(1, e, r) == dataset[(1, e, r)]["caption"] for e in range(3) for r in range(2))
    assert dataset.captions_vary()
    fixed = TrainDataset(scan_train_data_dir(small_config(tree)), small_config(tree))
    assert not fixed.captions_vary()
