"""Weight files: a safetensors file's header (names, dtypes, shapes, offsets, metadata, read without torch), and a
checkpoint's tensors read one at a time, never the whole file.

The header alone answers the cheap start-up checks (is this a LoRA, a complete file, the expected ranks?). The SDXL
loader converts and places each tensor as it is read, so memory holds the loaded model plus one tensor
in the file's dtype - never a second copy of the model.

- ``.safetensors``: the header gives every tensor's dtype, shape and byte range; :meth:`TensorReader.read` seeks
  there and ``readinto``s a fresh buffer. No mmap: mapped pages count in the process's RSS and stay resident while
  the mapping lives, so a mapped 7 GB file looks (and, under memory pressure, acts) like a 7 GB copy.
- ``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin`` (pickle): ``torch.load(mmap=True, weights_only=True)`` keeps the
  tensors in the file until :meth:`TensorReader.read` copies one out; a top-level ``state_dict`` is unwrapped.
- ``*.index.json`` (sharded diffusers / transformers weights): the ``weight_map`` names each tensor's shard.

torch is imported by the functions that make tensors, so reading a header (the config's checks, `tools/`) loads none.
"""

from __future__ import annotations

import functools
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO

from library.errors import UserInputError

if TYPE_CHECKING:
    import torch

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

SAFETENSORS_DTYPE_NAMES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
"""safetensors dtype codes (as the header lists them) -> the names of the torch dtypes this module reads."""


@functools.cache
def safetensors_dtypes() -> dict[str, torch.dtype]:
    """safetensors dtype codes -> torch dtypes (`SAFETENSORS_DTYPE_NAMES`, resolved once torch is wanted)."""
    import torch

    return {code: getattr(torch, name) for code, name in SAFETENSORS_DTYPE_NAMES.items()}


# --- The header -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file, from its header."""

    dtype: str  # safetensors code: "F32", "F16", "BF16", ...
    shape: tuple[int, ...]
    start: int  # byte offsets in the data section
    end: int


