"""Keep freed memory in the process during CPU training (glibc's malloc, through mallopt).

A training step allocates and frees the same large activation and gradient buffers every step.
glibc hands blocks above its mmap threshold (adaptive, 128 KiB-32 MiB) back to the OS when they are
freed, and trims the top of its heap; the next step takes them back page by page, each first touch a
page fault that also zeroes the page. A 25M-parameter GRPO update here took 15-30 thousand of those
per step. With both thresholds raised, freed blocks stay in the heap and are reused: the faults
fall to about zero and the update ran 5-12% faster (three interleaved A/B runs: 1252 -> 1103 ms,
1224 -> 1160 ms, 1350 -> 1205 ms, median of five updates each).

The price: the process keeps the memory of its largest step until it exits (the same trade as the
jemalloc or tcmalloc preloads PyTorch's CPU tuning guide suggests, without a preload). Only on Linux
with glibc; `R1KIT_KEEP_FREED_MEMORY=0` leaves malloc alone.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Raise glibc's trim and mmap thresholds, once per process. True when they are set."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("R1KIT_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux") \
            or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # blocks up to 1 GiB from the heap (glibc refuses values above its limit: then its 32 MiB maximum)
    mmap_ok = libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1 or libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1
    trim_ok = libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
    _applied = bool(mmap_ok and trim_ok)
    return _applied
