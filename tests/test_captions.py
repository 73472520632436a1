"""Caption files and tag shuffling."""

import random

import pytest

from library.captions import process_caption, read_caption
from library.errors import UserInputError

CAPTION = "toy, red, blue, green, square, simple background"


def test_read_caption_first_non_empty_line(tmp_path):
    image = tmp_path / "001.png"
    (tmp_path / "001.txt").write_text("\n  toy, red square  \nsecond line\n", encoding="utf-8")
    assert read_caption(image, ".txt", "fallback") == "toy, red square"


def test_read_caption_strips_bom(tmp_path):
    (tmp_path / "a.caption").write_bytes("\ufefftoy, hat\r\n".encode("utf-8"))
    assert read_caption(tmp_path / "a.jpg", ".caption", "x") == "toy, hat"


def test_read_caption_fallback_without_file(tmp_path):
    (tmp_path / "a.txt").write_text("not this extension", encoding="utf-8")
    assert read_caption(tmp_path / "a.png", ".caption", "sks toy") == "sks toy"


def test_read_caption_empty_file_is_empty_caption(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n", encoding="utf-8")
    assert read_caption(tmp_path / "a.png", ".txt", "toy") == ""


def test_read_caption_not_utf8_names_file(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"caf\xe9, \xff\xfe")
    with pytest.raises(UserInputError, match=r"a\.txt.*UTF-8"):
        read_caption(tmp_path / "a.png", ".txt", "toy")


def test_process_caption_no_shuffle_is_identity():
    assert process_caption(" a,b ,c ", shuffle=False, keep_tokens=1, rng=random.Random(0)) == " a,b ,c "


@pytest.mark.parametrize(
    "seed, expected",
    [
        (0, "toy, green, blue, red, simple background, square"),
        (1, "toy, green, square, simple background, red, blue"),
        (2, "toy, green, blue, square, simple background, red"),
    ],
)
def test_process_caption_fixed_seeds(seed, expected):
    assert process_caption(CAPTION, shuffle=True, keep_tokens=1, rng=random.Random(seed)) == expected


def test_process_caption_keeps_tokens_and_tags():
    tags = [t.strip() for t in CAPTION.split(",")]
    outputs = set()
    for seed in range(30):
        out = process_caption(CAPTION, shuffle=True, keep_tokens=2, rng=random.Random(seed)).split(", ")
        assert out[:2] == ["toy", "red"]
        assert sorted(out) == sorted(tags)
        outputs.add(tuple(out))
    assert len(outputs) > 5


def test_process_caption_custom_separator_and_empty_tags():
    out = process_caption("a; b;; c;", shuffle=True, keep_tokens=3, rng=random.Random(0), separator=";")
    assert out == "a, b, c"


def test_process_caption_keep_more_than_tags():
    assert process_caption("a, b", shuffle=True, keep_tokens=5, rng=random.Random(0)) == "a, b"
