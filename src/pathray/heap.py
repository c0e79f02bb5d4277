"""A worker process keeps the memory its batches free, instead of faulting it back in each batch."""

from __future__ import annotations

import ctypes
import sys

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
KEEP_BYTES = 1 << 30  # freed memory at the heap's top kept before any is returned


def keep_freed_memory() -> bool:
    """Serve every allocation from the heap and keep what is freed there, for a process of its own.

    glibc gives each allocation over its mmap threshold (128 kB, rising to 32 MB) pages of its
    own and hands them back when it is freed. A reader that cuts 256 tiles a batch allocates
    the same few hundred MB again every batch, so every page of it is faulted in and zeroed
    again: 666k-685k page faults and 1.8-2.1 s of kernel time in a 10k-tile reader actor,
    against 145k-160k and 0.6-0.7 s with this setting (benchmarks/stream.py, /proc/<pid>/stat).
    With it the process's memory stays at its peak, so call it only in a process that exists
    to do such work (a reader actor, a Serve replica, a benchmark's worker), never in a user's
    own process, and early: before the threads that will allocate start.

    Threads that start afterwards share the main arena. glibc gives other threads arenas of their
    own, made of 64 MB heaps that it unmaps as soon as one is wholly free, whatever the trim
    threshold (and it maps a request larger than a heap by itself): model threads whose
    activations span several heaps faulted them in again every batch, in some runs and not in
    others (0.3k against 2M page faults in four passes of the model alone in
    ``benchmarks/wsi_inference.py``, as the threads happened to land; with one arena, 0.1k-0.3k).

    Returns whether the allocator took the setting (False where malloc is not glibc's: macOS,
    musl, Windows, which are left as they are).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(k, v) for k, v in ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, KEEP_BYTES), (M_ARENA_MAX, 1)))
