"""Atomic file writes, and the one place a failed write becomes one line.

Every file the trainer writes (LoRA and EMA files, reports, JSON, config, caches, sample images) is written to a
temporary file beside its target and renamed over it, so a crash, a kill or a full disk never leaves half a file
and never touches the file that was there before. Temporary names are `.<target name>.<random>.<pid>.tmp`: hidden,
tied to their target (so a later run can find and remove the ones a killed run left, see `library.files.stale_files`),
and carrying the writer's process id (so a temporary file of a live writer is recognised as such).

A write that fails because the disk is full (ENOSPC, EDQUOT, EFBIG) or for another operating-system reason
becomes a `UserInputError` with one line naming the file; the temporary file is removed first.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from library.errors import UserInputError

FULL_DISK_ERRNOS = frozenset(
    code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EFBIG) if code is not None
)
"""Errors that mean "no room for this file": no space left, quota exceeded, file larger than allowed."""
TEMP_SUFFIX = ".tmp"
_RANDOM_PART = re.compile(r"[a-z0-9_]{8}")  # what tempfile.mkstemp / mkdtemp put between prefix and suffix
_OS_ERROR_IN_MESSAGE = re.compile(r"\(os error (\d+)\)")  # how Rust-backed writers (safetensors) report errno


# --- Temporary names ------------------------------------------------------------------------------------------------
def temp_affixes(target_name: str) -> tuple[str, str]:
    """(prefix, suffix) for `tempfile.mkstemp` / `mkdtemp`: the temporary of `target_name` written by this process."""
    return f".{target_name}.", f".{os.getpid()}{TEMP_SUFFIX}"


def parse_temp_name(name: str) -> tuple[str, int | None] | None:
    """(target name, writer's process id) of a temporary name made with `temp_affixes`, or None when `name` is not
    one. Names from before the process id was added (`.<target>.<random>.tmp`) give a process id of None."""
    if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
        return None
    core = name[1 : -len(TEMP_SUFFIX)]
    head, _, last = core.rpartition(".")
    if last.isdigit():
        target, _, random_part = head.rpartition(".")
        if target and _RANDOM_PART.fullmatch(random_part):
            return target, int(last)
    if head and _RANDOM_PART.fullmatch(last):
        return head, None
    return None


# --- Failed writes as one line ----------------------------------------------------------------------------------------
def error_number(error: BaseException) -> int | None:
    """The operating-system error number behind `error`, looking through its causes; None when there is none.

    Python's OSError carries it; Rust-backed writers (safetensors) put "(os error N)" in their message."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current.errno
        found = _OS_ERROR_IN_MESSAGE.search(str(current))
        if found:
            return int(found.group(1))
        current = current.__cause__ or current.__context__
    return None


def full_disk_errno(folder: str | os.PathLike, probe_bytes: int = 1 << 20) -> int | None:
    """Ask the operating system whether `folder`'s disk has room: write and sync `probe_bytes` to a probe file
    there and remove it. The errno (ENOSPC, EDQUOT, EFBIG) when it has no room, else None.

    For writers that lose the error number (torch.save reports a full disk as "unexpected pos ..."): called right
    after such a failure, while the partial file still fills the disk."""
    prefix, suffix = temp_affixes("space-probe")
    try:
        fd, probe = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    except OSError as error:
        return error.errno if error.errno in FULL_DISK_ERRNOS else None
    try:
        os.write(fd, b"\0" * probe_bytes)
        os.fsync(fd)
    except OSError as error:
        return error.errno if error.errno in FULL_DISK_ERRNOS else None
    finally:
        os.close(fd)
        os.unlink(probe)
    return None


def write_failure(code: int, target: Path, *, what: str = "", hint: str = "") -> UserInputError:
    """The one line for a write of `target` that failed with error number `code`.

    `what` names the kind of file ("latent cache"); `hint` says what to do when the cause is not a full disk."""
    label = f"{what} {target}" if what else str(target)
    reason = os.strerror(code)
    if code in FULL_DISK_ERRNOS:
        return UserInputError(
            f"the disk is full: cannot write {label} ({reason}); files written before are intact: free space on "
            "that disk and run again"
        )
    if target.is_dir():
        return UserInputError(f"cannot write {label}: a folder of that name is in the way; move it away and run again")
    return UserInputError(f"cannot write {label}: {reason}; {hint or 'make the folder writable and run again'}")


def _as_write_failure(
    error: BaseException, target: Path, temporary: Path | None, what: str, hint: str
) -> UserInputError | None:
    """`error` as a one-line failure to write `target`, or None when it is not an OS error of this write (a
    programming error, Ctrl-C, or a failure to read some other file inside the `with` block)."""
    if isinstance(error, UserInputError) or not isinstance(error, Exception):
        return None
    code = error_number(error)
    if code is None:
        return None
    filename = getattr(error, "filename", None)
    if (
        code not in FULL_DISK_ERRNOS
        and filename is not None
        and Path(filename) not in (temporary, target, target.parent)
    ):
        return None
    return write_failure(code, target, what=what, hint=hint)


# --- Writing ----------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, what: str = "", hint: str = "", durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it replaces `target` in one rename.

    On an exception the temporary file is removed and whatever was at `target` stays untouched; an OS error of
    the write (full disk, permissions) becomes one `UserInputError` line naming `target` (see `write_failure`).
    `durable`: sync the data to the disk before the rename and the folder after it, so a power cut leaves the
    old or the new file, never an empty one (caches, which are checked and recomputed, skip the cost).
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        prefix, suffix = temp_affixes(target.name)
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=target.parent)
    except OSError as error:
        raise write_failure(error.errno or errno.EIO, target, what=what, hint=hint) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if durable:
            _sync_file(tmp_path)
        os.chmod(tmp_path, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp_path, target)
    except BaseException as error:
        tmp_path.unlink(missing_ok=True)
        failure = _as_write_failure(error, target, tmp_path, what, hint)
        if failure is not None:
            raise failure from None
        raise
    if durable:
        _sync_folder(target.parent)


