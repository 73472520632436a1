"""Resumable training state: where a run stands (`TrainProgress`), saving and loading a state folder atomically
through accelerate (optimizer, scheduler, RNG states, and the registered network / progress / EMA), and the
RNG snapshot that lets Ctrl-C save the state of the last finished step.

A state folder holds accelerate's files plus `train_state.json` (sd-scripts keeps the same file beside
accelerate's), so a resumed run knows its step, epoch and position inside the epoch.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from library.errors import NonFiniteError, UserInputError
from library.finite import first_non_finite

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

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.epoch, self.steps_in_epoch = int(state["step"]), int(state["epoch"]), int(state["steps_in_epoch"])


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


def save_state(accelerator, folder: Path, progress: TrainProgress,
               check: Iterable[tuple[str, torch.Tensor]] = ()) -> Path:
    """Write accelerate's state and `train_state.json` to `folder` atomically: a temporary folder beside it is
    filled, then renamed over it, so an interrupted save leaves the previous state intact.

    `check`: the state's tensors (weights, optimizer state, EMA): one holding a NaN or infinity makes every process
    refuse the save (NonFiniteError) before anything is written, so a broken state never replaces a good one."""
    bad = first_non_finite(check)
    if bad is not None:
        raise NonFiniteError(f"refusing to write the state {folder}: {bad} holds NaN or infinite values; states "
                             "written before are kept")
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent)) \
        if accelerator.is_main_process else None
    tmp_name = accelerator.gather_for_metrics([str(tmp)])[0] if accelerator.num_processes > 1 else str(tmp)
    tmp = Path(tmp_name)
    try:
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            (tmp / TRAIN_STATE_FILE).write_text(json.dumps(progress.state_dict(), indent=2) + "\n")
            _replace_folder(tmp, folder)
    finally:
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    return folder


def _replace_folder(new: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_resume_folder(folder: Path) -> None:
    """One line, before any model loads, when `--resume` does not name a state folder."""
    if not folder.is_dir():
        raise UserInputError(f"--resume: no such state folder: {folder}")
    if not (folder / TRAIN_STATE_FILE).is_file():
        raise UserInputError(f"--resume: {folder} is not a state folder saved by --save_state (no {TRAIN_STATE_FILE})")


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
    from a differently set-up run (other dims, optimizer, groups, EMA) is one line that says so."""
    try:
        accelerator.load_state(str(folder))
    except (RuntimeError, ValueError, KeyError, FileNotFoundError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        reason = next((line for line in lines if "size mismatch" in line or "key" in line.lower()), lines[0])[:300]
        raise UserInputError(
            f"--resume: the state in {folder} does not fit this run ({reason}); resume with the network, optimizer, "
            "LoRA+ and EMA flags of the run that saved it"
        ) from None
    progress.load_state_dict(json.loads((Path(folder) / TRAIN_STATE_FILE).read_text()))
