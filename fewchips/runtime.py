"""Process-wide settings for running PyTorch on a CPU.

glibc returns large freed blocks to the kernel (blocks over 32 MiB are always mmap'd, and freed heap
memory above a threshold is trimmed), so every training step's big tensors (weight gradients,
logits, bf16 copies of the expert weights) land on fresh pages and pay a page fault per 4 KiB:
measured here, a 32 MiB fp32 copy took 12 ms on fresh pages against 2.2 ms on reused ones. Keeping
freed memory in the heap, as jemalloc and tcmalloc do, removes that; the cost is that the process
keeps its peak memory until it exits, and a heap of many mid-sized blocks fragments. So the CLI keeps
freed memory in one process and returns it when it is one of N (`tune_allocator`)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4      # <malloc.h>


def _mallopt():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):     # musl and other C libraries have no mallopt
        return None


def keep_freed_memory() -> bool:
    """Tell glibc malloc never to mmap or trim, so freed memory is reused. True if applied."""
    mallopt = _mallopt()
    if os.environ.get("FEWCHIPS_KEEP_FREED_MEMORY", "1") == "0" or mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def return_freed_memory() -> bool:
    """The opposite, for a process that holds 1/N of a model: every block over 1 MiB is mmap'd and goes back
    to the kernel when freed. glibc's default raises that threshold up to 32 MiB as blocks are freed, so a
    rank's shards, gradients and gathered layers (a few MiB each) land in the heap and fragment it:
    measured on 4 gloo ranks (benchmarks/bench_memory.py), the peak above an idle interpreter fell from
    950 to 690 MiB (and to 2,040 with `keep_freed_memory`). True if applied."""
    mallopt = _mallopt()
    return mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, 1 << 20))


def tune_allocator(world_size: int) -> str:
    """One process: keep freed memory (speed; it holds the whole model anyway). Several: return it (each
    holds a shard, and its peak is what lets a model fit). FEWCHIPS_KEEP_FREED_MEMORY=1 keeps it at any
    size, 0 leaves the allocator alone."""
    forced = os.environ.get("FEWCHIPS_KEEP_FREED_MEMORY")
    if forced == "0":
        return "default"
    if forced == "1" or world_size == 1:
        return "kept" if keep_freed_memory() else "default"
    return "returned" if return_freed_memory() else "default"
