#!/usr/bin/env python
"""The fault matrix: every fault of bench/fault_catalogue.py is run against the real command line, next to the files of
a good finished run, and tabulated with its exit code, the line it printed, whether a traceback appeared and whether
any earlier file changed.

    python bench/fault_table.py [--workdir DIR] [--only PATTERN] [--json PATH] [--list]

1. builds the tiny SDXL (tools/make_tiny_sdxl.py) and a 4-image data set (tools/make_demo_dataset.py), and makes
   one good run (`run.safetensors`, its EMA file, the `run-state` folder, latent and text-encoder caches beside
   the images): the "earlier files";
2. each fault gets a copy of those (its case folder), is set up (a damaged file, a file in the way...) and run as
   a subprocess of `python train_network.py ...` with the same --output_dir and --output_name as the earlier run,
   so a fault that slipped through would overwrite them. Faults that need a patch (a full disk, a tiny free-disk
   figure) run this script's in-process runner in a subprocess (`--child`), which patches and calls
   `train_network.run(argv)`; signal faults send real signals to real processes;
3. every file of the case folder is hashed before and after: a changed or removed file is a fault's failure
   (unless the fault says why it may change, e.g. a damaged cache being recomputed); new files are listed.

Prints a markdown table; exits 1 when any fault printed a traceback, changed an earlier file or gave another exit
code than expected, so it doubles as a check. Most faults stop before the model loads (a few seconds each, the
interpreter's imports); the rest train the tiny model 1-2 steps at 64 px. The machinery (case folders, running,
snapshots) is bench/fault_harness.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import asdict  # noqa: E402

from bench.fault_harness import Row, child_main, markdown, prepare_workspace, run_matrix, select  # noqa: E402


# --- Command line -----------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:  # a fault's patched run (see bench.fault_harness.child_main)
        return child_main(argv[1], argv[3:])
    from bench.fault_catalogue import FAULTS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep the model, data, earlier run and case folders here (reused on the next call)",
    )
    parser.add_argument("--only", default=None, help="run the faults whose key, class or title matches this regex")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON to this file")
    parser.add_argument("--list", action="store_true", help="list the faults and stop")
    args = parser.parse_args(argv)
    faults = select(FAULTS, args.only)
    if args.list:
        for item in faults:
            print(f"{item.number:3d}  {item.key:24s} {item.group:26s} {item.title}")
        return 0
    if not faults:
        parser.error(f"--only {args.only!r} matches no fault (see --list)")
    with tempfile.TemporaryDirectory(prefix="fault_table_") as scratch:
        root = args.workdir or Path(scratch)
        started = time.monotonic()
        print(f"preparing the tiny model, data and earlier run in {root} ...", file=sys.stderr, flush=True)
        ws = prepare_workspace(root)

        def progress(row: Row) -> None:
            state = "skipped" if row.skipped else ("ok" if row.ok else "FAILED")
            print(
                f"[{row.number:2d}] {row.key}: exit {row.exit}, {state} ({row.seconds:.0f} s)",
                file=sys.stderr,
                flush=True,
            )

        rows, shared_intact = run_matrix(ws, faults, progress)
        seconds = time.monotonic() - started
    print(markdown(rows))
    bad = [row for row in rows if not row.ok]
    print(
        f"\n{len(rows)} faults ({sum(bool(r.skipped) for r in rows)} skipped) in {seconds:.0f} s; "
        f"{len(bad)} failed{': ' + ', '.join(r.key for r in bad) if bad else ''}; shared model, data and earlier "
        f"run {'unchanged' if shared_intact else 'CHANGED'}"
    )
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "seconds": round(seconds, 1),
                    "shared_intact": shared_intact,
                    "rows": [asdict(row) | {"ok": row.ok} for row in rows],
                },
                indent=1,
            )
            + "\n"
        )
    return 0 if not bad and shared_intact else 1


if __name__ == "__main__":
    sys.exit(main())
