"""glibc's allocator kept from handing large tensor buffers back to the kernel.

By default glibc serves every buffer above a dynamic mmap threshold with its own mapping and
trims freed heap tops at once, so each training iteration faults its activations in again
page by page. Buffers up to 32 MiB on the heap and freed memory kept (up to 1 GiB, with a
256 MiB pad) take the camvid classifier's step from ~200,000 minor page faults to a few
thousand per iteration (benchmarks/bench_allocator.py; docs/experiments/speed.md). The numbers
a step computes do not change; the process keeps up to the trim threshold of freed memory.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameters (malloc.h) and the values set
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 1 << 30, M_TOP_PAD: 256 << 20}
USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def tune_allocator() -> bool:
    """Set SETTINGS through glibc's mallopt, unless the user set any of glibc's own variables
    or this is not glibc (macOS, musl): then nothing changes. True when set."""
    if any(name in os.environ for name in USER_VARIABLES):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, value) == 1 for param, value in SETTINGS.items())
