"""The sample images a run saved, found by their sd-scripts names (`library.train.sample_prompts.sample_file_name`):

    <output_dir>/sample/<output_name>_<step:06d or e<epoch:06d>>_<prompt:02d>_<YYYYmmddHHMMSS>_<seed>.png

(no `<output_name>_` when the run had none). Epoch samples (`e000002`) are taken at an epoch's end; `e000000` is
the sample before training. A grid has one row per prompt and one column per sampling point; when a point was
sampled twice (a rerun into the same folder) the newest image wins.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

THUMBNAIL_SIDE = 256
"""Longest side of a sample in a grid: a 1024 px SDXL sample (about 1.5 MB) becomes about 20 kB, so a page with
a hundred samples stays a few megabytes and builds in seconds."""

_NAME = re.compile(
    r"^(?:(?P<name>.*)_)?(?P<point>e\d{6,}|\d{6,})_(?P<prompt>\d{2,})_(?P<time>\d{14})_(?P<seed>\d+)\.png$"
)


@dataclass(frozen=True, order=True)
class SamplePoint:
    """When a sample was taken: after optimizer step `number`, or at the end of epoch `number` (`epoch` True)."""

    epoch: bool
    number: int

    @property
    def label(self) -> str:
        if self.epoch:
            return "before training" if self.number == 0 else f"epoch {self.number}"
        return "before training" if self.number == 0 else f"step {self.number}"


@dataclass(frozen=True)
class SampleFile:
    output_name: str
    point: SamplePoint
    prompt: int
    timestamp: str
    seed: int
    path: Path


def parse_sample_name(path: Path) -> SampleFile | None:
    """The parts of a sample image's name, or None when `path` is not named like one."""
    found = _NAME.match(path.name)
    if found is None:
        return None
    point = found["point"]
    return SampleFile(
        found["name"] or "",
        SamplePoint(point.startswith("e"), int(point.lstrip("e"))),
        int(found["prompt"]),
        found["time"],
        int(found["seed"]),
        path,
    )


@dataclass(frozen=True)
class SampleSet:
    """One run's samples: `images[(point, prompt)]` is the newest image of that prompt at that point."""

    images: dict[tuple[SamplePoint, int], Path] = field(default_factory=dict)
    seeds: dict[int, int] = field(default_factory=dict)
    """The seed each prompt index was sampled with (the newest image's)."""

    def __bool__(self) -> bool:
        return bool(self.images)

    @property
    def prompts(self) -> list[int]:
        return sorted({prompt for _, prompt in self.images})

    def points(self, steps_per_epoch: float | None = None) -> list[SamplePoint]:
        """The sampling points in training order: epoch points are placed at their step when `steps_per_epoch`
        is known (else after the step points); the sample before training comes first."""

        def order(point: SamplePoint) -> tuple[float, int]:
            if point.number == 0:
                return (-1.0, 0)
            if not point.epoch:
                return (float(point.number), 0)
            return (point.number * steps_per_epoch if steps_per_epoch else float("inf"), point.number)

        return sorted({point for point, _ in self.images}, key=order)


def find_samples(output_dir: Path, output_name: str) -> SampleSet:
    """The samples of run `output_name` in `output_dir/sample` (an empty set when there are none)."""
    folder = Path(output_dir) / "sample"
    newest: dict[tuple[SamplePoint, int], SampleFile] = {}
    if folder.is_dir():
        for path in folder.glob("*.png"):
            sample = parse_sample_name(path)
            if sample is None or sample.output_name != output_name:
                continue
            key = (sample.point, sample.prompt)
            if key not in newest or sample.timestamp > newest[key].timestamp:
                newest[key] = sample
    seeds = {prompt: sample.seed for (_, prompt), sample in sorted(newest.items(), key=lambda kv: kv[1].timestamp)}
    return SampleSet({key: sample.path for key, sample in newest.items()}, seeds)


def output_names_with_samples(output_dir: Path) -> list[str]:
    """The output names that have sample images in `output_dir/sample`."""
    folder = Path(output_dir) / "sample"
    names = (
        {sample.output_name for path in folder.glob("*.png") if (sample := parse_sample_name(path)) is not None}
        if folder.is_dir()
        else set()
    )
    return sorted(names)


def thumbnail(path: Path, side: int = THUMBNAIL_SIDE) -> Image.Image:
    """The image at `path` scaled down (never up) to fit `side` x `side`, as RGB."""
    with Image.open(path) as image:
        image.draft("RGB", (side, side))  # JPEG decodes at a reduced size directly
        image = image.convert("RGB")
    image.thumbnail((side, side), Image.Resampling.LANCZOS)
    return image


def thumbnail_jpeg(path: Path, side: int = THUMBNAIL_SIDE) -> bytes:
    buffer = io.BytesIO()
    thumbnail(path, side).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()
