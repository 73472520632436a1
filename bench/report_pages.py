#!/usr/bin/env python
"""How long the report pages take to build from runs on disk: the run report (`<output_name>_report.html`, built at
every save and at the end of training) of each run, and the comparison of all of them (`tools/compare_runs.py`).

    python bench/report_pages.py RUN_DIR [RUN_DIR ...] [--output_name NAME] [--repeats 3] [--out DIR]

Prints the one-time import (matplotlib) and each page's median build time over the repeats, with what the page
holds (steps, samples, size). Pages are written under --out (default: a temporary folder), never over the runs'.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import argparse  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402


def timed(action, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = action()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--output_name", default=None, help="the run's output name (default: the one in each folder)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    from library.report.compare import compare_runs, write_comparison
    from library.report.run_page import write_run_report
    from library.report.sources import read_runs

    print(f"import (matplotlib and the report modules): {time.perf_counter() - started:.2f} s")
    out = args.out or Path(tempfile.mkdtemp(prefix="report_pages_"))
    for folder in args.runs:
        for run in read_runs(folder):
            if args.output_name and run.name != args.output_name:
                continue
            copy = out / folder.name  # a copy: the page goes beside the run's files, and the run stays as it was
            shutil.copytree(folder, copy, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*-state", "*.safetensors"))
            seconds, page = timed(lambda copy=copy, name=run.name: write_run_report(copy, name), args.repeats)
            print(
                f"run report {folder}/{run.name}: {seconds:.2f} s median of {args.repeats} "
                f"({len(run.history.loss.steps)} steps, {len(run.samples.images)} samples, "
                f"{page.stat().st_size / 1e6:.2f} MB)"
            )
    seconds, page = timed(
        lambda: write_comparison(compare_runs(args.runs, sort="loraplus_lr_ratio"), out / "compare"), args.repeats
    )
    print(
        f"comparison of {len(args.runs)} folders: {seconds:.2f} s median of {args.repeats} "
        f"(page {page.stat().st_size / 1e6:.2f} MB, {len(list(page.parent.glob('*.png')))} PNGs) -> {page}"
    )


if __name__ == "__main__":
    main()
