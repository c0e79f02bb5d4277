"""Tiles/s through the Ray Data stream vs the same reading code in a plain loop over 2 processes.

    python benchmarks/stream.py                         # 20k tiles (local, S3), 3 pairs; 5k, 50k: memory
    python benchmarks/stream.py --scale 0.1 --repeat 1  # a quick check: 2k timed, 500 and 5k for memory

Both sides run the same code (``ChunkReader.read``: ``sample_slide`` then ``TileReader``,
augmentation included) in processes of their own set up alike (``own_process``: the allocator
keeps freed batches, ``data.stream.reader_keeps_memory``) on the same synthetic slides, on local
disk and on the SeaweedFS endpoint (127.0.0.1), with 2 CPUs. Neither side's clock covers what a
cluster does once in its life: ``ray.init``, and the actors Ray Data starts the first time a cluster
streams (its stats, autoscaling-coordinator and actor-location actors, detached: they live as long as
the cluster). A first stream of one tile a slide, before the timed runs, starts them; the table's
``cold start`` line shows what it cost. Peak memory is the summed PSS of
the driver and every Ray process, sampled twice a second in the two memory runs only (sampling
PSS costs CPU the timed runs would feel), so shared object-store pages are not counted twice.
Last line:
``stream_vs_plain=X peak_rss_mb=Y rss_growth=Z`` (X: the lower of the local and S3 ratios of
overall tiles/s, each stream's own start-up included, the median over ``--repeat`` pairs, which
alternate which side goes first; Y: at the big run;
Z: peak at the big run / peak at the small run, flat memory is 1.0). The table also shows the
rates after the first delivery, the seconds to the first tiles, and the CPU seconds each side
spent per 1000 tiles (every process: driver, Ray's, the pool's), so start-up cost, steady
throughput and overhead can be told apart on a machine whose other load moves the wall clock.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from dataclasses import dataclass
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


def segmentation() -> Any:
    """The task the stream cuts targets for: Gleason segmentation, as the shipped projects."""
    from pathray.models.tasks import build_task

    return build_task({"name": "segmentation"})


def _plain_worker(args: tuple[list[dict], Any, Any]) -> tuple[int, tuple[float, int] | None, float]:
    """One plain process: the stream's reader actor's own code, called in a loop."""
    from pathray.datasets.stream import ChunkReader
    from pathray.storage import StorageConfig
    from pathray.wsi.patching.tissue import TissueConfig

    rows, config, storage = args
    reader = ChunkReader(config, segmentation(), storage or StorageConfig(), TissueConfig(), own_process=True)
    done, first = 0, None
    for row in rows:
        out = reader.read(row)
        if out is None:
            continue
        n = len(out["x"])
        if first is None:
            first = (time.time(), n)
        done += n
    return done, first, time.time()


def plain(manifest: Any, config: Any, storage: Any) -> Rates:
    """Two spawned processes share the slide chunks; the clock runs from before the pool starts."""
    from pathray.datasets.stream import slide_rows

    rows = slide_rows(manifest, "train", config)
    parts = [rows[0::2], rows[1::2]]
    with Usage() as usage:
        t0 = time.time()
        with get_context("spawn").Pool(2) as pool:
            out = pool.map(_plain_worker, [(p, config, storage) for p in parts])
    total = sum(n for n, _, _ in out)
    firsts = [f for _, f, _ in out if f is not None]
    t_first = min(t for t, _ in firsts)
    after_first = total - sum(n for t, n in firsts if t == t_first)
    t_end = max(t for _, _, t in out)
    steady = after_first / (t_end - t_first)
    return Rates(total, t_end - t0, steady, t_first - t0, usage.peak, usage.cpu_s)


class Usage:
    """What this process and all its descendants (Ray's raylet, workers, object store; the pool's
    processes) use while it is open: CPU seconds and, with ``memory``, peak summed PSS.

    Sampled twice a second: a process's CPU time counts up to its last sample, so one that ends
    between two samples loses at most half a second of it. PSS costs ~50 ms of this process's CPU
    a sample (the kernel walks every Ray process's object-store mapping), so only the memory runs
    take it: the timed runs, either side, pay a few /proc reads.
    """

    def __init__(self, memory: bool = False) -> None:
        import psutil

        self._psutil = psutil
        self._memory = memory
        self.peak = 0.0
        self._base: dict[int, float] = {}
        self._cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self, first: bool = False) -> None:
        me = self._psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    total += p.memory_full_info().pss if self._memory else 0
            except (self._psutil.NoSuchProcess, self._psutil.AccessDenied):
                continue
            self._base.setdefault(p.pid, t.user + t.system if first else 0.0)
            self._cpu[p.pid] = t.user + t.system
        self.peak = max(self.peak, total / 2**20)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._sample()

    @property
    def cpu_s(self) -> float:
        return sum(cpu - self._base[pid] for pid, cpu in self._cpu.items())

    def __enter__(self) -> Usage:
        self._sample(first=True)  # processes there before: only their CPU time from now on counts
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


@dataclass
class Rates:
    """Tiles delivered, wall seconds, tiles/s after the first delivery, seconds to the first,
    peak PSS (MB) and CPU seconds of every process."""

    tiles: int
    seconds: float
    steady: float
    startup: float
    peak_mb: float = 0.0
    cpu_s: float = 0.0

    @property
    def overall(self) -> float:
        return self.tiles / self.seconds

    @property
    def cpu_per_1k(self) -> float:
        return 1000 * self.cpu_s / self.tiles


def stream(manifest: Any, config: Any, storage: Any, memory: bool = False) -> Rates:
    """The Ray Data stream into one consumer; the clock runs from before the dataset is built."""
    from pathray.datasets.stream import build_tile_dataset

    with Usage(memory) as usage:
        t0 = time.time()
        ds = build_tile_dataset(manifest, config, segmentation(), storage, split="train")
        total, first = 0, None
        for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
            n = len(batch["x"])
            if first is None:
                first = (time.time(), n)
            total += n
        t_end = time.time()
    assert first is not None, "the stream delivered nothing"
    steady = (total - first[1]) / (t_end - first[0])
    return Rates(total, t_end - t0, steady, first[0] - t0, usage.peak, usage.cpu_s)


def pair(manifest: Any, config: Any, storage: Any, stream_first: bool) -> tuple[Rates, Rates]:
    """One stream run and one plain run on the same rows, in the given order."""
    if stream_first:
        s_ = stream(manifest, config, storage)
        return s_, plain(manifest, config, storage)
    p_ = plain(manifest, config, storage)
    return stream(manifest, config, storage), p_


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slides", type=int, default=8)
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--tiles", type=int, default=20000, help="tiles per timed run")
    parser.add_argument("--small", type=int, default=5000, help="tiles of the first memory run")
    parser.add_argument("--big", type=int, default=50000, help="tiles of the second memory run")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies --tiles, --small and --big")
    parser.add_argument("--repeat", type=int, default=3, help="stream/plain pairs per store (median)")
    parser.add_argument("--workdir", type=Path, default=Path(".bench"))
    args = parser.parse_args(argv)
    tiles, small_n, big_n = (
        max(args.slides, round(n * args.scale)) for n in (args.tiles, args.small, args.big)
    )

    from pathray.cluster.local import LocalObjectStore
    from pathray.cluster.ray_local import ensure_ray
    from pathray.datasets.manifest import load_manifest

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    path = write_slides(args.workdir, args.slides, args.size)
    local = load_manifest(path)
    config = stream_config(tiles // args.slides)
    results: dict[str, list[tuple[Rates, Rates]]] = {}
    with LocalObjectStore() as store:
        # after the store: its credentials are in this process's environment, which Ray's workers inherit
        ensure_ray(num_cpus=2, log_to_driver=False)
        cold = stream(local, stream_config(1), None)  # Ray Data's once-a-cluster actors start here
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
            results[name] = [pair(frame, config, storage, i % 2 == 0) for i in range(args.repeat)]
    small = stream(local, stream_config(small_n // args.slides), None, memory=True)
    big = stream(local, stream_config(big_n // args.slides), None, memory=True)

    print(
        f"\n{args.slides} synthetic slides of {args.size}^2 px, 224 px tiles at 0.5 um/px, augmented, "
        f"2 CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    print(
        "tiles/s overall (clock from before start) and steady (after the first delivery); s to first tiles; "
        "CPU s per 1000 tiles"
    )
    head = f"{'where':14s} {'tiles':>7s} {'stream':>8s} {'plain':>8s} {'ratio':>6s}"
    print(f"{head} {'steady s/p':>11s} {'ratio':>6s} {'first s/p':>10s} {'cpu s/p':>10s}")
    ratios = []
    for name, pairs in results.items():
        for s_, p_ in pairs:
            rates = f"{s_.overall:8.0f} {p_.overall:8.0f} {s_.overall / p_.overall:6.2f}"
            steady = f"{s_.steady:5.0f}/{p_.steady:<5.0f} {s_.steady / p_.steady:6.2f}"
            costs = f"{s_.startup:4.1f}/{p_.startup:<4.1f} {s_.cpu_per_1k:4.1f}/{p_.cpu_per_1k:<4.1f}"
            print(f"{name:14s} {s_.tiles:7d} {rates} {steady} {costs}")
        ratios.append(float(np.median([s_.overall / p_.overall for s_, p_ in pairs])))
    print(
        f"cold start: the first stream on the new cluster ({cold.tiles} tiles) took {cold.startup:.1f} s to "
        f"its first tiles, {cold.cpu_s:.1f} CPU s in all (Ray Data starting its cluster's actors)"
    )
    print(
        f"peak memory (PSS of driver + Ray): {small.peak_mb:.0f} MB streaming {small.tiles} tiles, "
        f"{big.peak_mb:.0f} MB streaming {big.tiles} tiles ({big.overall:.0f} tiles/s)"
    )
    print(
        f"stream_vs_plain={min(ratios):.2f} peak_rss_mb={big.peak_mb:.0f} "
        f"rss_growth={big.peak_mb / small.peak_mb:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
