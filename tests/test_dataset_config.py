"""--dataset_config (sd-scripts' TOML): schema, precedence subset > dataset > general > command line, errors."""

import json
from pathlib import Path

import pytest
from PIL import Image

from library.config.build import data_config
from library.config.cli import build_parser
from library.data.dataset import BucketBatchSampler, DatasetConfig, TrainDataset, collate_examples, scan_train_data_dir
from library.data.dataset_config import load_dataset_config
from library.errors import UserInputError


def write_image(path: Path, size=(64, 64), caption: str | None = None, ext=".txt") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 200)).save(path)
    if caption is not None:
        path.with_suffix(ext).write_text(caption, encoding="utf-8")


CLI = DatasetConfig(caption_extension=".caption", resolution=(64, 64), batch_size=1).cli_values()


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dataset.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_precedence_subset_dataset_general_cli(tmp_path):
    path = write_toml(
        tmp_path,
        f"""
[general]
shuffle_caption = true
keep_tokens = 1
caption_extension = ".txt"
flip_aug = true

[[datasets]]
resolution = [96, 64]
batch_size = 3
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = '{tmp_path / "a"}'
  num_repeats = 4
  keep_tokens = 3
  class_tokens = "toy"

  [[datasets.subsets]]
  image_dir = '{tmp_path / "b"}'
  is_reg = true
  flip_aug = false
  caption_extension = ".cap"

[[datasets]]
  [[datasets.subsets]]
  image_dir = '{tmp_path / "c"}'
""",
    )
    group = load_dataset_config(path, CLI)
    assert group.source == path
    first, second = group.datasets
    a, b = first.subsets
    (c,) = second.subsets
    assert (first.buckets.resolution, first.batch_size) == ((96, 64), 3)  # dataset
    assert (second.buckets.resolution, second.batch_size) == ((64, 64), 1)  # command line
    assert (a.num_repeats, a.class_tokens, a.caption.keep_tokens, a.caption.shuffle_caption) == (4, "toy", 3, True)
    assert (b.num_repeats, b.is_reg, b.caption.keep_tokens, b.flip_aug) == (1, True, 2, False)
    assert b.caption_extension == ".cap"
    assert (c.caption.keep_tokens, c.flip_aug, c.caption_extension, c.is_reg) == (1, True, ".txt", False)  # general
    assert a.caption_extension == ".txt" and a.name == "a"


def test_cli_is_the_last_fallback(tmp_path):
    path = write_toml(tmp_path, f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{tmp_path}'\n")
    cli = DatasetConfig(
        caption_extension=".txt", shuffle_caption=True, caption_prefix="p", batch_size=5, resolution=(128, 96)
    ).cli_values()
    (section,) = load_dataset_config(path, cli).datasets
    (subset,) = section.subsets
    assert (section.batch_size, section.buckets.resolution) == (5, (128, 96))
    assert subset.caption_extension == ".txt"
    assert (subset.caption.shuffle_caption, subset.caption.caption_prefix) == (True, "p")


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[general]\nnum_repeat = 2\n", "[general]: unknown key 'num_repeat'; did you mean 'num_repeats'?"),
        (
            "[[datasets]]\nreslution = 512\n[[datasets.subsets]]\nimage_dir = 'x'\n",
            "[[datasets]] #1: unknown key 'reslution'; did you mean 'resolution'?",
        ),
        (
            "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\nshuffle_captions = true\n",
            "[[datasets.subsets]] #1: unknown key 'shuffle_captions'; did you mean 'shuffle_caption'?",
        ),
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\nbatch_size = 2\n", "'batch_size' is not allowed here"),
        ("[general]\nimage_dir = 'x'\n", "'image_dir' is not allowed here"),
        (
            "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\ncolor_aug = true\n",
            "'color_aug' = true is an sd-scripts option this trainer does not implement and would change the run: "
            "remove it or set it to false",
        ),
        ("[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 2\n", "'image_dir' is required"),
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\nnum_repeats = 'two'\n", "'num_repeats' must be int"),
        (
            "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\nshuffle_caption = 1\n",
            "'shuffle_caption' must be bool",
        ),
        ("[[datasets]]\nresolution = [1, 2, 3]\n[[datasets.subsets]]\nimage_dir = 'x'\n", "'resolution' must be"),
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\ncaption_dropout_rate = 2\n", "caption_dropout_rate 2.0"),
        ("[general]\nshuffle_caption = true\n", "no [[datasets]] block"),
        ("[general\nx = 1\n", "is not valid TOML: Expected ']' at the end of a table declaration (at line 1"),
        ("[model]\nx = 1\n", "top level: unknown key 'model'"),
    ],
)
def test_errors_name_the_file_the_place_and_the_key(tmp_path, text, fragment):
    path = write_toml(tmp_path, text)
    with pytest.raises(UserInputError) as error:
        load_dataset_config(path, CLI)
    message = str(error.value)
    assert str(path) in message and fragment in message
    assert "\n" not in message


