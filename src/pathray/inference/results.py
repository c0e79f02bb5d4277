"""What a predictor returns: predictions of tiles in memory, and the compact result of one chunk."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pathray.inference.grid import Chunk


@dataclass
class TilePredictions:
    """Predictions of a batch of tiles, in tile pixels.

    Attributes:
        probs: ``(N, C, H, W)`` float32 class probabilities (segmentation, instance foreground),
            ``(N, C, 1, 1)`` for classification; None for detection.
        points: per tile a ``(n, 4)`` float32 array ``(x, y, class, score)`` in tile px (detection).
    """

    probs: np.ndarray | None = None
    points: list[np.ndarray] | None = None

    def __len__(self) -> int:
        if self.probs is not None:
            return len(self.probs)
        return len(self.points or [])


@dataclass
class ChunkResult:
    """One chunk's predictions reduced to the class map's resolution: a few MB at most.

    ``probs[i, :, :heights[i], :widths[i]]`` (float16) is tile ``i``'s mean class probability over
    each class-map pixel whose centre lies in the tile, starting at map pixel ``(rows[i], cols[i])``;
    a ``(N, C, 1, 1)`` array (classification) paints the whole window. ``points`` are detections
    ``(x, y, class, score)`` in level-0 px that this chunk's tiles own (nearest tile centre).
    ``n_tiles`` counts every tile of the chunk; the per-tile arrays hold only the decoded ones.
    ``failed`` are the level-0 ``(x, y)`` corners of tiles that could not be decoded (one
    ``failed_cause`` for people); nothing of theirs is stitched.
    """

    index: int
    n_tiles: int
    rows: np.ndarray
    cols: np.ndarray
    heights: np.ndarray
    widths: np.ndarray
    probs: np.ndarray | None = None
    points: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)
    failed: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    failed_cause: str = ""

    @property
    def nbytes(self) -> int:
        arrays = [self.rows, self.cols, self.heights, self.widths, self.probs, self.points]
        return sum(a.nbytes for a in arrays if a is not None)


@dataclass
class ChunkParts:
    """A chunk's batch results as model threads finish them, in any order; ``done`` holds the chunk's
    result once its last batch is in (a predictor's bookkeeping)."""

    chunk: Chunk
    batches: int
    keep: np.ndarray = field(init=False)  # tiles that were decoded
    parts: dict[int, Any] = field(default_factory=dict)  # by first row: window means, or None
    points: dict[int, np.ndarray | None] = field(default_factory=dict)
    causes: dict[int, list[str]] = field(default_factory=dict)
    wait: float = 0.0
    predict: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    done: Future[ChunkResult] = field(default_factory=Future)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.keep = np.ones(len(self.chunk), bool)

    def put(
        self,
        start: int,
        ok: np.ndarray,
        causes: list[str],
        part: Any,
        points: np.ndarray | None,
        wait: float,
        predict: float,
    ) -> None:
        with self.lock:
            self.keep[start : start + len(ok)] = ok
            self.parts[start], self.points[start], self.causes[start] = part, points, causes
            self.wait += wait
            self.predict += predict

    def add_done(self) -> bool:
        """Count one finished batch; True for the chunk's last."""
        with self.lock:
            self.batches -= 1
            return self.batches == 0
