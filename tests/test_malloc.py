"""glibc's allocator keeps a batch's freed memory for the next one in a `recipe` process, and hands it back
between stages (malloc.py)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from recipe_runner import malloc

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's allocator only"
)

# Like a forward pass on the CPU: 64 MiB of 8 MiB blocks touched, then all freed, ten times over; the
# page faults of the last nine rounds (the first one faults its pages in either way).
_BATCHES = """
import ctypes, json, resource, sys
from recipe_runner.malloc import keep_freed_memory
tuned = keep_freed_memory() if sys.argv[1] == "tune" else False
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def batch():
    blocks = [libc.malloc(8 << 20) for _ in range(8)]
    for b in blocks:
        ctypes.memset(b, 1, 8 << 20)
    for b in blocks:
        libc.free(b)
batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(9):
    batch()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) // 1024
held = rss()
from recipe_runner.malloc import release_freed_memory
release_freed_memory()
print(json.dumps({"tuned": tuned, "faults": faults, "released_mib": held - rss()}))
"""


def _batches(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in malloc.USER_SETTINGS}
    out = subprocess.run(
        [sys.executable, "-c", _BATCHES, mode],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def test_freed_batches_are_reused_instead_of_faulted_in_again() -> None:
    default = _batches("default")
    tuned = _batches("tune")
    assert tuned["tuned"] is True
    # 9 rounds x 64 MiB = 147,456 pages: glibc's default trims and faults them all in again
    assert default["faults"] > 100_000
    assert tuned["faults"] < 1_000
    # the 64 MiB the last round freed stay with the process until a stage ends and hands them back
    assert tuned["released_mib"] > 48


def test_the_users_own_allocator_settings_win() -> None:
    assert _batches("tune", MALLOC_TRIM_THRESHOLD_="131072")["tuned"] is False
    assert malloc.keep_freed_memory({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}) is False
