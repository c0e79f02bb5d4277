"""Reader threads that cut a plan's tiles ahead of the model, chunk by chunk, with bounded look-ahead."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from pathray.inference.grid import Chunk, GridPlan
from pathray.wsi.slide import Slide


class TileReader:
    """Reads the tiles of ``chunks`` in groups of ``read_batch`` on ``threads`` threads.

    Decoding (JPEG, resampling) releases the GIL, so threads overlap reading with the model's
    forward pass; about ``lookahead`` groups are in flight, which bounds memory. Several model
    threads may each consume a different chunk at once (``batches`` is thread-safe).
    """

    def __init__(
        self,
        slide: Slide,
        plan: GridPlan,
        chunks: list[Chunk],
        threads: int,
        read_batch: int,
        lookahead: int | None = None,
    ) -> None:
        self.slide, self.plan = slide, plan
        self.position = {c.index: i for i, c in enumerate(chunks)}
        self.groups: deque[tuple[int, np.ndarray, np.ndarray]] = deque(
            (i, c.xs[s : s + read_batch], c.ys[s : s + read_batch])
            for i, c in enumerate(chunks)
            for s in range(0, len(c), read_batch)
        )
        self.lookahead = lookahead or 2 * threads + 2
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="pathray-tiles")
        self.futures: dict[int, deque[Future[np.ndarray]]] = {}
        self.inflight = 0
        self.lock = threading.Lock()

    def _read(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        coords = [(int(x), int(y)) for x, y in zip(xs, ys, strict=True)]
        return np.stack(self.slide.read_batch(coords, self.plan.tile_size, self.plan.tile_mpp))

    def _top_up(self, through: int = -1) -> None:
        """Submit groups while under the look-ahead, and every group of chunks up to ``through``."""
        with self.lock:
            while self.groups and (self.inflight < self.lookahead or self.groups[0][0] <= through):
                pos, xs, ys = self.groups.popleft()
                self.futures.setdefault(pos, deque()).append(self.pool.submit(self._read, xs, ys))
                self.inflight += 1

    def batches(self, chunk_index: int) -> Iterator[tuple[np.ndarray, float]]:
        """``(tiles, seconds waited for them)`` of chunk ``chunk_index``, in grid order."""
        pos = self.position[chunk_index]
        self._top_up(through=pos)
        while True:
            with self.lock:
                queue = self.futures.get(pos)
                if not queue:
                    self.futures.pop(pos, None)
                    return
                future = queue.popleft()
                self.inflight -= 1
            self._top_up()
            t0 = time.perf_counter()
            tiles = future.result()
            yield tiles, time.perf_counter() - t0

    def close(self) -> None:
        with self.lock:
            for queue in self.futures.values():
                for future in queue:
                    future.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> TileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