def read_safetensors_header(
    path: str | Path, *, complete: bool = True
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
            name: TensorEntry(
                str(info["dtype"]), tuple(int(n) for n in info["shape"]), *(int(n) for n in info["data_offsets"])
            )
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


# --- Tensors ----------------------------------------------------------------------------------------------------------

# Weight files of one diffusers component folder (unet/, vae/, text_encoder/...), in order of preference: the full
# precision file, then the fp16 variant; safetensors (single or sharded) before pickles.
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
_PICKLE_STEMS = ("diffusion_pytorch_model", "pytorch_model")


def component_weight_candidates() -> list[str]:
    """File names :func:`find_component_weights` looks for, best first."""
    names = []
    for suffix in (".safetensors", ".bin"):
        for variant in ("", ".fp16"):
            for stem in _WEIGHT_STEMS if suffix == ".safetensors" else _PICKLE_STEMS:
                names += [f"{stem}{variant}{suffix}", f"{stem}{variant}{suffix}.index.json"]
    return names


def find_component_weights(folder: Path) -> Path | None:
    """The weights file (or shard index) of a diffusers component folder, or None when it holds none."""
    for name in component_weight_candidates():
        if (folder / name).is_file():
            return folder / name
    return None


@dataclass(frozen=True)
class _Stored:
    """Where one safetensors tensor's bytes are."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


class TensorReader:
    """Names, shapes and one-at-a-time reads of a checkpoint's tensors (see the module docstring).

    Use as a context manager; :meth:`read` returns a fresh tensor that shares no memory with the file or with
    other reads, so the caller may keep it as a parameter.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._stored: dict[str, _Stored] = {}
        self._pickled: dict[str, torch.Tensor] = {}
        self._files: dict[Path, BinaryIO] = {}
        name = self.path.name.lower()
        if name.endswith(".index.json"):
            for shard in _shards(self.path):
                self._add(shard)
        elif name.endswith(".safetensors") or name.endswith(PICKLE_SUFFIXES):
            self._add(self.path)
        else:
            raise UserInputError(
                f"{self.path}: not a .safetensors, pickle ({', '.join(PICKLE_SUFFIXES)}) or "
                f"shard index (.index.json) file"
            )

    def _add(self, file: Path) -> None:
        if file.name.lower().endswith(".safetensors"):
            self._stored.update(_index_safetensors(file))
        else:
            self._pickled.update(_load_pickle(file))

    # --- What is there -------------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Every tensor name, in file order (safetensors) or pickle order."""
        return [*self._stored, *self._pickled]

    def __contains__(self, key: object) -> bool:
        return key in self._stored or key in self._pickled

    def shape(self, key: str) -> tuple[int, ...]:
        """The stored shape of ``key`` (no data is read)."""
        return self._stored[key].shape if key in self._stored else tuple(self._pickled[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        """The stored dtype of ``key`` (no data is read)."""
        return self._stored[key].dtype if key in self._stored else self._pickled[key].dtype

    def nbytes(self, key: str) -> int:
        """The stored size of ``key`` in bytes (no data is read)."""
        numel = 1
        for size in self.shape(key):
            numel *= size
        return numel * self.dtype(key).itemsize

    # --- Reading ---------------------------------------------------------------------------------------------------
    def read(
        self, key: str, rows: tuple[int, int] | None = None, *, scratch: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Tensor ``key`` in its stored dtype on the CPU; with ``rows=(start, stop)`` only those rows of dim 0
        (contiguous bytes in the file, so a third of a fused q/k/v matrix costs a third of the read).

        The result is a fresh tensor, unless ``scratch`` (a uint8 CPU tensor at least as large) is given: then it
        is a view of ``scratch`` (or of the mapped pickle), valid until the next read into it. A loader that
        converts every tensor reuses one scratch, so the stored copies do not fragment the heap between the
        converted tensors it keeps.
        """
        import torch

        shape = self.shape(key)
        if rows is not None and not (len(shape) > 0 and 0 <= rows[0] <= rows[1] <= shape[0]):
            raise ValueError(f"rows {rows} out of range for {key} of shape {list(shape)}")
        if key in self._pickled:
            tensor = self._pickled[key]
            if rows is not None:
                tensor = tensor[rows[0] : rows[1]]
            return tensor if scratch is not None else tensor.clone(memory_format=torch.contiguous_format)
        return self._read_stored(key, self._stored[key], rows, scratch)

    def _read_stored(
        self, key: str, stored: _Stored, rows: tuple[int, int] | None, scratch: torch.Tensor | None
    ) -> torch.Tensor:
        offset, nbytes, shape = stored.offset, stored.nbytes, stored.shape
        if rows is not None:
            row_bytes = nbytes // shape[0] if shape[0] else 0
            offset += rows[0] * row_bytes
            nbytes = (rows[1] - rows[0]) * row_bytes
            shape = (rows[1] - rows[0], *shape[1:])
        return read_tensor(self._file(stored.file), offset, stored.dtype, shape, nbytes, scratch=scratch, key=key)

    def _file(self, path: Path) -> BinaryIO:
        if path not in self._files:
            self._files[path] = open(path, "rb", buffering=0)  # noqa: SIM115 - closed in close()
        return self._files[path]

    # --- Closing ---------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the open files and drop the mapped pickles."""
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._pickled.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def read_tensor(
    f: BinaryIO,
    offset: int,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    nbytes: int,
    *,
    key: str,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """The `nbytes` at `offset` of the open file `f` as a CPU tensor of `dtype` and `shape`, read straight into its
    own memory (no mmap, no second copy) or into the front of `scratch` (a uint8 CPU tensor at least as large; the
    result is then a view of it). A file that ends early is one line naming it and `key`."""
    import torch

    if scratch is None:
        buffer = torch.empty(nbytes, dtype=torch.uint8)
    elif scratch.dtype != torch.uint8 or scratch.device.type != "cpu" or scratch.numel() < nbytes:
        raise ValueError(f"scratch must be a uint8 CPU tensor of at least {nbytes} bytes for {key}")
    else:
        buffer = scratch[:nbytes]
    view = memoryview(buffer.numpy())
    f.seek(offset)
    done = 0
    while done < nbytes:  # a raw read may return less than asked (e.g. over 2 GiB)
        got = f.readinto(view[done:])
        if not got:
            raise UserInputError(f"{f.name}: the file is truncated (tensor {key} ends past its end)")
        done += got
    return buffer.view(dtype).reshape(shape)


# --- Formats ---------------------------------------------------------------------------------------------------------
def _index_safetensors(file: Path) -> dict[str, _Stored]:
    """Where every tensor of a safetensors file is, from its header."""
    entries, _, data_start = read_safetensors_header(file)
    dtypes = safetensors_dtypes()
    stored = {}
    for key, entry in entries.items():
        if entry.dtype not in dtypes:
            raise UserInputError(f"{file}: tensor {key} has dtype {entry.dtype}, which this loader does not read")
        dtype = dtypes[entry.dtype]
        nbytes = entry.end - entry.start
        numel = 1
        for size in entry.shape:
            numel *= size
        if nbytes != numel * dtype.itemsize:
            raise UserInputError(f"{file}: tensor {key}'s byte range does not match its shape and dtype")
        stored[key] = _Stored(file, dtype, entry.shape, data_start + entry.start, nbytes)
    return stored


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a pickle checkpoint, memory-mapped where the format allows (torch's zip format)."""
    import torch

    try:
        try:
            loaded = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            loaded = torch.load(file, map_location="cpu", weights_only=True)  # legacy format: no mmap possible
    except Exception as e:  # noqa: BLE001 - whatever unpickling a damaged or foreign file raises, it is unreadable
        if isinstance(e, UserInputError):
            raise
        reason = _pickle_failure(e, file)
        raise UserInputError(f"{file}: not a readable weights-only torch checkpoint ({reason})") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise UserInputError(f"{file}: holds a {type(loaded).__name__}, not a dict of tensors")
    return {key: value for key, value in loaded.items() if isinstance(value, torch.Tensor)}


def _pickle_failure(error: Exception, file: Path) -> str:
    """What torch.load's error says about the file, in a few words (its messages run to paragraphs)."""
    text = str(error)
    if file.is_dir():
        return "a folder, not a file"
    if file.stat().st_size == 0:
        return "empty"
    with open(file, "rb") as handle:
        head = handle.read(2)
    if not head.startswith((b"PK", b"\x80")):  # torch's zip format, or its legacy pickle
        return "its bytes are neither a zip archive nor a pickle"
    if "central directory" in text:
        return "truncated, or not a torch file: its zip directory is missing"
    inner = text.partition("WeightsUnpickler error:")[2].strip()
    if inner:
        return f"not a checkpoint of tensors: {inner.splitlines()[0][:120]}"
    return f"{type(error).__name__}: {(text.strip().splitlines() or [''])[0][:120]}"


def _shards(index: Path) -> list[Path]:
    """The shard files a ``*.index.json`` names in its ``weight_map``, each once, in first-use order."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserInputError(f"{index}: not a shard index with a weight_map ({type(e).__name__}: {e})") from None
    shards = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    for shard in shards:
        if shard.is_dir():
            raise UserInputError(f"{shard}: a folder, not the shard file {index.name} names")
        if not shard.is_file():
            raise UserInputError(f"{index}: shard {shard.name} is missing beside it")
    return shards
