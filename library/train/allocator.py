"""Fixed glibc malloc thresholds, so that freed large tensors go back to the OS and memory does not depend on
the allocator's history.

Why: glibc serves a request above its mmap threshold (128 KiB at start) with its own mmap and unmaps it on free,
but it raises that threshold to the size of any mmapped chunk it frees, up to 32 MiB (and the trim threshold to
twice that). After the first large tensors are freed, every later one below 32 MiB comes from the heap, and
freed heap chunks stay resident: fragmented between live tensors, they are neither returned nor reused (PyTorch
allocates with posix_memalign(64), and such a request does not fit the hole an equal-sized one left: twelve
rounds of "16 MiB aligned, 64 KiB kept, 16 MiB freed" grow RSS by 144 MiB, by 17 MiB with plain malloc).
That hits this trainer twice:
- loading fills the models tensor by tensor, and the text encoders are freed once their outputs are cached:
  their memory stayed resident for the whole run;
- on CPU, weights stored narrower than the compute dtype (``--fp8_base``, fp16 storage) are up-cast per layer in
  forward and again in backward (library/model/fp8.py); on full-size SDXL 719 of the UNet's 794 up-casts are 1-32 MiB.
Measured on the full-size SDXL, CPU, 64 px (bench/memory_sdxl.py): resident memory while training
4.45-4.63 -> 3.1-3.4 GiB with fp8 storage and 7.0-7.3 -> 5.5-5.8 GiB with fp16 storage; peak RSS 4.64 -> 4.36
and 7.60 -> 7.42 GiB (the peak is now while loading). The price: every up-cast faults in fresh pages, which
costs CPU time (figures in README "Memory, precision and speed").

Setting M_MMAP_THRESHOLD (and M_TRIM_THRESHOLD) with mallopt fixes both values and switches the dynamic
adjustment off for the rest of the process (forked data-loader workers inherit it). A user's own
MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ or GLIBC_TUNABLES setting for either (which glibc has already
applied, and which also switches the adjustment off) is left as it is. Anything other than glibc (Windows,
macOS, musl) makes this a no-op.
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
"""Allocations of this size or more are mmapped and unmapped on free. 1 MiB sends 789 of SDXL's 794 UNet weight
up-casts (all but 2.4 MiB of 9.6 GiB per pass) to mmap, while the many small tensors of a step (LoRA weights,
norms, low-resolution activations) stay in the heap. Measured on tests/test_fp8_memory.py's layer stack: every
fixed value from 64 KiB to 8 MiB gives the same peak (77 MiB, vs 261 MiB with glibc's dynamic threshold) and
CPU time within noise of each other."""
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
