"""Atomic file writes: write beside the target, then rename, so a crash never leaves half a file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it replaces `target` in one rename.

    On an exception the temporary file is removed and whatever was at `target` stays untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (UTF-8)."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_npz_atomic(target: str | os.PathLike, arrays: dict, *, what: str, flag: str) -> None:
    """Write a numpy .npz cache atomically; an unwritable folder is one UserInputError line naming `flag`."""
    import numpy as np

    from library.errors import UserInputError

    try:
        with atomic_path(target) as tmp, open(tmp, "wb") as handle:  # a handle: savez adds no suffix
            np.savez(handle, **arrays)
    except OSError as error:
        raise UserInputError(
            f"cannot write {what} {target}: {error.strerror or error}; make the folder writable or drop {flag}"
        ) from None
