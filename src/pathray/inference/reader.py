"""Reader threads that cut a plan's tiles ahead of the model, straight into whole model batches."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from pathray.inference.grid import Chunk, GridPlan
from pathray.storage import StorageUnavailableError
from pathray.wsi.backends.errors import SlideError
from pathray.wsi.backends.slide import Slide

FILL = 255
"""Pixel value of a tile that could not be decoded (its predictions are dropped, never stitched)."""


class BatchBuffers:
    """Reusable uint8 ``(batch, size, size, 3)`` arrays, so pages are touched once, not per batch.

    With ``pinned`` (CUDA), every batch is a fresh page-locked tensor from torch's caching host
    allocator instead: it hands a block out again only once the copies reading it have finished.
    """

    def __init__(self, batch: int, size: int, pinned: bool = False) -> None:
        self.shape, self.pinned = (batch, size, size, 3), pinned
        self.free: list[torch.Tensor] = []
        self.lock = threading.Lock()

    def get(self) -> torch.Tensor:
        if self.pinned:
            return torch.empty(self.shape, dtype=torch.uint8, pin_memory=True)
        with self.lock:
            if self.free:
                return self.free.pop()
        return torch.empty(self.shape, dtype=torch.uint8)

    def put(self, buffer: torch.Tensor) -> None:
        """Give back a batch whose pixels are no longer needed (after the forward pass)."""
        if not self.pinned:
            with self.lock:
                self.free.append(buffer)


@dataclass
class _Batch:
    buffer: torch.Tensor
    n: int
    parts: list[tuple[int, Future[list[tuple[int, str]]]]]  # (first row, its undecodable rows)

    @property
    def tiles(self) -> torch.Tensor:
        return self.buffer[: self.n]

    def failed(self) -> list[tuple[int, str]]:
        """``(row, cause)`` of the tiles that could not be decoded; waits for the parts."""
        return [(start + k, cause) for start, part in self.parts for k, cause in part.result()]


class TileReader:
    """Reads the tiles of ``chunks``, batch by batch, ``read_batch`` tiles per task on ``threads`` threads.

    Each model batch (``batch`` tiles of one chunk) gets one buffer; reader threads write their
    tiles into its rows, so a batch reaches the model without being stacked, concatenated or
    copied again. Decoding (JPEG, resampling) releases the GIL, so threads overlap reading with
    the forward pass; about ``lookahead`` tasks are in flight, which bounds memory. Several model
    threads may each consume a different chunk at once (``batches`` is thread-safe).
    """

    def __init__(
        self,
        slide: Slide,
        plan: GridPlan,
        chunks: list[Chunk],
        threads: int,
        read_batch: int,
        batch: int,
        pinned: bool = False,
        lookahead: int | None = None,
    ) -> None:
        self.slide, self.plan = slide, plan
        self.position = {c.index: i for i, c in enumerate(chunks)}
        self.buffers = BatchBuffers(batch, plan.tile_size, pinned)
        # (chunk position, batch start, tiles in batch): the order batches are read in
        self.todo: deque[tuple[int, Chunk, int, int]] = deque(
            (i, c, s, min(batch, len(c) - s)) for i, c in enumerate(chunks) for s in range(0, len(c), batch)
        )
        self.read_batch = max(1, read_batch)
        self.lookahead = lookahead or 2 * threads + 2
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="pathray-tiles")
        self.queued: dict[int, deque[_Batch]] = {}
        self.inflight = 0
        self.lock = threading.Lock()

    def _read(self, out: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> list[tuple[int, str]]:
        """Read tiles into ``out``; returns ``(row, cause)`` of those not decoded (filled with ``FILL``).

        A batch that fails is read again tile by tile, so one bad JPEG tile costs itself only.
        Storage that is down (``SlideUnavailableError``) is not a bad tile: it fails the read.
        """
        coords = [(int(x), int(y)) for x, y in zip(xs, ys, strict=True)]
        size, mpp = self.plan.tile_size, self.plan.tile_mpp
        try:
            tiles = self.slide.read_batch(coords, size, mpp)
        except StorageUnavailableError:
            raise
        except SlideError:
            tiles = None
        if tiles is not None:
            for row, tile in zip(out, tiles, strict=True):
                row[...] = tile
            return []
        failed = []
        for k, (x, y) in enumerate(coords):
            try:
                out[k] = self.slide.read(x, y, size, mpp)
            except StorageUnavailableError:
                raise
            except SlideError as exc:
                out[k] = FILL
                failed.append((k, exc.cause))
        return failed

    def _submit(self, pos: int, chunk: Chunk, start: int, n: int) -> None:
        buffer = self.buffers.get()
        pixels = buffer.numpy()
        spans = [(s, min(n, s + self.read_batch)) for s in range(0, n, self.read_batch)]
        parts = [
            (
                a,
                self.pool.submit(
                    self._read, pixels[a:b], chunk.xs[start + a : start + b], chunk.ys[start + a : start + b]
                ),
            )
            for a, b in spans
        ]
        self.queued.setdefault(pos, deque()).append(_Batch(buffer, n, parts))
        self.inflight += len(parts)

    def _top_up(self, through: int = -1) -> None:
        """Submit batches while under the look-ahead, and every batch of chunks up to ``through``."""
        with self.lock:
            while self.todo and (self.inflight < self.lookahead or self.todo[0][0] <= through):
                self._submit(*self.todo.popleft())

    def batches(self, chunk_index: int) -> Iterator[tuple[torch.Tensor, float, list[tuple[int, str]]]]:
        """``(uint8 (n, S, S, 3) tiles, seconds waited, (row, cause) not decoded)`` of chunk
        ``chunk_index``, in grid order.

        A batch's buffer is reused once the consumer asks for the next one: use it (or copy it) first.
        """
        pos = self.position[chunk_index]
        self._top_up(through=pos)
        previous: torch.Tensor | None = None
        while True:
            with self.lock:
                queue = self.queued.get(pos)
                if not queue:
                    self.queued.pop(pos, None)
                    break
                batch = queue.popleft()
            t0 = time.perf_counter()
            failed = batch.failed()
            waited = time.perf_counter() - t0
            with self.lock:
                self.inflight -= len(batch.parts)
            self._top_up()
            if previous is not None:
                self.buffers.put(previous)
            previous = batch.buffer
            yield batch.tiles, waited, failed
        if previous is not None:
            self.buffers.put(previous)

    def close(self) -> None:
        with self.lock:
            for queue in self.queued.values():
                for batch in queue:
                    for _, part in batch.parts:
                        part.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> TileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
