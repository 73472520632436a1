"""Resumable training state: where a run stands (`TrainProgress`), saving and loading a state folder atomically
through accelerate (optimizer, scheduler, RNG states, and the registered network / progress / EMA), and the
RNG snapshot that lets Ctrl-C save the state of the last finished step.

A state folder holds accelerate's files plus `train_state.json` (sd-scripts keeps the same file beside
accelerate's), so a resumed run knows its step, epoch and position inside the epoch.
"""

from __future__ import annotations

import errno
import json
import os
import pickletools
import random
import shutil
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from library.errors import NonFiniteError, UserInputError
from library.files.atomic import (
    current_umask,
    error_number,
    full_disk_errno,
    replace_folder,
    sync_tree,
    temp_affixes,
    write_failure,
)
from library.files.finite import first_non_finite
from library.files.weight_files import read_safetensors_header

TRAIN_STATE_FILE = "train_state.json"


@dataclass
class TrainProgress:
    """Where the run stands after its last optimizer step; saved with every state and registered with
    accelerate so `load_state` restores it."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 1
    """The epoch in progress (1-based)."""
    steps_in_epoch: int = 0
    """Optimizer steps done within `epoch` (its first `steps_in_epoch * accumulation` batches are consumed)."""

    @property
    def epochs_run(self) -> int:
        """Epochs with at least one step done (the last may be partial): what metadata and reports call epochs."""
        return self.epoch - 1 if self.steps_in_epoch == 0 else self.epoch

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.epoch, self.steps_in_epoch = (
            int(state["step"]),
            int(state["epoch"]),
            int(state["steps_in_epoch"]),
        )


@dataclass
class RngSnapshot:
    """Every RNG the training step draws from, as it was at a step boundary."""

    python: Any
    numpy: Any
    torch_cpu: torch.Tensor
    cuda: list[torch.Tensor] | None

    @classmethod
    def take(cls) -> RngSnapshot:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        return cls(random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda)

    def restore(self) -> None:
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch_cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def save_state(
    accelerator, folder: Path, progress: TrainProgress, check: Iterable[tuple[str, torch.Tensor]] = ()
) -> Path:
    """Write accelerate's state and `train_state.json` to `folder` atomically: a temporary folder beside it is
    filled and synced, then renamed over it, so an interrupted or failed save leaves the previous state intact.

    A failure to write (full disk, permissions) removes the temporary folder and is one `UserInputError` line
    naming the file being written. torch.save reports a full disk without its errno ("unexpected pos ..."), so
    an error without one is followed by asking the disk itself (`full_disk_errno`) before the partial files go.

    `check`: the state's tensors (weights, optimizer state, EMA): one holding a NaN or infinity makes every process
    refuse the save (NonFiniteError) before anything is written, so a broken state never replaces a good one."""
    bad = first_non_finite(check)
    if bad is not None:
        raise NonFiniteError(
            f"refusing to write the state {folder}: {bad} holds NaN or infinite values; states written before are kept"
        )
    folder = Path(folder)
    tmp = None
    if accelerator.is_main_process:
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            prefix, suffix = temp_affixes(folder.name)
            tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=folder.parent))
        except OSError as error:
            raise write_failure(error.errno or errno.EIO, folder, what="state folder") from None
    tmp_name = accelerator.gather_for_metrics([str(tmp)])[0] if accelerator.num_processes > 1 else str(tmp)
    tmp = Path(tmp_name)
    try:
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            (tmp / TRAIN_STATE_FILE).write_text(json.dumps(progress.state_dict(), indent=2) + "\n")
            sync_tree(tmp)
            os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; give the folder normal permissions
            replace_folder(tmp, folder)
    except Exception as error:
        failure = _state_write_failure(error, tmp, folder) if accelerator.is_main_process else None
        if failure is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise failure from None
    finally:
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    return folder


def _state_write_failure(error: Exception, tmp: Path, folder: Path) -> UserInputError | None:
    """The one line for a state save that failed writing (None: not a write failure, re-raise as it is)."""
    code = error_number(error)
    if code is None and tmp.is_dir():
        code = full_disk_errno(tmp)  # the partial files are still there, filling the disk
    if code is None:
        return None
    files = [path for path in tmp.iterdir() if path.is_file()] if tmp.is_dir() else []
    newest = max(files, key=lambda path: path.stat().st_mtime_ns, default=None)  # the file being written
    return write_failure(
        code,
        folder / newest.name if newest is not None else folder,
        what="state file" if newest is not None else "state folder",
    )


# --- Checking a state folder before the model loads ------------------------------------------------------------------
STATE_FILES = (
    "optimizer.bin",
    "scheduler.bin",
    "random_states_0.pkl",
    "custom_checkpoint_0.pkl",
    "custom_checkpoint_1.pkl",
)
"""What accelerate writes for this trainer: optimizer, scheduler, RNG states, and the registered network (0) and
progress (1); with --ema_decay also the EMA (`EMA_STATE_FILE`)."""
EMA_STATE_FILE = "custom_checkpoint_2.pkl"
_TORCH_SUFFIXES = (".bin", ".pkl", ".pt", ".pth")
_CRC_CHECK_LIMIT = 64 << 20  # files up to this size have every byte checked against the zip's checksums


def check_resume_folder(folder: Path, with_ema: bool = False) -> None:
    """One line, before any model loads, when `--resume` does not name a complete, readable state folder.

    Cheap (no torch): `train_state.json` parses, every file accelerate wrote is present and a complete torch
    zip archive whose pickle parses (and whose checksums match, up to 64 MiB), a safetensors file has its whole
    data section. A damaged file is named with what to do; it is never reported as a flag mismatch."""
    if not folder.is_dir():
        raise UserInputError(f"--resume: no such state folder: {folder}")
    if not (folder / TRAIN_STATE_FILE).exists():
        raise UserInputError(f"--resume: {folder} is not a state folder saved by --save_state (no {TRAIN_STATE_FILE})")
    problem = _progress_file_problem(folder / TRAIN_STATE_FILE)
    if problem:
        raise _damaged(folder / TRAIN_STATE_FILE, problem)
    for name in STATE_FILES:
        if not (folder / name).exists():
            raise UserInputError(
                f"--resume: {folder} lacks {name}: the state is incomplete; resume from another state folder"
            )
    if with_ema and not (folder / EMA_STATE_FILE).exists():
        raise UserInputError(
            f"--resume: {folder} has no EMA state ({EMA_STATE_FILE}): it was saved without "
            "--ema_decay; drop --ema_decay, or resume from a state saved with it"
        )
    for path in sorted(folder.iterdir()):
        problem = state_file_problem(path)
        if problem:
            raise _damaged(path, problem)


def _damaged(path: Path, problem: str) -> UserInputError:
    return UserInputError(
        f"--resume: {path} is damaged ({problem}); resume from another state folder (an earlier "
        "checkpoint's -state folder)"
    )


def _progress_file_problem(path: Path) -> str | None:
    if path.is_dir():
        return "a folder where a file should be"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        TrainProgress().load_state_dict(state)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        return f"not the JSON this trainer writes: {type(error).__name__}: {str(error)[:120]}"
    return None


def state_file_problem(path: Path) -> str | None:
    """Why a file of a state folder cannot be loaded (cheap, no torch), or None when it looks complete."""
    if path.name == TRAIN_STATE_FILE:
        return _progress_file_problem(path)
    if path.suffix not in _TORCH_SUFFIXES + (".safetensors",):
        return None
    if path.is_dir():
        return "a folder where a file should be"
    size = path.stat().st_size
    if size == 0:
        return "the file is empty"
    if path.suffix == ".safetensors":
        return _safetensors_problem(path, size)
    return _torch_zip_problem(path, size)


def _safetensors_problem(path: Path, size: int) -> str | None:
    try:
        entries, _, data_start = read_safetensors_header(path)
    except UserInputError as error:
        return str(error).removeprefix(f"{path}: ")
    needed = data_start + max((entry.end for entry in entries.values()), default=0)
    return f"truncated: {size} bytes of {needed}" if size < needed else None


def _torch_zip_problem(path: Path, size: int) -> str | None:
    """torch.save's zip format: a central directory at the end (gone when truncated), one `data.pkl` whose pickle
    opcodes parse, every member inside the file."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            pickles = [info.filename for info in infos if info.filename.rpartition("/")[2] == "data.pkl"]
            if len(pickles) != 1:
                return "not a torch.save archive (no data.pkl)"
            if any(info.header_offset + info.compress_size > size for info in infos):
                return "truncated"
            for _ in pickletools.genops(archive.read(pickles[0])):
                pass
            if size <= _CRC_CHECK_LIMIT and archive.testzip() is not None:
                return "its checksums do not match"
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError, NotImplementedError) as error:
        return f"not a complete torch.save file: {type(error).__name__}: {str(error)[:120]}"
    return None


