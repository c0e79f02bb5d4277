"""keep_freed_memory: memory a thread frees is served again from the heap, not faulted in again."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")

# A thread (not the main one) allocates 200 MB in 40 MB arrays and frees them, five times over;
# prints the minor page faults of each round.
ROUNDS = textwrap.dedent(
    """
    import ctypes, resource, sys, threading
    import numpy as np
    if sys.argv[1] == "keep":
        from pathray.heap import keep_freed_memory
        assert keep_freed_memory()
    elif sys.argv[1] == "without-one-arena":  # the mmap and trim settings alone
        mallopt = ctypes.CDLL(None).mallopt
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        mallopt(-4, 0), mallopt(-1, 1 << 30)
    faults = []
    def rounds():
        for _ in range(5):
            f0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            arrays = [np.ones(40 << 20, np.uint8) for _ in range(5)]
            del arrays
            faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - f0)
    thread = threading.Thread(target=rounds)
    thread.start(), thread.join()
    print(*faults)
    """
)


def faults(mode: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, check=True)
    return [int(v) for v in out.stdout.split()]


def test_a_thread_reuses_the_memory_it_freed():
    first, *later = faults("keep")
    assert first > 100 and max(later) <= first // 20, (first, later)


def test_without_one_arena_a_thread_faults_its_memory_in_again():
    """The control: the thread's own arena unmaps its wholly free heaps, so every round faults."""
    first, *later = faults("without-one-arena")
    assert min(later) > first // 10, (first, later)
