"""Fixed glibc malloc thresholds, so that freed large tensors go back to the OS and peak memory does not depend
on the allocator's history.

Why: on CPU, weights stored narrower than the compute dtype (``--fp8_base``, fp16 storage) are up-cast per layer
in forward and again in backward (library/fp8.py); on full-size SDXL each up-cast is a 6-56 MiB fp32 buffer,
freed right after use. glibc serves a request above its mmap threshold (128 KiB at start) with its own mmap and
unmaps it on free, but it also raises that threshold to the size of any mmapped chunk it frees, up to 32 MiB
(and the trim threshold to twice that). After the first few up-casts are freed, every later up-cast below
32 MiB comes from the heap instead, and the freed chunks stay resident there: fragmented between live
tensors, they are neither returned nor always reusable. Peak memory then depends on which sizes happened to be
freed first, and it grows by tens to hundreds of MiB (see README "Memory, precision and speed" for figures).

Setting M_MMAP_THRESHOLD (and M_TRIM_THRESHOLD) with mallopt fixes both values and switches the dynamic
adjustment off for the rest of the process. A user's own MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ or
GLIBC_TUNABLES setting for either (which glibc has already applied, and which also switches the adjustment
off) is left as it is. Anything other than glibc (Windows, macOS, musl, an LD_PRELOADed allocator still leaves
glibc's symbols; those are harmless) makes this a no-op.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Mapping

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 1 << 20
"""Allocations of this size or more are mmapped and unmapped on free. 1 MiB: every weight up-cast of SDXL
(>= 1.6 MiB) is returned at once, while the many small tensors of a step stay in the heap (measured: thresholds
from 64 KiB to 4 MiB give the same peak; 1 MiB spends no more CPU time than glibc's own 128 KiB start value)."""
TRIM_THRESHOLD_BYTES = 2 * MMAP_THRESHOLD_BYTES
"""Free memory at the top of the heap beyond this is given back (glibc's own ratio to the mmap threshold)."""

_USER_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_USER_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")


def _glibc() -> ctypes.CDLL | None:
    """The running process's glibc, or None (another OS or C library)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION")  # "glibc 2.36"; unset (ValueError/None) on musl
    except (ValueError, OSError):
        return None
    if not version or not version.startswith("glibc"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def user_set_thresholds(environ: Mapping[str, str]) -> bool:
    """True when the environment already chose glibc's mmap or trim threshold (glibc read it at start-up)."""
    if any(environ.get(name) for name in _USER_ENV):
        return True
    tunables = environ.get("GLIBC_TUNABLES", "")
    return any(item.split("=", 1)[0].strip() in _USER_TUNABLES for item in tunables.split(":"))


def set_malloc_thresholds(
    mmap_threshold: int = MMAP_THRESHOLD_BYTES,
    trim_threshold: int = TRIM_THRESHOLD_BYTES,
    environ: Mapping[str, str] = os.environ,
    libc: ctypes.CDLL | None = None,
) -> bool:
    """Fix glibc's mmap and trim thresholds for this process (see the module docstring for why).

    Call it before the first large tensor is allocated. Returns True when both were set; False, changing
    nothing, when the C library is not glibc or the environment already sets either threshold.
    `libc` is for tests (default: the process's glibc, looked up here)."""
    if user_set_thresholds(environ):
        return False
    libc = libc if libc is not None else _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )
