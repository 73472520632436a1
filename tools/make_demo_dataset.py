"""Write a small generated training set: `DIR/<repeats>_<name>/NNN.png` with a `.txt` caption beside each.

Coloured shapes on plain or two-tone backgrounds, in square and non-square sizes (1:1, 4:3, 3:4, 16:9, ...),
so bucketing has something to do. Usage: python tools/make_demo_dataset.py DIR [--count N] ...
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import random  # noqa: E402

from PIL import Image, ImageDraw  # noqa: E402

ASPECTS: tuple[tuple[int, int], ...] = ((1, 1), (4, 3), (3, 4), (16, 9), (9, 16), (3, 2), (2, 3))
"""(w, h) aspect ratios, each used for two images in turn, so batches of 2 fill their buckets."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "grey": (128, 128, 128),
    "black": (20, 20, 20),
    "beige": (225, 210, 180),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")


def demo_size(aspect: tuple[int, int], min_side: int, max_side: int, rng: random.Random) -> tuple[int, int]:
    """A (w, h) of about `aspect` whose sides lie in [min_side, max_side] where the aspect allows."""
    long_ratio = max(aspect) / min(aspect)
    lowest_long = min(max_side, max(min_side, round(min_side * long_ratio)))
    long_side = rng.randint(lowest_long, max_side)
    short_side = max(min_side, min(max_side, round(long_side / long_ratio)))
    return (long_side, short_side) if aspect[0] >= aspect[1] else (short_side, long_side)


def draw_demo_image(
    size: tuple[int, int],
    shape: str,
    colour: tuple[int, int, int],
    background: tuple[int, int, int],
    rng: random.Random,
) -> Image.Image:
    """One picture: `shape` in `colour` on `background`, with a lighter band for a little structure."""
    width, height = size
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    band = tuple(min(255, c + 25) for c in background)
    draw.rectangle((0, height * 2 // 3, width, height), fill=band)
    extent = min(width, height) * rng.uniform(0.35, 0.6)
    cx = rng.uniform(extent / 2, width - extent / 2)
    cy = rng.uniform(extent / 2, height - extent / 2)
    box = (cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2)
    if shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "circle":
        draw.ellipse(box, fill=colour)
    else:
        draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=colour)
    return image


def make_demo_dataset(
    directory: Path,
    count: int = 4,
    min_side: int = 512,
    max_side: int = 1024,
    repeats: int = 1,
    name: str = "toy",
    seed: int = 0,
) -> Path:
    """Write `count` images and captions to `directory/<repeats>_<name>/` and return that folder.

    Captions are "name, <colour> <shape>, <background> background"; the same seed gives the same files.
    """
    if count < 1 or min_side < 8 or max_side < min_side or repeats < 1:
        raise ValueError("need count >= 1, 8 <= min_side <= max_side and repeats >= 1")
    rng = random.Random(seed)
    folder = Path(directory) / f"{repeats}_{name}"
    folder.mkdir(parents=True, exist_ok=True)
    for number in range(count):
        size = demo_size(ASPECTS[(number // 2) % len(ASPECTS)], min_side, max_side, rng)
        shape = SHAPES[number % len(SHAPES)]
        colour_name = rng.choice(sorted(COLOURS))
        background_name = rng.choice(sorted(BACKGROUNDS))
        image = draw_demo_image(size, shape, COLOURS[colour_name], BACKGROUNDS[background_name], rng)
        image.save(folder / f"{number:03d}.png")
        caption = f"{name}, {colour_name} {shape}, {background_name} background, simple background\n"
        (folder / f"{number:03d}.txt").write_text(caption, encoding="utf-8")
    return folder


def main(argv: list[str] | None = None) -> None:
    """Command line entry: parse the flags and write the set."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="train_data_dir to create (or add a folder to)")
    parser.add_argument("--count", type=int, default=4, help="number of images (default 4)")
    parser.add_argument("--min-side", type=int, default=512, help="shortest side in pixels (default 512)")
    parser.add_argument("--max-side", type=int, default=1024, help="longest side in pixels (default 1024)")
    parser.add_argument("--repeats", type=int, default=1, help="repeat count in the folder name (default 1)")
    parser.add_argument("--name", default="toy", help="class token, also the folder name (default toy)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    folder = make_demo_dataset(
        args.directory, args.count, args.min_side, args.max_side, args.repeats, args.name, args.seed
    )
    print(f"wrote {args.count} images and captions to {folder}")


if __name__ == "__main__":
    main()
