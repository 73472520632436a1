"""Reading a safetensors file's header (names, dtypes, shapes, offsets, metadata) without torch."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from library.errors import UserInputError


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file, from its header."""

    dtype: str  # safetensors code: "F32", "F16", "BF16", ...
    shape: tuple[int, ...]
    start: int  # byte offsets in the data section
    end: int


def read_safetensors_header(path: str | Path, *, complete: bool = True
                            ) -> tuple[dict[str, TensorEntry], dict[str, str], int]:
    """(tensors by name, metadata, byte offset of the data section) of a safetensors file; reads only the header.

    Any file that is not one (empty, a folder, another format, garbage, a header of the wrong structure) is a
    `UserInputError` "<path>: <what is wrong>" for the caller to complete with its flag and advice; with
    `complete`, so is a file that ends before its last tensor (a copy or download that stopped)."""
    path = Path(path)
    if path.is_dir():
        raise UserInputError(f"{path}: a folder, not a safetensors file")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise UserInputError(f"{path}: not a safetensors file ({'empty' if not head else 'too short'})")
            (size,) = struct.unpack("<Q", head)
            if size > 100_000_000:
                raise UserInputError(f"{path}: not a safetensors file (implausible header size)")
            raw = f.read(size)
    except OSError as error:
        raise UserInputError(f"{path}: cannot be read ({error.strerror or error})") from None
    try:
        header = json.loads(raw)
        metadata = header.pop("__metadata__", None) or {}
        entries = {
            name: TensorEntry(str(info["dtype"]), tuple(int(n) for n in info["shape"]),
                              *(int(n) for n in info["data_offsets"]))
            for name, info in header.items()
        }
        metadata = {str(key): str(value) for key, value in dict(metadata).items()}
    except (ValueError, MemoryError, OverflowError, KeyError, TypeError, AttributeError):
        raise UserInputError(f"{path}: not a safetensors file (unreadable header)") from None
    data_start = 8 + size
    if complete:
        needed = data_start + max((entry.end for entry in entries.values()), default=0)
        actual = path.stat().st_size
        if actual < needed:
            raise UserInputError(f"{path}: truncated ({actual:,} of its {needed:,} bytes are there)")
    return entries, metadata, data_start
