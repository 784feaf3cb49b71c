"""glibc's allocator settings for a `recipe` process: keep freed memory for the next batch instead of
handing it back to the kernel and faulting it in again; hand it back between stages.

By default glibc adapts two thresholds as a program runs: blocks above the mmap threshold get pages of
their own, and free memory above the trim threshold at the top of the heap goes back to the kernel.
Both follow the largest block freed so far (trim = 2 x mmap, at most 32 MiB for mmap). A forward pass
on the CPU frees a batch's activations all at once, far more than that, so the heap is trimmed after
every batch and the next one faults every page back in, zeroed by the kernel: 1.5 million page faults
(4.3 s of system time) in the demo's run, 1.7 million for one encoding pass of its 2,048 images.

With fixed thresholds (32 MiB, glibc's own ceiling, and 128 MiB) that pass took 3.2 s instead of 5.1 s
with no faults, and the demo's training steps 8% less time. What a stage freed is handed back once it
ends (`release_freed_memory`: the run's stages, the precompute), else the encoder's last batch would
stay in the RSS under the training's peak: with it, the peak went from 1,460-1,500 to 1,390 MiB on the
demo's config. benchmarks/RESULTS.md has the figures.

Applied only to a process the command line started (cli/process.py), on glibc, and not where the user
set glibc's malloc tunables themselves (MALLOC_*_ variables or GLIBC_TUNABLES). An allocator preloaded
in glibc's place (jemalloc, tcmalloc) does not read these settings.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

MMAP_THRESHOLD = 32 << 20  # blocks larger than this get their own pages (glibc's dynamic ceiling)
TRIM_THRESHOLD = 128 << 20  # free memory at the heap's top kept for reuse, up to this much

# mallopt's parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """This process's C library where it is glibc (whose allocator these settings are for), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def keep_freed_memory(environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Fix glibc's mmap and trim thresholds for this process (see the module's docstring); whether it
    did. Nothing happens off glibc or where the user chose the allocator's settings themselves."""
    libc = _glibc()
    if libc is None or any(environ.get(name) for name in USER_SETTINGS):
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Setting either one turns off glibc's adapting of both: set both.
    mmap_set = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    return bool(mmap_set) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def release_freed_memory() -> None:
    """Hand the heap's free memory back to the kernel now (glibc's malloc_trim): between stages, so what
    one stage freed (loading, encoding) does not stay in this process's RSS under the next one's peak."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
