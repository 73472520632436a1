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
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, gather_object

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

    With several processes each writes its own RNG file (`random_states_<rank>.pkl`) into the temporary folder, the
    main process the rest; the folder is renamed into place only after every process has written its part, so a
    published state always holds every process's RNG (a resumed run continues exactly). A process that cannot write
    its part (or cannot see the folder: machines without a shared --output_dir) makes every process stop with the
    same line, and the temporary folder goes.

    A failure to write (full disk, permissions) removes the temporary folder and is one `UserInputError` line
    naming the file being written. torch.save reports a full disk without its errno ("unexpected pos ..."), so
    an error without one is followed by asking the disk itself (`full_disk_errno`) before the partial files go.

    `check`: the state's tensors (weights, optimizer state, EMA): one holding a NaN or infinity makes every process
    refuse the save (NonFiniteError) before anything is written, so a broken state never replaces a good one (the
    tensors are the same on every process, so all refuse alike)."""
    bad = first_non_finite(check)
    if bad is not None:
        raise NonFiniteError(
            f"refusing to write the state {folder}: {bad} holds NaN or infinite values; states written before are kept"
        )
    folder = Path(folder)
    tmp = _make_temp_folder(accelerator, folder)
    try:
        # Every process writes its part; then the main process names the folder, once all parts are there.
        _agree_or_raise(accelerator, *_write_part(accelerator, tmp, folder))
        failure: tuple[BaseException | None, str | None] = (None, None)
        if accelerator.is_main_process:
            failure = _publish(tmp, folder, progress)
        _agree_or_raise(accelerator, *failure)
    finally:
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _make_temp_folder(accelerator, folder: Path) -> Path:
    """The main process makes the temporary folder beside `folder`; every process gets its name."""
    tmp, problem = None, None
    if accelerator.is_main_process:
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            prefix, suffix = temp_affixes(folder.name)
            tmp = tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=folder.parent)
        except OSError as error:
            problem = str(write_failure(error.errno or errno.EIO, folder, what="state folder"))
    if accelerator.num_processes > 1:
        tmp, problem = broadcast_object_list([tmp, problem])
    if problem is not None:
        raise UserInputError(problem)
    return Path(tmp)


def _write_part(accelerator, tmp: Path, folder: Path) -> tuple[BaseException | None, str | None]:
    """This process's files of the state (accelerate's: its RNG file; the main process also the optimizer,
    scheduler and registered objects) -> (the error, its one line), or (None, None)."""
    if not tmp.is_dir():  # made by the main process on a disk this machine does not see
        return None, (
            f"cannot write the state {folder}: process {accelerator.process_index} does not see the folder the main "
            "process made for it: with several machines, --output_dir must be on a disk every machine shares"
        )
    try:
        accelerator.save_state(str(tmp))
    except Exception as error:
        return _failure(error, tmp, folder, f"process {accelerator.process_index} failed writing")
    return None, None


def _publish(tmp: Path, folder: Path, progress: TrainProgress) -> tuple[BaseException | None, str | None]:
    """The main process, once every part is written: `train_state.json`, sync, and the rename into place."""
    try:
        (tmp / TRAIN_STATE_FILE).write_text(json.dumps(progress.state_dict(), indent=2) + "\n")
        sync_tree(tmp)
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; give the folder normal permissions
        replace_folder(tmp, folder)
    except Exception as error:
        return _failure(error, tmp, folder, "the main process failed publishing")
    return None, None


def _failure(error: Exception, tmp: Path, folder: Path, doing: str) -> tuple[BaseException | None, str]:
    """(None, the one line) for a write failure; (the error, a line for the other processes) for anything else,
    which the failing process raises as it is (its traceback is the useful part)."""
    failure = _state_write_failure(error, tmp, folder)
    if failure is None:
        return error, f"{doing} the state {folder} ({type(error).__name__}: {str(error)[:200]})"
    return None, str(failure)


def _agree_or_raise(accelerator, error: BaseException | None, problem: str | None) -> None:
    """Every process learns whether any failed (one collective with several processes), and all stop alike: the
    failing process with its own error, the others with its line."""
    if accelerator.num_processes > 1:
        problems = gather_object([problem])
        problem = next((line for line in problems if line is not None), None)
    if error is not None:
        raise error
    if problem is not None:
        raise UserInputError(problem)


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


def check_resume_folder(folder: Path, with_ema: bool = False, processes: int = 1) -> None:
    """One line, before any model loads, when `--resume` does not name a complete, readable state folder.

    Cheap (no torch): `train_state.json` parses, every file accelerate wrote is present (the RNG file of each of
    this run's `processes`, `check_state_processes`) and a complete torch zip archive whose pickle parses (and whose
    checksums match, up to 64 MiB), a safetensors file has its whole data section. A damaged file is named with
    what to do; it is never reported as a flag mismatch."""
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
    check_state_processes(folder, processes)
    if with_ema and not (folder / EMA_STATE_FILE).exists():
        raise UserInputError(
            f"--resume: {folder} has no EMA state ({EMA_STATE_FILE}): it was saved without "
            "--ema_decay; drop --ema_decay, or resume from a state saved with it"
        )
    for path in sorted(folder.iterdir()):
        problem = state_file_problem(path)
        if problem:
            raise _damaged(path, problem)


RNG_FILE = re.compile(r"random_states_(\d+)\.pkl")
"""accelerate's RNG file of process N: `random_states_<N>.pkl`."""


def check_state_processes(folder: Path, processes: int) -> None:
    """The state holds one RNG file per process of this run, no more and no fewer: accelerate loads each process's
    own and, when it is missing, silently keeps the current RNG, so a resume would run on but not continue exactly;
    and each process's place in the data depends on the count. One line naming the count to resume with."""
    ranks = sorted(int(match[1]) for path in folder.iterdir() if (match := RNG_FILE.fullmatch(path.name)))
    missing = sorted(set(range(max(ranks, default=-1) + 1)) - set(ranks))
    if missing:
        raise UserInputError(
            f"--resume: {folder} lacks random_states_{missing[0]}.pkl: the state is incomplete; resume from another "
            "state folder"
        )
    if ranks and len(ranks) != processes:
        saved = f"{len(ranks)} process" + ("es" if len(ranks) > 1 else "")
        raise UserInputError(
            f"--resume: the state in {folder} was saved by {saved} and this run has {processes}: resume with "
            f"{len(ranks)} (each process's random state and place in the data belong to that count)"
        )


def launched_processes() -> int:
    """How many processes the launcher (torchrun, accelerate launch) started for this run, from the `WORLD_SIZE` it
    sets, before the process group exists; 1 without a launcher."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


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
    check_state_processes(folder, accelerator.num_processes)
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
