#!/usr/bin/env python
"""Compare training runs on one HTML page, with the figures also as PNG files for a post.

    python tools/compare_runs.py RUN [RUN ...] [--sort loraplus_lr_ratio] [--out compare_out]

RUN is a training output folder (its <output_name>_report.json and sample/ images; a folder holding several
runs gives each), one <output_name>_report.json, or a TensorBoard logging folder (--logging_dir, or one run's
folder in it). The page overlays the runs' loss, validation loss, learning rates and LoRA diagnostics, labels each
run by the settings in which the runs differ, tabulates the validation loss at equal steps and the step at which
each run first reaches the best plain-LoRA run's final validation loss, and shows one sample grid per prompt
(rows = runs in --sort order, columns = sampling points). What a run lacks is said on the page.
Writes OUT/compare.html, OUT/loss.png, OUT/learning_rate.png, OUT/lora_diagnostics.png, OUT/samples_promptNN.png.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import argparse  # noqa: E402
from collections.abc import Sequence  # noqa: E402

from library.errors import UserInputError  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="compare_runs.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="output folder, report JSON, or TensorBoard log folder")
    parser.add_argument(
        "--sort",
        default=None,
        metavar="SETTING",
        help="order the runs by this setting (e.g. loraplus_lr_ratio, unet_lr); default: as given",
    )
    parser.add_argument(
        "--out", default="compare_out", help="folder for compare.html and the PNGs (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    from library.report.compare import compare_runs, write_comparison

    try:
        comparison = compare_runs(args.runs, sort=args.sort)
        page = write_comparison(comparison, args.out)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for run, label in zip(comparison.runs, comparison.labels):
        print(f"{label}: {run.source}" + (f" ({'; '.join(run.notes)})" if run.notes else ""))
    print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
