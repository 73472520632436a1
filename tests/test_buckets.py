"""Bucket maths against numbers worked out by hand from sd-scripts' algorithm."""

import random

import pytest

from library.data.buckets import (
    crop_offsets,
    make_bucket_resolutions,
    no_upscale_bucket,
    resize_to_cover,
    sdscripts_crop_ltrb,
    select_bucket,
)

# resolution 1024, min 512, max 2048, steps 64 (the seed command). Per width w: h = min(2048, 1048576 // w // 64 * 64).
LANDSCAPE_1024_512_2048 = [
    (1088, 960),
    (1152, 896),
    (1216, 832),
    (1280, 768),
    (1344, 768),
    (1408, 704),
    (1472, 704),
    (1536, 640),
    (1600, 640),
    (1664, 576),
    (1728, 576),
    (1792, 576),
    (1856, 512),
    (1920, 512),
    (1984, 512),
    (2048, 512),
]


def test_buckets_1024_min512_max2048():
    buckets = make_bucket_resolutions((1024, 1024), 512, 2048, 64)
    expected = sorted(LANDSCAPE_1024_512_2048 + [(h, w) for w, h in LANDSCAPE_1024_512_2048] + [(1024, 1024)])
    assert buckets == expected
    assert len(buckets) == 33
    for bucket in [(1024, 1024), (896, 1152), (1152, 896), (512, 2048), (1344, 768), (768, 1344)]:
        assert bucket in buckets
    assert all(w * h <= 1024 * 1024 for w, h in buckets)


def test_buckets_1024_defaults_cap_at_1024():
    # Every width from 256 to 1024 has room for h >= 1024, so max_size caps it: only (w, 1024) and (1024, w).
    buckets = make_bucket_resolutions((1024, 1024))
    sides = list(range(256, 1024, 64))
    expected = sorted([(w, 1024) for w in sides] + [(1024, w) for w in sides] + [(1024, 1024)])
    assert buckets == expected
    assert len(buckets) == 25
    assert (896, 1152) not in buckets


def test_buckets_512_defaults():
    buckets = make_bucket_resolutions((512, 512), 256, 1024, 64)
    landscape = [(576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256)]
    assert buckets == sorted(landscape + [(h, w) for w, h in landscape] + [(512, 512)])
    assert len(buckets) == 17


def test_buckets_non_square_resolution_uses_area():
    # 1216x832 has area 1011712: square side floor(1005.8 / 64) * 64 = 960.
    buckets = make_bucket_resolutions((1216, 832), 512, 2048, 64)
    assert (960, 960) in buckets
    assert (1024, 1024) not in buckets


BUCKETS = make_bucket_resolutions((1024, 1024), 512, 2048, 64)


@pytest.mark.parametrize(
    "image, bucket",
    [
        ((838, 628), (1152, 896)),  # 1.334: 1152/896 = 1.286 beats 1216/832 = 1.462
        ((1000, 562), (1344, 768)),  # 1.779: 1.75 beats 2.0
        ((2000, 1000), (1408, 704)),  # exactly 2.0
        ((3000, 1000), (1728, 576)),  # exactly 3.0
        ((562, 1000), (768, 1344)),
        ((4000, 4000), (1024, 1024)),
        ((896, 1152), (896, 1152)),  # the image size is itself a bucket
    ],
)
def test_select_bucket_nearest_aspect(image, bucket):
    assert select_bucket(image, BUCKETS) == bucket


def test_select_bucket_tie_goes_to_first():
    assert select_bucket((100, 100), [(64, 128), (128, 64)]) == (64, 128)


@pytest.mark.parametrize(
    "image, bucket, resized, crop",
    [
        ((838, 628), (1152, 896), (1196, 896), (22, 0)),  # 838 * 896 / 628 = 1195.6 -> 1196
        ((1000, 562), (1344, 768), (1367, 768), (11, 0)),  # 1000 * 768 / 562 = 1366.5 -> 1367
        ((620, 827), (896, 1152), (896, 1195), (0, 21)),  # 827 * 896 / 620 = 1195.1 -> 1195
        ((2000, 1000), (1408, 704), (1408, 704), (0, 0)),
        ((300, 300), (1024, 1024), (1024, 1024), (0, 0)),  # upscaled
    ],
)
def test_resize_to_cover_and_centre_crop(image, bucket, resized, crop):
    assert resize_to_cover(image, bucket) == resized
    assert crop_offsets(resized, bucket, random_crop=False) == crop


def test_random_crop_in_range_and_seeded():
    offsets = {crop_offsets((1196, 896), (1152, 896), True, random.Random(seed)) for seed in range(50)}
    assert all(0 <= left <= 44 and top == 0 for left, top in offsets)
    assert len(offsets) > 5
    assert crop_offsets((1196, 896), (1152, 896), True, random.Random(3)) == crop_offsets(
        (1196, 896), (1152, 896), True, random.Random(3)
    )


def test_crop_offsets_rejects_uncovered():
    with pytest.raises(ValueError):
        crop_offsets((100, 100), (128, 128), random_crop=False)


def test_no_upscale_small_image_keeps_size_and_floors_bucket():
    assert no_upscale_bucket((500, 300), 1024 * 1024, 64) == ((448, 256), (500, 300))


def test_no_upscale_large_image_shrinks_to_area():
    # aspect 1.5: sqrt(1048576 * 1.5) = 1254.1 wide, 836.1 high. Snapping the height to 832 keeps the
    # aspect closer (1216/832 = 1.46) than snapping the width (1216/768 = 1.58): resized 1248x832.
    assert no_upscale_bucket((3000, 2000), 1024 * 1024, 64) == ((1216, 832), (1248, 832))


def test_no_upscale_too_small_raises():
    with pytest.raises(ValueError):
        no_upscale_bucket((40, 300), 1024 * 1024, 64)


def test_sdscripts_letterbox_crop():
    # 838x628 fitted into 1152x896 by width: 1152 x 863.3, centred 16 px down.
    left, top, right, bottom = sdscripts_crop_ltrb((1152, 896), (838, 628))
    assert (left, top, right) == (0, 16, 1152)
    assert bottom == pytest.approx(16 + 1152 * 628 / 838)