def damaged_state_file(folder: Path) -> tuple[Path, str] | None:
    """The first file of a state folder that does not load, and why: the cheap checks, then torch.load of each
    torch file (memory-mapped: the tensors are not read)."""
    for path in sorted(Path(folder).iterdir()):
        problem = state_file_problem(path)
        if problem is None and path.suffix in _TORCH_SUFFIXES and path.is_file():
            try:
                torch.load(path, map_location="cpu", mmap=True, weights_only=False)
            except Exception as error:  # noqa: BLE001 - any failure to unpickle means the file is damaged
                problem = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:160]}"
        if problem:
            return path, problem
    return None


def saved_progress(folder: Path) -> TrainProgress | None:
    """Where the state in `folder` stood (its `train_state.json`), or None when that cannot be read."""
    try:
        progress = TrainProgress()
        progress.load_state_dict(json.loads((Path(folder) / TRAIN_STATE_FILE).read_text(encoding="utf-8")))
        return progress
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_state(accelerator, folder: Path, progress: TrainProgress) -> None:
    """Restore everything registered with accelerate (optimizer, scheduler, RNG, network, progress, EMA); a state
    from a differently set-up run (other dims, optimizer, groups, EMA) is one line that says so, a damaged file
    one line naming it."""
    try:
        accelerator.load_state(str(folder))
    except Exception as error:
        damaged = damaged_state_file(folder)
        if damaged is not None:  # a damaged file is not a flag mismatch
            raise _damaged(*damaged) from None
        if not isinstance(error, (RuntimeError, ValueError, KeyError, FileNotFoundError)):
            raise
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        reason = next((line for line in lines if "size mismatch" in line or "key" in line.lower()), lines[0])[:300]
        raise UserInputError(
            f"--resume: the state in {folder} does not fit this run ({reason}); resume with the network, optimizer, "
            "LoRA+ and EMA flags of the run that saved it"
        ) from None
    progress.load_state_dict(json.loads((Path(folder) / TRAIN_STATE_FILE).read_text()))
