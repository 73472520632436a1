"""Decoding every kind of image users bring: formats, EXIF orientation, alpha, modes, bit depths, names."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from library.data.dataset import DatasetConfig, TrainDataset, scan_train_data_dir
from library.data.images import image_size, load_image_rgb
from library.errors import UserInputError


def _exif_rotated(path: Path) -> Path:
    """A 40x20 JPEG (left half red, right half blue) with EXIF orientation 6 (display rotated 90° clockwise)."""
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, exif=exif, quality=95)
    return path


@pytest.mark.parametrize(
    "name, make, expected_pixel",
    [
        ("a.jpg", lambda p: Image.new("RGB", (32, 24), (200, 10, 10)).save(p, quality=95), (200, 10, 10)),
        ("a.png", lambda p: Image.new("RGB", (32, 24), (10, 200, 10)).save(p), (10, 200, 10)),
        ("a.webp", lambda p: Image.new("RGB", (32, 24), (10, 10, 200)).save(p, lossless=True), (10, 10, 200)),
        ("a.bmp", lambda p: Image.new("RGB", (32, 24), (1, 2, 3)).save(p), (1, 2, 3)),
        ("gray.png", lambda p: Image.new("L", (32, 24), 77).save(p), (77, 77, 77)),
        ("rgba.png", lambda p: Image.new("RGBA", (32, 24), (0, 0, 0, 0)).save(p), (255, 255, 255)),  # on white
        ("half.png", lambda p: Image.new("RGBA", (32, 24), (0, 0, 0, 128)).save(p), (127, 127, 127)),
        ("la.png", lambda p: Image.new("LA", (32, 24), (0, 0)).save(p), (255, 255, 255)),
        (
            "palette.png",
            lambda p: Image.new("RGB", (32, 24), (30, 60, 90)).convert("P", palette=Image.Palette.ADAPTIVE).save(p),
            (30, 60, 90),
        ),
        ("cmyk.jpg", lambda p: Image.new("CMYK", (32, 24), (0, 255, 255, 0)).save(p, quality=100), (255, 0, 0)),
        ("gray16.png", lambda p: Image.fromarray(np.full((24, 32), 0x8080, np.uint16)).save(p), (128, 128, 128)),
        ("rgb16.png", None, (128, 64, 32)),
        ("名前 ü.png", lambda p: Image.new("RGB", (32, 24), (5, 6, 7)).save(p), (5, 6, 7)),
        ("bilevel.png", lambda p: Image.new("1", (32, 24), 1).save(p), (255, 255, 255)),
    ],
)
def test_image_kinds_decode_to_rgb(tmp_path, name, make, expected_pixel):
    path = tmp_path / name
    if make is None:  # 16-bit RGB PNG (PIL cannot write one): a hand-made file through numpy + zlib
        _write_rgb16_png(path, (24, 32), (0x8080, 0x4040, 0x2020))
    else:
        make(path)
    assert image_size(path) == (32, 24)
    image = load_image_rgb(path)
    assert image.mode == "RGB" and image.size == (32, 24)
    assert np.abs(np.asarray(image)[12, 16].astype(int) - expected_pixel).max() <= 3


def _write_rgb16_png(path: Path, shape, value) -> None:
    import struct
    import zlib

    height, width = shape
    row = b"\x00" + np.array(value, ">u2").tobytes() * width

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * height))
        + chunk(b"IEND", b"")
    )


def test_exif_orientation_applied_to_size_and_pixels(tmp_path):
    path = _exif_rotated(tmp_path / "rotated.jpg")
    assert image_size(path) == (20, 40)
    pixels = np.asarray(load_image_rgb(path)).astype(int)
    assert pixels.shape == (40, 20, 3)
    # Rotated 90° clockwise for display: the left (red) half is now on top.
    assert pixels[5, 10, 0] > 200 and pixels[35, 10, 2] > 200


@pytest.mark.parametrize("data", [b"", b"\xff\xd8\xff\xe0 truncated jpeg", b"GIF89a not a png"])
def test_corrupt_images_name_the_file(tmp_path, data):
    path = tmp_path / "bad.png"
    path.write_bytes(data)
    with pytest.raises(UserInputError, match="bad.png"):
        image_size(path)


def test_truncated_png_is_caught_at_scan(tmp_path):
    path = tmp_path / "t.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserInputError, match="t.png"):
        image_size(path)


def test_unicode_tree_trains(tmp_path):
    root = tmp_path / "データ"
    folder = root / "3_猫 キャラ"
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64), (1, 2, 3)).save(folder / "画像①.png")
    (folder / "画像①.txt").write_text("猫、青い目", encoding="utf-8")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(folder / "無題.webp")
    cfg = DatasetConfig(root, caption_extension=".txt", resolution=(64, 64))
    dataset = TrainDataset(scan_train_data_dir(cfg), cfg)
    assert [(r.path.name, r.subset, r.class_tokens, r.caption) for r in dataset.records] == [
        ("無題.webp", "3_猫 キャラ", "猫 キャラ", "猫 キャラ"),
        ("画像①.png", "3_猫 キャラ", "猫 キャラ", "猫、青い目"),
    ]
    assert dataset[(1, 1)]["image"].shape == (3, 64, 64)
    assert dataset.tag_frequency() == {"3_猫 キャラ": {"猫、青い目": 1, "猫 キャラ": 1}}
