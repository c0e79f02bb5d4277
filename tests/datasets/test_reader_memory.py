"""A reader in a process of its own keeps the memory its batches free; one in a user's process does not."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Run in a fresh interpreter each: the allocator setting is process-wide and would stay in pytest's.
SCRIPT = """
import ctypes, json, resource, sys
from pathray.datasets.config import StreamConfig
from pathray.datasets.stream import ChunkReader
from pathray.models.tasks import build_task
from pathray.storage import StorageConfig
from pathray.wsi.patching.tissue import TissueConfig

own, keep = json.loads(sys.argv[1])
ChunkReader(StreamConfig(reader_keeps_memory=keep), build_task({"name": "segmentation"}),
            StorageConfig(), TissueConfig(), own_process=own)
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 64 << 20  # a batch's buffer: over glibc's largest mmap threshold (32 MB)

def batch():
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(p)

batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    batch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(own: bool, keep: bool) -> int:
    """Page faults of four more 64 MB batches after the first, in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, f"[{str(own).lower()}, {str(keep).lower()}]"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator only")
def test_a_reader_that_owns_its_process_keeps_freed_batches_and_others_leave_the_allocator_alone():
    pages = 4 * (64 << 20) // 4096  # every page of the four batches, faulted in again
    kept = faults(own=True, keep=True)
    in_user_process = faults(own=False, keep=True)
    switched_off = faults(own=True, keep=False)
    assert kept < pages // 100, kept  # the first batch's pages serve the next ones
    assert in_user_process > pages // 2, in_user_process  # a user's process keeps glibc's defaults
    assert switched_off > pages // 2, switched_off  # data.stream.reader_keeps_memory: false
