"""library.train.allocator: fixed glibc malloc thresholds, a no-op elsewhere or when the user chose them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import train_network
from library.train import allocator

REPO = Path(__file__).resolve().parents[1]
ON_GLIBC = sys.platform.startswith("linux") and (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
MIB = 2**20


class FakeLibc:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1


def test_sets_both_thresholds_with_glibc():
    libc = FakeLibc()
    assert allocator.set_malloc_thresholds(environ={}, libc=libc) is True
    assert libc.calls == [(-3, allocator.MMAP_THRESHOLD_BYTES), (-1, allocator.TRIM_THRESHOLD_BYTES)]
    assert allocator.MMAP_THRESHOLD_BYTES == 1 * MIB and allocator.TRIM_THRESHOLD_BYTES == 2 * MIB


@pytest.mark.parametrize(
    "environ",
    [
        {"MALLOC_MMAP_THRESHOLD_": "65536"},
        {"MALLOC_TRIM_THRESHOLD_": "0"},
        {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"},
        {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1:glibc.malloc.trim_threshold=0"},
    ],
)
def test_user_setting_is_left_alone(environ):
    libc = FakeLibc()
    assert allocator.set_malloc_thresholds(environ=environ, libc=libc) is False
    assert libc.calls == []


def test_unrelated_tunables_do_not_count_as_a_user_setting():
    assert not allocator.user_set_thresholds({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", "MALLOC_ARENA_MAX": "2"})


@pytest.mark.parametrize("platform", ["win32", "darwin"])
def test_no_op_off_linux(monkeypatch, platform):
    monkeypatch.setattr(sys, "platform", platform)
    assert allocator._glibc() is None
    assert allocator.set_malloc_thresholds(environ={}) is False


def test_no_op_on_a_linux_without_glibc(monkeypatch):
    def musl_confstr(name: str):
        raise ValueError("unrecognized configuration name")  # what Python raises where the C library lacks it

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(os, "confstr", musl_confstr)
    assert allocator._glibc() is None
    assert allocator.set_malloc_thresholds(environ={}) is False


def test_a_failing_mallopt_reports_false():
    class Refusing(FakeLibc):
        def mallopt(self, param: int, value: int) -> int:
            super().mallopt(param, value)
            return 0

    assert allocator.set_malloc_thresholds(environ={}, libc=Refusing()) is False


# In a fresh process: free an untouched 24 MiB malloc (glibc's dynamic rule then raises the mmap threshold to
# 24 MiB), then malloc 2 MiB and count mmapped chunks. With the thresholds fixed, 2 MiB is still mmapped.
PROBE = r"""
import ctypes, sys
sys.path.insert(0, sys.argv[1])
from library.train.allocator import set_malloc_thresholds
fixed = set_malloc_thresholds() if sys.argv[2] == "fix" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
mallinfo = getattr(libc, "mallinfo2", None) or libc.mallinfo  # mallinfo2 (size_t fields) from glibc 2.33
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t if mallinfo.__name__ == "mallinfo2" else ctypes.c_int)
                for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                             "fordblks", "keepcost")]
mallinfo.restype = Info
libc.free(libc.malloc(24 << 20))
before = mallinfo().hblks
block = libc.malloc(2 << 20)
print(fixed, mallinfo().hblks - before)
"""


@pytest.mark.skipif(not ON_GLIBC, reason="glibc only")
@pytest.mark.parametrize("mode, expected", [("fix", "True 1"), ("glibc-default", "False 0")])
def test_dynamic_threshold_is_off_on_glibc(mode, expected):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
    }
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(REPO), mode], capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == expected.split()


def test_train_network_main_sets_malloc_up_first(monkeypatch):
    calls = []

    class Stop(Exception):
        pass

    def parser():
        calls.append("parser")
        raise Stop

    monkeypatch.setattr(allocator, "set_malloc_thresholds", lambda: calls.append("malloc") or True)
    monkeypatch.setattr(train_network, "build_parser", parser)
    with pytest.raises(Stop):
        train_network.main([])
    assert calls == ["malloc", "parser"]
