"""One run per output: `<output_dir>/<output_name>.lock` while a run writes there.

Two runs writing the same files would rotate, rename and replace each other's checkpoints. The lock file is
created with O_EXCL (atomic on every OS and on local file systems), holds the owner's pid, host, process start
time and start date, and is removed when the run ends, however it ends. A lock left by a run that was killed
(SIGKILL, power loss) is recognised and taken over with a note: on this host its pid is gone or belongs to a
process started at another time; an unreadable lock is stale once it is a few seconds old. A lock held from
another host cannot be checked from here: the message says which file to remove once that run is over.
No fcntl: this works on Windows too.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from library.errors import OutputInUseError, UserInputError

UNREADABLE_GRACE_S = 10.0
"""An unreadable lock younger than this may be one being written right now: it counts as held."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds a lock, as written in the file."""

    pid: int
    host: str
    process_started: float
    """psutil's create_time of the owner: tells a live owner from a later process that got the same pid."""
    started_at: str

    def is_alive_here(self) -> bool | None:
        """True/False for a holder on this host; None when it runs elsewhere (cannot be checked)."""
        if self.host != socket.gethostname():
            return None
        try:
            return abs(psutil.Process(self.pid).create_time() - self.process_started) < 1.0
        except (psutil.NoSuchProcess, ValueError):
            return False
        except psutil.AccessDenied:  # it exists and cannot be inspected: count it as the owner
            return True


def lock_path(output_dir: Path, output_name: str) -> Path:
    return Path(output_dir) / f"{output_name}.lock"


def _this_holder() -> LockHolder:
    return LockHolder(
        pid=os.getpid(),
        host=socket.gethostname(),
        process_started=psutil.Process().create_time(),
        started_at=time.strftime("%Y-%m-%d %H:%M:%S"),
    )


def read_holder(path: Path) -> LockHolder | None:
    """The holder written in `path`, or None when the file is unreadable or malformed."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return LockHolder(int(data["pid"]), str(data["host"]), float(data["process_started"]), str(data["started_at"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _create(path: Path, holder: LockHolder) -> bool:
    """Create the lock file if none exists (atomically); False when one is there."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(
                {
                    "pid": holder.pid,
                    "host": holder.host,
                    "process_started": holder.process_started,
                    "started_at": holder.started_at,
                },
                handle,
            )
            handle.write("\n")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return True


def _is_stale(path: Path, holder: LockHolder | None) -> bool:
    if holder is None:
        try:
            return time.time() - path.stat().st_mtime > UNREADABLE_GRACE_S
        except FileNotFoundError:
            return True
    return holder.is_alive_here() is False


def _take_away(path: Path, seen: str) -> bool:
    """Move the stale lock aside and delete it, unless another starting run took it over first (then its new
    lock is put back). True when the path is free for a new attempt."""
    aside = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return True
    try:
        moved = aside.read_text(encoding="utf-8", errors="replace")
    except OSError:
        moved = seen
    if moved != seen:  # not the file judged stale: a fresh lock of a run that won the race; give it back
        with contextlib.suppress(OSError):
            os.link(aside, path) if os.name != "nt" else os.rename(aside, path)
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True


def _busy_message(path: Path, holder: LockHolder | None, output_name: str) -> str:
    if holder is None:
        who = "a run that is starting now"
    else:
        who = f"pid {holder.pid} on {holder.host}, started {holder.started_at}"
    hint = (
        f"; if that run is over (it ran on another host), delete {path}"
        if holder is not None and holder.is_alive_here() is None
        else ""
    )
    return (
        f"another run is writing {output_name} in {path.parent} ({who}): wait for it to finish or give another "
        f"--output_name or --output_dir{hint}"
    )


@contextlib.contextmanager
def output_lock(output_dir: Path, output_name: str, note: Callable[[str], None] = print) -> Iterator[Path]:
    """Hold `<output_dir>/<output_name>.lock` for the body; OutputInUseError (one line) when a live run holds it.
    A stale lock is taken over with a `note`. The folder is created when missing."""
    path = lock_path(output_dir, output_name)
    me = _this_holder()
    for _ in range(5):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if _create(path, me):
                break
        except OSError as error:
            raise UserInputError(
                f"--output_dir: cannot create {path}: {error.strerror or error}; make the folder "
                "writable or choose another --output_dir"
            ) from None
        try:
            seen = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            continue
        except OSError:
            seen = ""
        holder = read_holder(path)
        if not _is_stale(path, holder):
            raise OutputInUseError(_busy_message(path, holder, output_name))
        if _take_away(path, seen):
            what = (
                f"pid {holder.pid} on {holder.host}, started {holder.started_at}, is gone"
                if holder is not None
                else "it was unreadable"
            )
            note(f"note: took over the stale lock {path} ({what}; its run did not end cleanly)")
    else:
        raise OutputInUseError(_busy_message(path, read_holder(path), output_name))
    try:
        yield path
    finally:
        if read_holder(path) == me:  # never remove a lock another run took over
            path.unlink(missing_ok=True)
