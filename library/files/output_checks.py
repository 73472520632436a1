"""Before the model loads: can the run write where it is told to, and is there room for its first save?

A run that fails at its first save has cost the whole load and every step before it. Both questions are cheap
to answer at start-up:

- A folder is usable when it is a folder (or can be created: its nearest existing ancestor is a folder) and a
  probe file can be created and removed there. `os.access` is not asked: it says yes to root on a read-only
  mount's folders and ignores Windows ACLs; creating a file is the question itself.
- The first save's size is estimated from the LoRA's parameter count (`networks.lora_size`, read off the
  checkpoint's header) and compared with `shutil.disk_usage`, with a margin.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from library.errors import UserInputError
from library.files.atomic import FULL_DISK_ERRNOS, temp_affixes

MARGIN_FRACTION = 0.10
MARGIN_BYTES = 16 << 20
"""Room asked beyond the estimate: 10% (pickle and header overheads, the report, logs) plus 16 MiB."""
HEADER_BYTES_PER_TENSOR = 160
"""A safetensors header spends about this much JSON per tensor (name, dtype, shape, offsets)."""
METADATA_BYTES = 1 << 20
"""The `ss_*` metadata (tag frequencies of a big dataset can reach hundreds of KiB)."""


def _nearest_existing(folder: Path) -> Path:
    current = folder.absolute()
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def check_output_folder(folder: str | os.PathLike, flag: str) -> None:
    """One `UserInputError` line unless `folder` can be written to: it is a file, a parent on its path is a file,
    or no file can be created there (permissions, read-only, full disk). Creates nothing that stays."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserInputError(f"{flag} {folder} is a file, not a folder: give a folder (it is created when missing)")
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise UserInputError(f"{flag} {folder} cannot be created: {existing} is a file, not a folder")
    prefix, suffix = temp_affixes("write-probe")
    try:
        fd, probe = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=existing)
        try:
            os.write(fd, b"\0")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as error:
        code = error.errno or errno.EACCES
        if code in FULL_DISK_ERRNOS:
            raise UserInputError(
                f"{flag} {folder}: the disk is full ({os.strerror(code)}); free space on it or give another folder"
            ) from None
        where = "is not writable" if existing == folder.absolute() else f"cannot be created in {existing}"
        raise UserInputError(f"{flag} {folder} {where} ({os.strerror(code)}); give a folder you can write to") from None


# --- The first save ------------------------------------------------------------------------------------------------
OPTIMIZER_STATE_BYTES = {
    "adamw": 8,
    "adam": 8,
    "adamw8bit": 2,
    "pagedadamw": 8,
    "pagedadamw8bit": 2,
    "pagedadamw32bit": 8,
    "lion": 4,
    "lion8bit": 1,
    "pagedlion8bit": 1,
    "sgdnesterov": 4,
    "sgdnesterov8bit": 1,
    "ademamix8bit": 3,
    "pagedademamix8bit": 3,
    "adafactor": 4,
    "prodigy": 16,
    "dadaptation": 12,
    "dadaptadampreprint": 12,
    "dadaptadam": 12,
    "dadaptlion": 8,
    "dadaptsgd": 8,
    "dadaptadagrad": 8,
    "dadaptadan": 16,
    "dadaptadanip": 16,
}
"""Optimizer state bytes per trained parameter (fp32 unless 8-bit): Adam-type keep two moments (8), Lion and
SGD one (4), their 8-bit forms a byte per moment; Prodigy and D-Adaptation keep extra copies. Unknown: 8."""


@dataclass(frozen=True)
class FirstSave:
    """What the run's first save writes, in bytes (estimates)."""

    lora_file: int
    ema_file: int = 0
    state_folder: int = 0

    @property
    def total(self) -> int:
        return self.lora_file + self.ema_file + self.state_folder

    def describe(self) -> str:
        parts = [f"LoRA file {_size(self.lora_file)}"]
        if self.ema_file:
            parts.append(f"EMA file {_size(self.ema_file)}")
        if self.state_folder:
            parts.append(f"state folder {_size(self.state_folder)}")
        return ", ".join(parts)


def estimate_first_save(
    lora_parameters: int,
    lora_tensors: int,
    save_bytes_per_parameter: int,
    *,
    ema: bool,
    save_state: bool,
    optimizer_type: str,
) -> FirstSave:
    """The bytes of the run's first save, whichever comes first (a checkpoint or the final file):

    - the LoRA file: every LoRA parameter at the save precision, plus its header and metadata;
    - with an EMA, a second file of the same size;
    - with --save_state (or --save_state_on_train_end), a state folder: the LoRA weights in fp32 (the network's
      state), the optimizer state (`OPTIMIZER_STATE_BYTES` per parameter), the EMA's fp32 copy, and small files
      (scheduler, RNG states, progress).
    """
    header = lora_tensors * HEADER_BYTES_PER_TENSOR + METADATA_BYTES
    lora_file = lora_parameters * save_bytes_per_parameter + header
    state = 0
    if save_state:
        per_parameter = 4 + OPTIMIZER_STATE_BYTES.get(optimizer_type.lower().rpartition(".")[2], 8) + (4 if ema else 0)
        state = lora_parameters * per_parameter + 2 * header
    return FirstSave(lora_file, lora_file if ema else 0, state)


def check_free_space(folder: str | os.PathLike, flag: str, first_save: FirstSave) -> None:
    """One `UserInputError` line when `folder`'s disk has less room than the first save plus the margin."""
    folder = Path(folder)
    free = shutil.disk_usage(_nearest_existing(folder)).free
    needed = int(first_save.total * (1 + MARGIN_FRACTION)) + MARGIN_BYTES
    if free < needed:
        raise UserInputError(
            f"{flag} {folder}: not enough free disk space for the first save: it needs about {_size(needed)} "
            f"({first_save.describe()}, plus a margin), {_size(free)} are free; free space or give another folder"
        )


def _size(n: float) -> str:
    if n < 1024:
        return f"{int(n)} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            break
    return f"{n:.1f} {unit}"
