"""Caption files, tag shuffling and sd-scripts' caption options (prefix/suffix, dropout, kept tags)."""

import random

import pytest

from library.data.captions import CaptionOptions, process_caption, read_caption
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


# -- sd-scripts' caption options (issue 4) ---------------------------------------------------------------


def test_prefix_and_suffix_join_with_a_space_and_apply_without_shuffle():
    options = CaptionOptions(caption_prefix="photo of", caption_suffix="best quality")
    assert process_caption("toy, red", options, rng=random.Random(0)) == "photo of toy, red best quality"


def test_keep_tokens_separator_fixed_shuffled_fixed_suffix_fixed_seeds():
    options = CaptionOptions(shuffle_caption=True, keep_tokens_separator="|||", keep_tokens=5)
    caption = "1girl, solo ||| red hair, blue eyes, smile, hat ||| masterpiece, best quality"
    outputs = [process_caption(caption, options, rng=random.Random(seed)) for seed in range(3)]
    assert outputs == [
        "1girl, solo, smile, red hair, blue eyes, hat, masterpiece, best quality",
        "1girl, solo, hat, red hair, smile, blue eyes, masterpiece, best quality",
        "1girl, solo, blue eyes, smile, hat, red hair, masterpiece, best quality",
    ]
    # Without the separator in the caption, keep_tokens decides; without shuffle/tag dropout nothing changes.
    unshuffled = CaptionOptions(keep_tokens_separator="|||")
    assert process_caption("a, b ||| c", unshuffled, rng=random.Random(0)) == "a, b ||| c"


def test_tag_dropout_keeps_fixed_tags_fixed_seeds():
    options = CaptionOptions(caption_tag_dropout_rate=0.5, keep_tokens=1)
    caption = "toy, red, square, simple background, outdoors"
    outputs = [process_caption(caption, options, rng=random.Random(seed)) for seed in range(3)]
    assert outputs == ["toy, red, square", "toy, square, simple background", "toy, red, square"]
    assert (
        process_caption(caption, CaptionOptions(caption_tag_dropout_rate=1.0, keep_tokens=2), rng=random.Random(0))
        == "toy, red"
    )


def test_japanese_tags_custom_separator_prefix_shuffle_and_drop():
    options = CaptionOptions(
        shuffle_caption=True, caption_tag_dropout_rate=0.3, caption_separator="、", caption_prefix="画風", keep_tokens=1
    )
    outputs = [process_caption("猫、青い目、帽子、笑顔", options, rng=random.Random(s)) for s in range(3)]
    assert outputs == ["画風 猫, 笑顔, 帽子", "画風 猫, 笑顔, 青い目", "画風 猫, 笑顔, 青い目"]


def test_caption_dropout_rate_and_every_n_epochs():
    options = CaptionOptions(caption_dropout_rate=0.5)
    assert [process_caption("a", options, rng=random.Random(s)) for s in range(8)] == [
        "a",
        "",
        "a",
        "",
        "",
        "a",
        "a",
        "",
    ]
    # Dropout comes after the prefix: a dropped caption is empty, prefix included.
    every = CaptionOptions(caption_dropout_every_n_epochs=3, caption_prefix="p", shuffle_caption=True)
    assert [process_caption("a, b", every, rng=random.Random(0), epoch=e) for e in range(1, 7)] == [
        "p a, b",
        "p a, b",
        "",
        "p a, b",
        "p a, b",
        "",
    ]


def test_shuffle_only_draws_the_same_as_before():
    # Dropout draws only when its rate is > 0, so plain shuffles keep their old fixed-seed outputs.
    caption = "a, b, c, d, e"
    assert process_caption(
        caption, CaptionOptions(shuffle_caption=True, keep_tokens=1), rng=random.Random(3)
    ) == process_caption(caption, shuffle=True, keep_tokens=1, rng=random.Random(3))


def test_read_caption_japanese_utf8_first_line(tmp_path):
    image = tmp_path / "画像.png"
    (tmp_path / "画像.txt").write_text("\n猫、青い目\n二行目\n", encoding="utf-8")
    assert read_caption(image, ".txt", "class") == "猫、青い目"


@pytest.mark.parametrize(
    "field, value",
    [("caption_dropout_rate", 1.5), ("caption_tag_dropout_rate", -0.1), ("keep_tokens", -1), ("caption_separator", "")],
)
def test_bad_caption_options_refused(field, value):
    with pytest.raises(UserInputError, match=field):
        CaptionOptions(**{field: value})
