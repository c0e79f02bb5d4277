"""A small Ray actor that counts what the stream had to leave out, and logs each slide once."""

from __future__ import annotations

import logging
from typing import Any

import ray

log = logging.getLogger("pathray.datasets")


@ray.remote(num_cpus=0)
class _Ledger:
    def __init__(self) -> None:
        self.failed_slides: dict[str, str] = {}
        self.skipped_tiles = 0
        self.retried_reads = 0
        self.tile_errors: dict[str, int] = {}

    def slide_failed(self, uri: str, cause: str) -> bool:
        """Record a slide left out; True the first time (so the caller logs it once)."""
        first = uri not in self.failed_slides
        if first:
            self.failed_slides[uri] = cause
        return first

    def tiles_skipped(self, uri: str, n: int) -> None:
        self.skipped_tiles += n
        self.tile_errors[uri] = self.tile_errors.get(uri, 0) + n

    def retried(self, n: int = 1) -> None:
        self.retried_reads += n

    def summary(self) -> dict[str, Any]:
        return {
            "failed_slides": dict(self.failed_slides),
            "skipped_tiles": self.skipped_tiles,
            "retried_reads": self.retried_reads,
            "tile_errors": dict(self.tile_errors),
        }


class FaultLedger:
    """Shared counts of slides left out and tiles skipped, across every process of a stream.

    Pass one to ``build_tile_dataset`` and read ``summary()`` after consuming the stream.
    """

    def __init__(self) -> None:
        self._actor = _Ledger.remote()

    def slide_failed(self, uri: str, cause: str) -> None:
        if ray.get(self._actor.slide_failed.remote(uri, cause)):
            log.warning("leaving out %s: %s", uri, cause)

    def tiles_skipped(self, uri: str, n: int, cause: str) -> None:
        ray.get(self._actor.tiles_skipped.remote(uri, n))
        log.warning("skipped %d tile(s) of %s: %s", n, uri, cause)

    def retried(self, n: int = 1) -> None:
        self._actor.retried.remote(n)

    def summary(self) -> dict[str, Any]:
        return ray.get(self._actor.summary.remote())
