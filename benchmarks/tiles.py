"""Random 224 px reads at 0.5 µm/px from a 32k x 32k synthetic slide, on one core.

    python benchmarks/tiles.py                 # local disk, SeaweedFS on 127.0.0.1, openslide, decode bound
    python benchmarks/tiles.py --size 16384 --regions 500

Prints a table, then ``vs_openslide=X vs_decode_bound=Y s3_vs_local=Z``. All rows read the
same random regions inside tissue, in the same process, pinned to one core. The SeaweedFS
server is a separate process on the other cores, as object storage never shares the reader's
core (its CPU per region is printed too). pathray reads in batches of ``--batch`` regions per slide, as
the tile stream does; its decoded-tile cache and the S3 block cache are off so no row profits
from repeats (except the one row that says so). The rows behind ``s3_vs_local`` are timed in
``--rounds`` interleaved rounds and report their medians, so a shared machine that gets busier
or quieter meanwhile moves them alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

if TYPE_CHECKING:
    from pathray.cluster.local import LocalObjectStore


def start_store_then_pin(store: LocalObjectStore) -> str:
    """Start ``store`` on every core but one, then pin this process to that one (so the server,
    whose threads keep the affinity they start with, never takes the readers' core)."""
    if not hasattr(os, "sched_setaffinity"):
        store.start()
        return "unpinned"
    cores = os.sched_getaffinity(0)
    core = min(cores)
    os.sched_setaffinity(0, cores - {core} or cores)
    try:
        store.start()
    finally:
        os.sched_setaffinity(0, {core})
    server = sorted(cores - {core}) or "the same core"
    return f"core {core} (SeaweedFS on {server})"


def server_cpu(store: LocalObjectStore) -> float:
    """CPU seconds the SeaweedFS server (and its children) have used so far."""
    import psutil

    proc = psutil.Process(store.pid)
    return sum(sum(p.cpu_times()[:2]) for p in [proc, *proc.children(recursive=True)])


def ensure_slide(workdir: Path, size: int, seed: int) -> Path:
    from pathray.wsi.synth import SynthConfig, write_synthetic_slide

    path = workdir / f"bench_{size}_{seed}.svs"
    if not path.exists():
        t0 = time.perf_counter()
        write_synthetic_slide(path, seed=seed, config=SynthConfig(size=size))
        print(f"wrote {path} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.0f} s")
    return path


def random_regions(path: Path, n: int, extent: int, seed: int) -> list[tuple[int, int]]:
    """Top-left corners (level 0) of regions that are mostly tissue."""
    from pathray.wsi.backends.open import open_slide
    from pathray.wsi.patching.tissue import tissue_mask

    slide = open_slide(path, cache=False)
    mask = tissue_mask(slide)
    w, h = slide.dimensions
    rng = np.random.default_rng(seed)
    out: list[tuple[int, int]] = []
    while len(out) < n:
        x, y = int(rng.integers(0, w - extent)), int(rng.integers(0, h - extent))
        if mask.fraction(x, y, extent, extent) >= 0.5:
            out.append((x, y))
    return out


def rate(fn: Callable[[], int], min_seconds: float = 3.0) -> float:
    """Regions per second of ``fn`` (which returns how many regions it read), repeated to ``min_seconds``."""
    fn()  # warm-up: imports, first handles
    done, t0 = 0, time.perf_counter()
    while True:
        done += fn()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return done / elapsed


def rates(fns: dict[str, Callable[[], int]], min_seconds: float, rounds: int) -> dict[str, float]:
    """Median regions per second of each ``fn``, timed in ``rounds`` interleaved rounds."""
    for fn in fns.values():
        fn()  # warm-up
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            done, t0 = 0, time.perf_counter()
            while True:
                done += fn()
                elapsed = time.perf_counter() - t0
                if elapsed >= min_seconds / rounds:
                    break
            runs[name].append(done / elapsed)
    return {name: statistics.median(values) for name, values in runs.items()}


def batches(coords: list[tuple[int, int]], size: int) -> list[list[tuple[int, int]]]:
    return [coords[i : i + size] for i in range(0, len(coords), size)]


def main(argv: list[str] | None = None) -> int:
    from pathray.datasets.config import StreamConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=32768, help="slide width and height (level 0)")
    parser.add_argument("--regions", type=int, default=1000)
    parser.add_argument(
        "--batch",
        type=int,
        default=StreamConfig().read_batch,
        help="regions per read_batch (default: the stream's data.stream.read_batch)",
    )
    parser.add_argument("--tile", type=int, default=224)
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="minimum timing per row (over all its rounds)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds for the local and S3 rows (median)"
    )
    parser.add_argument(
        "--cache-mb", type=int, default=256, help="the block cache row: its size (MiB; 0: no such row)"
    )
    parser.add_argument("--workdir", type=Path, default=Path(".bench"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--s3-batches", type=int, nargs="*", default=[64, 128], help="extra S3 rows: batch sizes"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a storage setting for every S3 row, e.g. --set coalesce_gap=1048576 (repeatable)",
    )
    args = parser.parse_args(argv)

    import imagecodecs
    import openslide

    from pathray.cluster.local import LocalObjectStore
    from pathray.wsi.backends.levels import select_level
    from pathray.wsi.backends.open import open_slide

    args.workdir.mkdir(parents=True, exist_ok=True)
    path = ensure_slide(args.workdir, args.size, args.seed)
    store = LocalObjectStore()
    where = start_store_then_pin(store)
    extent = round(args.tile * args.mpp / 0.25)
    coords = random_regions(path, args.regions, extent, args.seed)
    groups = batches(coords, args.batch)

    local = open_slide(path, cache=False, tile_cache=0)
    level = select_level(local.level_mpps, args.mpp).level

    def pathray_batches(slide, groups) -> Callable[[], int]:  # type: ignore[no-untyped-def]
        def run() -> int:
            for group in groups:
                slide.read_batch(group, args.tile, args.mpp)
            return len(coords)

        return run

    def pathray_single() -> int:
        for x, y in coords:
            local.read(x, y, args.tile, args.mpp)
        return len(coords)

    osr = openslide.OpenSlide(str(path))
    os_level = osr.get_best_level_for_downsample(args.mpp / 0.25 + 1e-6)
    os_ds = osr.level_downsamples[os_level]
    os_extent = round(extent / os_ds)

    def openslide_loop() -> int:
        for x, y in coords:
            img = osr.read_region((x, y), os_level, (os_extent, os_extent)).convert("RGB")
            arr = np.asarray(img)
            if os_extent != args.tile:
                from PIL import Image

                arr = np.asarray(
                    Image.fromarray(arr).resize((args.tile, args.tile), Image.Resampling.BILINEAR)
                )
        return len(coords)

    # The decode bound: only decoding the JPEG tiles each region touches, bytes already in memory.
    from pathray.wsi.backends.tiff import TiledLevel

    lv: TiledLevel = local._tiled[level]  # type: ignore[attr-defined]
    ds = local.level_downsamples[level]
    with open(path, "rb") as fh:
        per_region = []
        for x, y in coords:
            idx = local._tile_indices(lv, int(x // ds), int(y // ds), args.tile, args.tile)  # type: ignore[attr-defined]
            blobs = []
            for i in idx:
                fh.seek(lv.offsets[i])
                blobs.append(fh.read(lv.bytecounts[i]))
            per_region.append(blobs)
    tiles_per_region = sum(len(b) for b in per_region) / len(per_region)

    def decode_only() -> int:
        for blobs in per_region:
            for blob in blobs:
                imagecodecs.jpeg8_decode(blob, tables=lv.jpegtables)
        return len(per_region)

    rows: list[tuple[str, float]] = []
    rows.append(("openslide read_region loop (baseline)", rate(openslide_loop, args.seconds)))
    rows.append(("decode bound (JPEG decode of touched tiles)", rate(decode_only, args.seconds)))
    s3_name = f"pathray SeaweedFS S3 (127.0.0.1), read_batch of {args.batch}"
    with store:
        uri = store.upload_file(path, store.url_for(f"bench/{path.name}"))
        base = store.storage_config()  # the endpoint and where its credentials are, plus --set
        storage = type(base).model_validate(base.model_dump() | dict(s.split("=", 1) for s in args.set))
        remote = open_slide(uri, storage, cache=False, tile_cache=0)
        compared = {
            "pathray local, read() per region": pathray_single,
            "pathray local, read_batch": pathray_batches(local, groups),
            s3_name: pathray_batches(remote, groups),
        }
        rows.extend(rates(compared, args.seconds, args.rounds).items())
        before, requests, cpu = remote.bytes_read, remote.counter.requests, server_cpu(store)
        pathray_batches(remote, groups)()
        s3_server_ms = (server_cpu(store) - cpu) / len(coords) * 1e3
        s3_bytes = (remote.bytes_read - before) / len(coords)
        s3_gets = (remote.counter.requests - requests) / len(groups)
        for size in args.s3_batches:
            if size != args.batch:
                name = f"  same, read_batch of {size}"
                rows.append((name, rate(pathray_batches(remote, batches(coords, size)), args.seconds)))
        exact = open_slide(uri, storage.model_copy(update={"coalesce_gap": 0}), cache=False, tile_cache=0)
        rows.append(
            ("  same, only touching ranges merged", rate(pathray_batches(exact, groups), args.seconds))
        )
        if args.cache_mb:
            cached = storage.model_copy(update={"block_cache_bytes": args.cache_mb * 2**20})
            warm = open_slide(uri, cached, cache=False, tile_cache=0)
            name = f"  same, {args.cache_mb} MiB block cache (repeats hit it)"
            rows.append((name, rate(pathray_batches(warm, groups), args.seconds)))

    table = dict(rows)
    print(
        f"\nslide {path.name}: {args.size}x{args.size} px, level {level} for {args.mpp} µm/px, "
        f"{len(coords)} random {args.tile} px regions in tissue, {tiles_per_region:.1f} tiles/region, {where}"
    )
    print(f"{'reader':50s} {'regions/s':>10s}")
    for name, value in rows:
        print(f"{name:50s} {value:10.0f}")
    print(
        f"S3 bytes fetched per region: {s3_bytes / 1e3:.0f} kB of a {path.stat().st_size / 1e6:.0f} MB "
        f"object, {s3_gets:.1f} GETs per read_batch of {args.batch}, "
        f"{s3_server_ms:.2f} ms of server CPU"
    )
    baseline = table["openslide read_region loop (baseline)"]
    best_local = max(table["pathray local, read_batch"], table["pathray local, read() per region"])
    s3 = table[s3_name]
    bound = table["decode bound (JPEG decode of touched tiles)"]
    ratios = {
        "vs_openslide": best_local / baseline,
        "vs_decode_bound": best_local / bound,
        "s3_vs_local": s3 / best_local,
    }
    print(" ".join(f"{k}={v:.2f}" for k, v in ratios.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