def test_several_subsets_feed_one_dataset_with_their_own_options(tmp_path):
    write_image(tmp_path / "chars" / "a.png", caption="a, b, c")
    write_image(tmp_path / "chars" / "b.png")  # no caption: class tokens
    write_image(tmp_path / "styles" / "s.png", size=(96, 64), caption="s1, s2")
    path = write_toml(
        tmp_path,
        f"""
[general]
caption_extension = ".txt"
[[datasets]]
batch_size = 2
  [[datasets.subsets]]
  image_dir = '{tmp_path / "chars"}'
  num_repeats = 3
  class_tokens = "sks toy"
  caption_prefix = "photo of"
  [[datasets.subsets]]
  image_dir = '{tmp_path / "styles"}'
  caption_dropout_every_n_epochs = 1
[[datasets]]
batch_size = 1
resolution = 96
  [[datasets.subsets]]
  image_dir = '{tmp_path / "styles"}'
""",
    )
    cfg = DatasetConfig(resolution=(64, 64), seed=3, dataset_config=load_dataset_config(path, CLI))
    records = scan_train_data_dir(cfg)
    assert [(r.subset, r.path.name, r.num_repeats, r.dataset_index, r.batch_size) for r in records] == [
        ("chars", "a.png", 3, 0, 2),
        ("chars", "b.png", 3, 0, 2),
        ("styles", "s.png", 1, 0, 2),
        ("styles", "s.png", 1, 1, 1),
    ]
    assert records[1].caption == "sks toy"
    assert records[3].bucket == (96, 96)
    dataset = TrainDataset(records, cfg)
    assert dataset[(0, 1)]["caption"] == "photo of a, b, c"
    assert dataset[(1, 1)]["caption"] == "photo of sks toy"
    assert dataset[(2, 1)]["caption"] == ""  # dropped every epoch
    assert dataset[(3, 1)]["caption"] == "s1, s2"
    sampler = BucketBatchSampler(dataset, batch_size=1, seed=0)
    batches = list(sampler)
    # dataset 0: 7 examples in 64x64 (3 + 3 + 1) in batches of 2 -> 4; dataset 1: 1 batch. Never mixed.
    assert len(batches) == len(sampler) == 5
    assert sorted(len(b) for b in batches) == [1, 1, 2, 2, 2]
    for keys in batches:
        assert len({records[i].dataset_index for i, *_ in keys}) == 1
        collate_examples([dataset[key] for key in keys])
    assert [s["image_dir"] for s in dataset.subsets_info()] == ["chars", "styles", "styles"]
    assert dataset.subsets_info()[0]["caption_prefix"] == "photo of"


