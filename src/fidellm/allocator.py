"""glibc malloc settings for CPU tensor work: keep freed blocks for reuse instead of handing them back.

PyTorch's CPU allocator does not cache: every temporary tensor is a malloc and a free. glibc serves
blocks above its mmap threshold with fresh mmaps, and trims the top of the heap once more than twice that
threshold is free, so a forward pass faults its temporaries' pages in again (zero-filled) on every call.
On the H-Net's many mid-sized activations that was a quarter of CPU evaluation time (benchmarks/RESULTS.md,
"glibc malloc"). Fixing the mmap threshold at glibc's largest (32 MiB) and the trim threshold at 2 GiB
keeps those blocks in the heap. Blocks above 32 MiB are still mmapped and unmapped when freed.

This is what the environment variables MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ do; a user who
sets either keeps their own choice, and other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's maximum on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int
ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process; True when both were set."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in ENVIRONMENT):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # musl's mallopt is a stub that returns 0; glibc returns 1 on success
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
