"""Temporary files and folders a killed run left behind, found by the exact names our writers give them and
removed by the next run.

A run killed with `kill -9` (or by a power cut) mid-write leaves what its atomic writers had not yet renamed:
`.<target>.<random>.<pid>.tmp` files (`library.files.atomic`), `.<state>.<random>.<pid>.tmp` folders and, between the
two renames of a state replace, the previous state as `.<state>.old-<pid>` (`library.files.atomic.replace_folder`).
Nothing else is touched: a name must parse as one of those *and* its target must be a name this trainer gives (for the
output folder: a file of this `output_name`, `library.train.saving.output_file_pattern`; beside images: a latent or
text-encoder cache). User files never match.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import psutil

from library.files.atomic import parse_old_folder_name, parse_temp_name

logger = logging.getLogger(__name__)

SAMPLE_FOLDER = "sample"
"""Where sample images go (`library.train.sampling`), inside the output folder."""
CACHE_SUFFIXES = ("_sdxl.npz", "_te_outputs.npz")
"""The latent and text-encoder cache files written beside images."""
CACHE_TEMP_MIN_AGE_S = 60.0
"""A cache temporary untouched for this long is not being written (a cache file is written in one go, in well
under a second): old enough to remove once its writer is gone, young enough not to pile up."""


def _writer_alive(pid: int | None) -> bool:
    """Whether the process that named a temporary file still runs here (never this process: it has no writes
    in flight when it cleans up)."""
    return pid is not None and pid != os.getpid() and psutil.pid_exists(pid)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temp_files(output_dir: str | os.PathLike, own: re.Pattern[str]) -> list[Path]:
    """Remove the temporary files and folders that an interrupted run left in `output_dir` (and its `sample/`
    folder) for targets whose names `own` matches (the run's own names: `library.train.saving.output_file_pattern`);
    returns what was removed.

    Run it only while holding the output's lock: then no other run writes these names, and every match is
    stale (one whose writer process still runs here is kept all the same). A previous state folder that a
    killed save had moved aside (`.<state>.old-<pid>`) is renamed back when the state folder itself is missing,
    so the last complete state is never lost; otherwise it is removed.
    """
    output_dir = Path(output_dir)
    removed: list[Path] = []
    for folder in (output_dir, output_dir / SAMPLE_FOLDER):
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            temp = parse_temp_name(entry.name)
            if temp is not None and own.fullmatch(temp[0]) and not _writer_alive(temp[1]):
                _remove(entry)
                removed.append(entry)
                continue
            old = parse_old_folder_name(entry.name)
            if old is None or not own.fullmatch(old[0]) or not entry.is_dir() or _writer_alive(old[1]):
                continue
            target = entry.with_name(old[0])
            if target.exists():
                _remove(entry)
            else:
                os.replace(entry, target)
                logger.warning("restored %s: an interrupted save had moved it aside as %s", target, entry.name)
            removed.append(entry)
    if removed:
        logger.warning("removed %d temporary file(s) left in %s by an interrupted run", len(removed), output_dir)
    return removed


def remove_stale_cache_temps(
    folders: Iterable[str | os.PathLike],
    suffixes: Sequence[str] = CACHE_SUFFIXES,
    min_age_s: float = CACHE_TEMP_MIN_AGE_S,
) -> list[Path]:
    """Remove the cache temporaries (targets ending in one of `suffixes`) that killed runs left in the image
    `folders`; returns what was removed.

    Image folders are shared: another run may be caching the same images right now, and no lock covers them.
    So a temporary is removed only when its writer process no longer runs here and it has not been touched
    for `min_age_s` seconds (a writer on another machine, whose process id means nothing here, is still
    writing a fresh file).
    """
    now = time.time()
    removed: list[Path] = []
    for folder in dict.fromkeys(Path(folder) for folder in folders):
        try:
            entries = list(folder.iterdir())
        except OSError:
            continue
        for entry in entries:
            temp = parse_temp_name(entry.name)
            if temp is None or not temp[0].endswith(tuple(suffixes)) or _writer_alive(temp[1]):
                continue
            try:
                age = now - entry.stat().st_mtime
            except OSError:
                continue
            if age >= min_age_s:
                _remove(entry)
                removed.append(entry)
    if removed:
        logger.warning("removed %d cache temporary file(s) left by an interrupted run", len(removed))
    return removed
