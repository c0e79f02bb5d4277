"""Reader threads that cut a plan's tiles ahead of the model, straight into whole model batches.

Two sources of pixels. ``PixelSource`` (today's path): the slide's reader decodes on CPU threads,
each writing its tiles into the rows of one reusable (on CUDA: page-locked) batch buffer.
``CompressedSource``: the tiles' compressed bytes are fetched by byte range and decoded where the
model runs (nvJPEG on CUDA), so a batch reaches the model already on its device.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, wait
from dataclasses import dataclass

import numpy as np
import torch

from pathray.inference.grid import Chunk, GridPlan
from pathray.storage import StorageUnavailableError
from pathray.wsi.backends.compressed import CompressedTileReader
from pathray.wsi.backends.errors import SlideError
from pathray.wsi.backends.slide import Slide

FILL = 255
"""Pixel value of a tile that could not be decoded (its predictions are dropped, never stitched)."""

Failed = list[tuple[int, str]]
"""``(row, cause)`` of the tiles of a read that could not be decoded."""


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


def read_tolerant(
    read: Callable[[list[tuple[int, int]]], list[np.ndarray] | torch.Tensor],
    coords: list[tuple[int, int]],
) -> tuple[list[np.ndarray] | torch.Tensor | None, Failed, list[np.ndarray | torch.Tensor | None]]:
    """``read(coords)``; when it fails on a bad tile, each tile read alone, so one costs itself only.

    Returns ``(batch or None, failed, single tiles)``: the whole batch when it read, else each tile
    (None for those that did not decode, listed in ``failed``). Storage that is down
    (``SlideUnavailableError``) is not a bad tile: it fails the read.
    """
    try:
        return read(coords), [], []
    except StorageUnavailableError:
        raise
    except SlideError:
        pass
    failed: Failed = []
    singles: list[np.ndarray | torch.Tensor | None] = []
    for k, coord in enumerate(coords):
        try:
            singles.append(read([coord])[0])
        except StorageUnavailableError:
            raise
        except SlideError as exc:
            singles.append(None)
            failed.append((k, exc.cause))
    return None, failed, singles


class PixelSource:
    """Today's path: ``Slide.read_batch`` on CPU threads, into the rows of reusable batch buffers."""

    def __init__(self, slide: Slide, plan: GridPlan, batch: int, pinned: bool) -> None:
        self.slide, self.plan = slide, plan
        self.buffers = BatchBuffers(batch, plan.tile_size, pinned)

    def read(self, out: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> Failed:
        """Read tiles into ``out``; undecodable ones are filled with ``FILL`` and returned."""
        coords = [(int(x), int(y)) for x, y in zip(xs, ys, strict=True)]
        size, mpp = self.plan.tile_size, self.plan.tile_mpp
        tiles, failed, singles = read_tolerant(lambda c: self.slide.read_batch(c, size, mpp), coords)
        for row, tile in zip(out, tiles if tiles is not None else singles, strict=True):
            row[...] = FILL if tile is None else tile
        return failed


class CompressedSource:
    """Compressed tiles fetched by byte range and decoded on ``device`` (nvJPEG on CUDA), a whole
    model batch per read: ``(n, S, S, 3)`` views of the decoder's ``(n, 3, S, S)`` tensors."""

    def __init__(self, slide: Slide, plan: GridPlan, device: torch.device) -> None:
        self.plan, self.device = plan, device
        self.tiles = CompressedTileReader.for_slide(slide)

    def read(self, xs: np.ndarray, ys: np.ndarray) -> tuple[torch.Tensor, Failed]:
        coords = [(int(x), int(y)) for x, y in zip(xs, ys, strict=True)]
        size, mpp = self.plan.tile_size, self.plan.tile_mpp
        batch, failed, singles = read_tolerant(
            lambda c: self.tiles.read_batch(c, size, mpp, device=self.device), coords
        )
        if batch is None:
            glass = torch.full((3, size, size), FILL, dtype=torch.uint8, device=self.device)
            batch = torch.stack([glass if t is None else t for t in singles])  # type: ignore[misc]
        assert isinstance(batch, torch.Tensor)
        return batch.permute(0, 2, 3, 1), failed


@dataclass
class Batch:
    """One model batch of a chunk: ``n`` tiles from row ``start`` of chunk ``pos``."""

    pos: int
    start: int
    n: int
    buffer: torch.Tensor | None  # PixelSource: the rows its reads fill; None: the read returns tiles
    parts: list[tuple[int, Future]]  # (first row, a read: its Failed, or (tiles, Failed))

    def result(self) -> tuple[torch.Tensor, Failed, float]:
        """``(uint8 (n, S, S, 3) tiles, (row, cause) not decoded, seconds waited)``; waits for the reads."""
        t0 = time.perf_counter()
        failed: Failed = []
        tiles = self.buffer[: self.n] if self.buffer is not None else None
        for start, part in self.parts:
            got = part.result()
            if self.buffer is None:
                tiles, got = got
            failed += [(start + k, cause) for k, cause in got]
        assert tiles is not None
        return tiles, failed, time.perf_counter() - t0


class TileReader:
    """Reads the tiles of ``chunks`` in grid order, model batch by model batch, on ``pool``'s
    ``threads`` threads (the predictor's, which outlive the reader).

    ``PixelSource`` splits each batch into reads of ``read_batch`` tiles that write into the rows
    of the batch's buffer, so a batch reaches the model without being stacked or copied again;
    ``CompressedSource`` reads a whole batch at once. Decoding releases the GIL, so reading
    overlaps the forward pass; about ``lookahead`` reads are in flight, which bounds memory.
    Any number of model threads may take batches (``next_batch``) and give them back
    (``release``) at once.
    """

    def __init__(
        self,
        plan: GridPlan,
        chunks: list[Chunk],
        source: PixelSource | CompressedSource,
        pool: Executor,
        threads: int,
        read_batch: int,
        batch: int,
        lookahead: int | None = None,
    ) -> None:
        self.plan, self.chunks, self.source = plan, chunks, source
        # (chunk position, chunk, first row, tiles): the order batches are read and handed out in
        self.todo: deque[tuple[int, Chunk, int, int]] = deque(
            (i, c, s, min(batch, len(c) - s)) for i, c in enumerate(chunks) for s in range(0, len(c), batch)
        )
        self.per_chunk = [-(-len(c) // batch) for c in chunks]
        self.read_batch = max(1, read_batch) if isinstance(source, PixelSource) else batch
        self.lookahead = lookahead or 2 * threads + 2
        self.pool = pool
        self.queued: deque[Batch] = deque()
        self.inflight = 0
        self.closed = False
        self.lock = threading.Lock()

    def _submit(self, pos: int, chunk: Chunk, start: int, n: int) -> None:
        xs, ys = chunk.xs[start : start + n], chunk.ys[start : start + n]
        source = self.source
        if isinstance(source, CompressedSource):
            buffer, parts = None, [(0, self.pool.submit(source.read, xs, ys))]
        else:
            buffer = source.buffers.get()
            pixels = buffer.numpy()
            spans = [(a, min(n, a + self.read_batch)) for a in range(0, n, self.read_batch)]
            parts = [(a, self.pool.submit(source.read, pixels[a:b], xs[a:b], ys[a:b])) for a, b in spans]
        self.queued.append(Batch(pos, start, n, buffer, parts))
        self.inflight += len(parts)

    def _top_up(self) -> None:
        """Submit reads while under the look-ahead (and always the next batch)."""
        while self.todo and not self.closed and (self.inflight < self.lookahead or not self.queued):
            self._submit(*self.todo.popleft())

    def next_batch(self) -> Batch | None:
        """The next batch in grid order (its reads may still run), or None when all are handed out."""
        with self.lock:
            self._top_up()
            if self.closed or not self.queued:
                return None
            batch = self.queued.popleft()
            self.inflight -= len(batch.parts)
            self._top_up()
            return batch

    def release(self, batch: Batch) -> None:
        """Give back a batch whose pixels are no longer needed (after its forward pass)."""
        if batch.buffer is not None and isinstance(self.source, PixelSource):
            self.source.buffers.put(batch.buffer)

    def close(self) -> None:
        """Stop handing out batches, cancel the reads not started yet and wait for those running
        (a batch handed out is waited for by whoever took it)."""
        with self.lock:
            self.closed = True
            pending = [part for batch in self.queued for _, part in batch.parts]
            self.queued.clear()
        for part in pending:
            part.cancel()
        wait(pending)

    def __enter__(self) -> TileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
