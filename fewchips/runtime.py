"""Process-wide settings for running PyTorch on a CPU.

glibc returns large freed blocks to the kernel (blocks over 32 MiB are always mmap'd, and freed heap
memory above a threshold is trimmed), so every training step's big tensors (weight gradients,
logits, bf16 copies of the expert weights) land on fresh pages and pay a page fault per 4 KiB:
measured here, a 32 MiB fp32 copy took 12 ms on fresh pages against 2.2 ms on reused ones. Keeping
freed memory in the heap, as jemalloc and tcmalloc do, removes that; the cost is that the process
keeps its peak memory until it exits. The CLI and the benchmarks call this; set
FEWCHIPS_KEEP_FREED_MEMORY=0 to leave the allocator alone."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4      # <malloc.h>


def keep_freed_memory() -> bool:
    """Tell glibc malloc never to mmap or trim, so freed memory is reused. True if applied."""
    if os.environ.get("FEWCHIPS_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):     # musl and other C libraries have no mallopt
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
