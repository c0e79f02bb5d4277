"""benchmarks/tiles.py runs at a small size: every row, its last line, and the S3 server on cores
the timed reader does not use."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "tiles.py"
LAST = re.compile(r"^vs_openslide=\d+\.\d\d vs_decode_bound=\d+\.\d\d s3_vs_local=\d+\.\d\d$")


def test_the_tiles_benchmark_runs_every_row(tmp_path):
    args = ["--size", "4096", "--regions", "40", "--batch", "16", "--seconds", "0.3", "--rounds", "1"]
    args += ["--cache-mb", "8", "--s3-batches", "8", "--workdir", str(tmp_path)]
    out = subprocess.run(
        [sys.executable, str(BENCHMARK), *args], capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert LAST.match(lines[-1]), lines[-1]
    assert all(float(item.split("=")[1]) > 0 for item in lines[-1].split())
    rows = "\n".join(lines)
    for row in (
        "read_batch of 16",
        "same, read_batch of 8",
        "only touching ranges merged",
        "8 MiB block cache",
    ):
        assert re.search(rf"{re.escape(row)}.*\s\d+$", rows, re.M), row
    assert re.search(r"S3 bytes fetched per region: \d+ kB .* ms of server CPU$", rows, re.M)
    header = next(line for line in lines if line.startswith("slide bench_4096_0.svs"))
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    if len(cores) > 1:  # the server was started on the other cores, before the reader was pinned
        reader = min(cores)
        assert f"core {reader} (SeaweedFS on {sorted(cores - {reader})})" in header, header
