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


def read_safetensors_header(path: str | Path) -> tuple[dict[str, TensorEntry], dict[str, str], int]:
    """(tensors by name, metadata, byte offset of the data section) of a safetensors file; reads only the header."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise UserInputError(f"{path}: not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", head)
        if size > 100_000_000:
            raise UserInputError(f"{path}: not a safetensors file (implausible header size)")
        try:
            header = json.loads(f.read(size))
        except (ValueError, MemoryError, OverflowError):
            raise UserInputError(f"{path}: not a safetensors file (unreadable header)") from None
    metadata = header.pop("__metadata__", None) or {}
    entries = {
        name: TensorEntry(info["dtype"], tuple(info["shape"]), *info["data_offsets"]) for name, info in header.items()
    }
    return entries, dict(metadata), 8 + size
