"""A Ray-free tile feed for one GPU box: producer processes -> shared slots -> a loader thread -> device.

    feed = ProcessFeed(manifest, cfg, batch=64, producers=14, device=torch.device("cuda"))
    for batch in feed: ...            # tensors already on the device; feed.close() at the end

Each producer process runs the stream's own reading code (``sample_slide`` then ``TileReader``,
augmentation included) over every n-th sampling row and writes whole batches into a ring of
file-backed shared slots (no pickling of pixels, no /dev/shm size limit); only the slot number and
the string columns cross a queue. A loader thread in the consumer copies a slot into pinned memory
and on to the device with a non-blocking copy on its own CUDA stream, so the training loop only
ever takes a finished batch off a queue.
"""

from __future__ import annotations

import contextlib
import os
import queue
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

Schema = dict[str, tuple[tuple[int, ...], str]]  # numeric column -> (per-tile shape, dtype)


def read_batches(manifest: Any, cfg: Any, batch: int, worker: int, workers: int) -> Any:
    """Numpy batches of exactly ``batch`` tiles from every ``workers``-th sampling row, epoch after epoch."""
    from pathray.datasets.stream import TileReader, sample_slide, slide_rows

    stream, storage = cfg.data.stream, cfg.storage
    reader = TileReader(stream, cfg.task_spec(), storage)
    carry: dict[str, np.ndarray] | None = None
    epoch = 0
    while True:
        rows = slide_rows(manifest, cfg.data.split, stream, range(epoch, epoch + 1))[worker::workers]
        if not rows:
            return
        for row in rows:
            coords = sample_slide(row, stream, storage, cfg.tissue, worker=0, faults=None)
            if not coords:
                continue
            tiles = reader({k: np.asarray([c[k] for c in coords]) for k in coords[0]})
            if carry is not None:
                tiles = {k: np.concatenate([carry[k], tiles[k]]) for k in tiles}
            n = len(tiles["x"])
            for start in range(0, n - batch + 1, batch):
                yield {k: v[start : start + batch] for k, v in tiles.items()}
            rest = n - n % batch
            carry = {k: v[rest:] for k, v in tiles.items()} if rest < n else None
        epoch += 1


def probe_schema(manifest: Any, cfg: Any) -> Schema:
    """Shapes and dtypes of the numeric columns, from one tiny batch read here (sizes the slots)."""
    first = next(read_batches(manifest, cfg, 1, 0, 1))
    return {k: (v.shape[1:], v.dtype.str) for k, v in first.items() if v.dtype.kind in "biuf"}


def _slots(folder: str, schema: Schema, slots: int, batch: int, mode: str) -> dict[str, np.memmap]:
    return {
        k: np.memmap(Path(folder) / f"{k}.bin", dtype=np.dtype(dt), mode=mode, shape=(slots, batch, *shape))
        for k, (shape, dt) in schema.items()
    }


def _take(q: Any, stop: Any) -> Any:
    while not stop.is_set():
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            continue
    return None


def produce(args: tuple, folder: str, schema: Schema, n_slots: int, free: Any, ready: Any, stop: Any) -> None:
    """One producer process: read batches, write each into a free slot, announce it on ``ready``."""
    manifest, cfg, batch, worker, workers = args
    try:
        slots = _slots(folder, schema, n_slots, batch, "r+")
        for tiles in read_batches(manifest, cfg, batch, worker, workers):
            slot = _take(free, stop)
            if slot is None:
                return
            for key, array in slots.items():
                array[slot] = tiles[key]
            ready.put((slot, {k: v.tolist() for k, v in tiles.items() if k not in schema}))
        ready.put(f"producer {worker}: the stream ended")
    except Exception as exc:  # noqa: BLE001 - reported by the consumer, which stops the run
        ready.put(f"producer {worker}: {type(exc).__name__}: {exc}")