def test_dataset_config_from_command_line(tmp_path, caplog):
    write_image(tmp_path / "imgs" / "a.png", caption="x")
    path = write_toml(tmp_path, f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{tmp_path / 'imgs'}'\n")
    args = build_parser().parse_args(
        [
            "--pretrained_model_name_or_path",
            "m",
            "--output_dir",
            "o",
            "--dataset_config",
            str(path),
            "--train_data_dir",
            str(tmp_path / "missing"),
            "--caption_extension",
            ".txt",
            "--shuffle_caption",
            "--train_batch_size",
            "4",
            "--prior_loss_weight",
            "0.5",
        ]
    )
    data = data_config(args, seed=1)
    assert data.train_data_dir is None and "ignoring --train_data_dir" in caplog.text
    (section,) = data.dataset_config.datasets
    assert section.batch_size == 4 and section.subsets[0].caption.shuffle_caption
    assert data.prior_loss_weight == 0.5
    assert [r.path.name for r in scan_train_data_dir(data)] == ["a.png"]


@pytest.mark.slow
def test_train_end_to_end_with_dataset_config_reg_and_flip(tiny_sdxl, tmp_path):
    """The trainer as it is today runs a TOML with a reg subset, flip_aug and caption options, latents on disk."""
    import numpy as np

    import train_network

    for i, size in enumerate([(64, 64), (96, 64)]):
        write_image(tmp_path / "train" / f"t{i}.png", size, caption="toy, red ||| square, simple ||| best")
    write_image(tmp_path / "reg" / "r0.png", (64, 64))
    path = write_toml(
        tmp_path,
        f"""
[general]
flip_aug = true
caption_extension = ".txt"
keep_tokens_separator = "|||"
shuffle_caption = true
caption_tag_dropout_rate = 0.2
[[datasets]]
resolution = 64
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 128
batch_size = 2
  [[datasets.subsets]]
  image_dir = '{tmp_path / "train"}'
  num_repeats = 2
  [[datasets.subsets]]
  image_dir = '{tmp_path / "reg"}'
  class_tokens = "toy"
  is_reg = true
""",
    )
    argv = [
        "--pretrained_model_name_or_path",
        str(tiny_sdxl.single_file),
        "--dataset_config",
        str(path),
        "--output_dir",
        str(tmp_path / "out"),
        "--max_data_loader_n_workers",
        "0",
        "--seed",
        "1",
        "--max_train_steps",
        "2",
        "--cache_latents_to_disk",
        "--prior_loss_weight",
        "0.5",
        "--learning_rate",
        "1e-4",
    ]
    assert train_network.main(argv) == 0
    assert (tmp_path / "out" / "last.safetensors").is_file()
    for npz_path in [*(tmp_path / "train").glob("*.npz"), *(tmp_path / "reg").glob("*.npz")]:
        with np.load(npz_path) as npz:
            assert "latents_flipped" in npz.files
    assert len(list((tmp_path / "train").glob("*_sdxl.npz"))) == 2
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "last.safetensors"), "pt") as f:
        meta = f.metadata()
    # 2 train images x 2 repeats; the one reg image repeats to balance them (4 uses), loss weight 0.5.
    assert meta["ss_num_train_images"] == "4"
    assert meta["ss_num_reg_images"] != "0"
    assert json.loads(meta["ss_reg_dataset_dirs"])
    assert meta["ss_prior_loss_weight"] == "0.5"
    assert meta["ss_flip_aug"] == "False"  # the command line's value; per-subset values are in ss_datasets
    subsets = json.loads(meta["ss_datasets"])[0]["subsets"]
    assert len(subsets) == 2 and any(s.get("is_reg") for s in subsets)


def test_missing_caption_without_class_tokens_warns(tmp_path, caplog):
    import logging

    from library.data.dataset import DatasetConfig, scan_train_data_dir

    write_image(tmp_path / "1_" / "a.png", (64, 64))
    with caplog.at_level(logging.WARNING, logger="library.data.dataset"):
        records = scan_train_data_dir(DatasetConfig(tmp_path, caption_extension=".txt", resolution=(64, 64)))
    assert records[0].caption == ""
    assert "no caption for" in caplog.text and "a.png" in caplog.text


def test_shipped_example_config_parses():
    from library.data.dataset_config import load_dataset_config

    example = Path(__file__).resolve().parents[1] / "configs" / "examples" / "dataset.toml"
    group = load_dataset_config(example, {})
    assert len(group.datasets) == 1
    section = group.datasets[0]
    assert section.batch_size == 2 and len(section.subsets) == 1
    assert section.subsets[0].num_repeats == 10 and section.subsets[0].class_tokens == "toy"
