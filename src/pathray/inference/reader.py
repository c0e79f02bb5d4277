"""Reader threads that cut a plan's tiles ahead of the model, in order, with bounded look-ahead."""

from __future__ import annotations

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
    forward pass; at most ``lookahead`` groups are in flight, which bounds memory.
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
        self.groups: deque[tuple[int, np.ndarray, np.ndarray]] = deque(
            (c.index, c.xs[s : s + read_batch], c.ys[s : s + read_batch])
            for c in chunks
            for s in range(0, len(c), read_batch)
        )
        self.lookahead = lookahead or 2 * threads + 2
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="pathray-tiles")
        self.inflight: deque[tuple[int, Future[np.ndarray]]] = deque()
        self.last_wait = 0.0

    def _read(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        coords = [(int(x), int(y)) for x, y in zip(xs, ys, strict=True)]
        return np.stack(self.slide.read_batch(coords, self.plan.tile_size, self.plan.tile_mpp))

    def _top_up(self) -> None:
        while self.groups and len(self.inflight) < self.lookahead:
            index, xs, ys = self.groups.popleft()
            self.inflight.append((index, self.pool.submit(self._read, xs, ys)))

    def batches(self, chunk_index: int) -> Iterator[np.ndarray]:
        """The tiles of chunk ``chunk_index`` in grid order (chunks must be asked for in order)."""
        self._top_up()
        while self.inflight and self.inflight[0][0] == chunk_index:
            _, future = self.inflight.popleft()
            self._top_up()
            t0 = time.perf_counter()
            tiles = future.result()
            self.last_wait = time.perf_counter() - t0
            yield tiles

    def close(self) -> None:
        for _, future in self.inflight:
            future.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> TileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