class ProcessFeed:
    """Batches from ``producers`` spawned processes, delivered as tensors on ``device`` by a loader thread."""

    def __init__(
        self,
        manifest: Any,
        cfg: Any,
        batch: int,
        producers: int,
        device: Any,
        timeout: float = 300.0,
        slots_per_producer: int = 2,
        prefetch: int = 3,
    ) -> None:
        import torch
        from torch import multiprocessing as mp

        self.device, self.timeout = torch.device(device), timeout
        self.schema = probe_schema(manifest, cfg)
        self._dir = tempfile.TemporaryDirectory(prefix="pathray-feed-")
        n_slots = max(2, slots_per_producer * producers)
        self._slots = _slots(self._dir.name, self.schema, n_slots, batch, "w+")
        ctx = mp.get_context("spawn")
        self._free, self._ready, self._stop = ctx.Queue(), ctx.Queue(), ctx.Event()
        for slot in range(n_slots):
            self._free.put(slot)
        self._out: queue.Queue[Any] = queue.Queue(maxsize=prefetch)
        saved = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"  # a producer is one core's worth of reading
        try:
            self._procs = [
                ctx.Process(
                    target=produce,
                    args=(
                        (manifest, cfg, batch, i, producers),
                        self._dir.name,
                        self.schema,
                        n_slots,
                        self._free,
                        self._ready,
                        self._stop,
                    ),
                    daemon=True,
                )
                for i in range(producers)
            ]
            for p in self._procs:
                p.start()
        finally:
            if saved is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = saved
        self._loader = threading.Thread(target=self._load, daemon=True)
        self._loader.start()

    def _load(self) -> None:
        """Slot -> pinned buffer -> device (its own stream); the slot is free again once copied out.

        Packed tiles (``data.stream.decode: device``) come through the queue as bytes and are
        decoded, cut and augmented on the device, on the same stream."""
        import torch

        from pathray.datasets.stream import packed_images

        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None
        consumer = torch.cuda.current_stream(self.device) if cuda else None
        while not self._stop.is_set():
            item = _take(self._ready, self._stop)
            if item is None or isinstance(item, str):
                with contextlib.suppress(queue.Full):
                    self._out.put_nowait(item or "the feed was closed")
                return
            slot, strings = item
            out: dict[str, Any] = dict(strings)
            packed = out.pop("packed", None)  # decode: device, tiles as stored: decoded on the device
            draws = np.array(self._slots["augment"][slot]) if packed and "augment" in self._slots else None
            moved = [k for k in self.schema if not (packed and k == "augment")]
            for key in moved:
                host = torch.from_numpy(np.asarray(self._slots[key][slot]))
                out[key] = host.pin_memory() if cuda else host.clone()
            self._free.put(slot)
            if cuda:
                with torch.cuda.stream(stream):
                    for key in moved:
                        out[key] = out[key].to(self.device, non_blocking=True)
                        out[key].record_stream(consumer)  # freed for reuse only after the step used it
                    if packed:
                        out["image"] = packed_images(packed, draws, self.device)
                        out["image"].record_stream(consumer)
                stream.synchronize()
            elif packed:
                out["image"] = packed_images(packed, draws, self.device)
            while not self._stop.is_set():
                try:
                    self._out.put(out, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def __iter__(self) -> ProcessFeed:
        return self

    def __next__(self) -> dict[str, Any]:
        try:
            item = self._out.get(timeout=self.timeout)
        except queue.Empty:
            raise RuntimeError(f"the producers delivered no batch in {self.timeout:.0f} s") from None
        if isinstance(item, str):
            raise RuntimeError(item)
        return item

    def close(self) -> None:
        """Stop the producers (terminated if they do not stop within 10 s) and remove the slots."""
        self._stop.set()
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        self._loader.join(timeout=10)
        for q in (self._free, self._ready):
            q.cancel_join_thread()
            q.close()
        self._slots.clear()
        self._dir.cleanup()