def _open_for_writing(path: Path) -> BinaryIO:
    """Where every atomic writer's bytes go (one place, so tests can make the disk "full")."""
    return open(path, "wb")  # noqa: SIM115 - closed by atomic_file


@contextlib.contextmanager
def atomic_file(
    target: str | os.PathLike, *, what: str = "", hint: str = "", durable: bool = True
) -> Iterator[BinaryIO]:
    """`atomic_path`, yielding the temporary file opened for binary writing (closed, and synced when `durable`,
    before the rename)."""
    with atomic_path(target, what=what, hint=hint, durable=False) as tmp, _open_for_writing(tmp) as handle:
        yield handle
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    if durable:
        _sync_folder(Path(target).parent)


def _sync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX; Windows has no folder handles to sync, and renames there are
    journaled by NTFS)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder; the rename itself has happened
    finally:
        os.close(fd)


def sync_tree(folder: Path) -> None:
    """Sync every file of a freshly written folder, and the folder, before it is renamed into place."""
    for path in Path(folder).iterdir():
        if path.is_file():
            _sync_file(path)
    _sync_folder(Path(folder))


def current_umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_bytes_atomic(target: str | os.PathLike, data: bytes, *, what: str = "") -> None:
    """Write a file atomically and durably."""
    with atomic_file(target, what=what) as handle:
        handle.write(data)


def write_text_atomic(target: str | os.PathLike, text: str, *, what: str = "") -> None:
    """Write a text file atomically and durably (UTF-8)."""
    write_bytes_atomic(target, text.encode("utf-8"), what=what)


def write_npz_atomic(target: str | os.PathLike, arrays: dict, *, what: str, flag: str) -> None:
    """Write a numpy .npz cache atomically; a failure is one UserInputError line naming the file and `flag`.

    Not synced: a cache lost to a power cut is found unreadable and recomputed."""
    import numpy as np

    with atomic_file(target, what=what, hint=f"make the folder writable or drop {flag}", durable=False) as handle:
        np.savez(handle, **arrays)  # a handle: savez adds no suffix


NPZ_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, TypeError, AttributeError, zipfile.BadZipFile, zlib.error)
"""What numpy raises reading an empty, truncated, garbage or wrong-type .npz cache (a bare .npy has no `files`)."""
DAMAGED = "it is damaged"
"""How a cache reader's reason starts when the file could not be read at all (the caller warns and recomputes)."""


OLD_FOLDER_MARK = ".old-"
"""The previous state is moved to `.<name>.old-<pid>` for the moment between the two renames of a replace."""


def old_folder_name(target_name: str, pid: int) -> str:
    return f".{target_name}{OLD_FOLDER_MARK}{pid}"


def parse_old_folder_name(name: str) -> tuple[str, int] | None:
    """(target name, pid) of a folder named by `old_folder_name`, else None."""
    head, mark, pid = name.rpartition(OLD_FOLDER_MARK)
    if not mark or not name.startswith(".") or not pid.isdigit() or len(head) < 2:
        return None
    return head[1:], int(pid)


def replace_folder(new: Path, target: Path) -> None:
    """Rename `new` over `target`. A folder cannot be renamed over another, so the old one steps aside first, and
    comes back when the second rename fails (a kill between the two leaves it to `library.files.stale_files`)."""
    old = None
    if target.exists():
        old = target.with_name(old_folder_name(target.name, os.getpid()))
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def npz_damage(error: BaseException) -> str:
    """`DAMAGED` and why, in a few words, for one of `NPZ_READ_ERRORS`: numpy's own message for a file that is not
    an .npz speaks of pickles and `allow_pickle`, advice that does not fit a damaged cache."""
    text = str(error)
    if isinstance(error, EOFError):
        why = "the file is empty"
    elif isinstance(error, ValueError) and "pickle" in text:
        why = "not an .npz file"
    elif isinstance(error, (zipfile.BadZipFile, zlib.error)):
        why = f"not a complete .npz file: {text[:80]}"
    else:
        why = f"{type(error).__name__}: {text[:80]}"
    return f"{DAMAGED} ({why})"
