"""Tiles/s through the Ray Data stream vs the same reading code in a plain loop over 2 processes.

    python benchmarks/stream.py                        # 5k tiles (local, S3), then 50k for memory
    python benchmarks/stream.py --tiles 2000 --big 10000

Both sides run the same functions (``sample_slide`` then ``TileReader``, augmentation included)
on the same synthetic slides, on local disk and on the SeaweedFS endpoint (127.0.0.1), with 2
CPUs. Peak memory is the summed PSS of the driver and every Ray process, sampled twice a second,
so shared object-store pages are not counted twice. Last line:
``stream_vs_plain=X peak_rss_mb=Y`` (X: the lower of the local and S3 ratios; Y: at the big run).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np


def write_slides(workdir: Path, n: int, size: int) -> Path:
    """Synthetic slides (seed 0), every one in ``train``; reused when present."""
    from pathray.datasets.manifest import write_synthetic_dataset

    return write_synthetic_dataset(
        workdir / f"stream_{n}x{size}", n, size, fractions={"train": 1.0}, reuse=True
    )


def stream_config(tiles_per_slide: int) -> Any:
    from pathray.datasets.config import StreamConfig

    return StreamConfig(sampler={"kind": "random_tissue", "tiles_per_slide": tiles_per_slide})


def _plain_worker(args: tuple[list[dict], Any, Any]) -> int:
    """One plain process: the stream's own functions, called in a loop."""
    from pathray.datasets.stream import TileReader, sample_slide
    from pathray.wsi.tissue import TissueConfig

    rows, config, storage = args
    reader = TileReader(config, storage)
    done = 0
    for row in rows:
        coords = sample_slide(row, config, storage, TissueConfig(), worker=0, faults=None)
        if not coords:
            continue
        batch = {k: np.asarray([c[k] for c in coords]) for k in coords[0]}
        done += len(reader(batch)["x"])
    return done


def plain(manifest: Any, config: Any, storage: Any) -> tuple[float, int]:
    from pathray.datasets.stream import slide_rows

    rows = slide_rows(manifest, "train", config)
    parts = [rows[0::2], rows[1::2]]
    t0 = time.perf_counter()
    with get_context("spawn").Pool(2) as pool:
        total = sum(pool.map(_plain_worker, [(p, config, storage) for p in parts]))
    return total / (time.perf_counter() - t0), total


class PeakMemory:
    """Summed PSS of this process and all its descendants (Ray's raylet, workers, object store)."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> float:
        me = self._psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_full_info().pss
            except (self._psutil.NoSuchProcess, self._psutil.AccessDenied):
                pass
        return total / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(0.5)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def stream(manifest: Any, config: Any, storage: Any) -> tuple[float, int, float]:
    from pathray.datasets.stream import build_tile_dataset

    with PeakMemory() as mem:
        t0 = time.perf_counter()
        ds = build_tile_dataset(manifest, config, storage, split="train")
        total = 0
        for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
            total += len(batch["x"])
        rate = total / (time.perf_counter() - t0)
    return rate, total, mem.peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slides", type=int, default=8)
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--tiles", type=int, default=5000, help="tiles per timed run")
    parser.add_argument("--big", type=int, default=50000, help="tiles of the memory run")
    parser.add_argument("--workdir", type=Path, default=Path(".bench"))
    args = parser.parse_args(argv)

    from pathray.cluster.local import LocalObjectStore
    from pathray.cluster.ray_local import ensure_ray
    from pathray.datasets.manifest import load_manifest

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    path = write_slides(args.workdir, args.slides, args.size)
    local = load_manifest(path)
    config = stream_config(args.tiles // args.slides)
    ensure_ray(num_cpus=2, log_to_driver=False)
    results: dict[str, tuple[float, ...]] = {}
    with LocalObjectStore() as store:
        prefix = f"s3://{store.bucket}/stream"
        for row in local.itertuples():
            store.upload_file(Path(row.uri), f"{prefix}/{Path(row.uri).name}")
            store.upload_file(Path(row.annotations_uri), f"{prefix}/{Path(row.annotations_uri).name}")
        remote = local.assign(
            uri=[f"{prefix}/{Path(u).name}" for u in local.uri],
            annotations_uri=[f"{prefix}/{Path(u).name}" for u in local.annotations_uri],
        )
        for name, frame, storage in (
            ("local disk", local, None),
            ("SeaweedFS S3", remote, store.storage_config()),
        ):
            s_rate, s_n, s_mem = stream(frame, config, storage)
            p_rate, p_n = plain(frame, config, storage)
            results[name] = (s_rate, s_n, p_rate, p_n, s_mem)
    big_config = stream_config(args.big // args.slides)
    big_rate, big_n, big_mem = stream(local, big_config, None)

    print(
        f"\n{args.slides} synthetic slides of {args.size}^2 px, 224 px tiles at 0.5 um/px, augmented, 2 CPUs"
    )
    print(f"{'where':14s} {'stream tiles/s':>15s} {'plain 2-proc tiles/s':>21s} {'ratio':>6s} {'tiles':>7s}")
    ratios = []
    for name, (s_rate, s_n, p_rate, p_n, _) in results.items():
        ratios.append(s_rate / p_rate)
        print(f"{name:14s} {s_rate:15.0f} {p_rate:21.0f} {s_rate / p_rate:6.2f} {s_n:7d} (plain {p_n})")
    small_mem = results["local disk"][4]
    print(
        f"peak memory: {small_mem:.0f} MB streaming {results['local disk'][1]} tiles, "
        f"{big_mem:.0f} MB streaming {big_n} tiles ({big_rate:.0f} tiles/s)"
    )
    print(f"stream_vs_plain={min(ratios):.2f} peak_rss_mb={big_mem:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
