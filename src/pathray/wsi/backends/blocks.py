"""Byte ranges as requests: merging nearby ranges, and aligned blocks kept per process with singleflight.

spans = coalesce(offsets, lengths, gap=262144, max_span=2**22)    # fewer, larger requests
cache = BlockCache(max_bytes=256 * 2**20)
for i, data in read_through(cache, key, size, 65536, offsets, lengths, fetch, pool.submit, ...):
    ...                                                            # ranges as their blocks arrive
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import Future, as_completed
from typing import Any

Span = tuple[int, int, list[int]]


def coalesce(offsets: list[int], lengths: list[int], gap: int, max_span: int = 0) -> list[Span]:
    """Merge ranges into ``(start, end, member indices)`` spans, by offset; ranges ``gap`` bytes apart
    or closer join, unless the span would grow beyond ``max_span`` bytes (0: no limit)."""
    order = sorted(range(len(offsets)), key=lambda i: offsets[i])
    spans: list[Span] = []
    for i in order:
        start, end = offsets[i], offsets[i] + lengths[i]
        if (
            spans
            and start - spans[-1][1] <= gap
            and (not max_span or max(end, spans[-1][1]) - spans[-1][0] <= max_span)
        ):
            s0, e0, members = spans[-1]
            members.append(i)
            spans[-1] = (s0, max(e0, end), members)
        else:
            spans.append((start, end, [i]))
    return spans


def in_listing_order(spans: list[Span]) -> list[Span]:
    """Spans ordered by their first-listed range: requests go out in the order the caller needs them."""
    return sorted(spans, key=lambda span: min(span[2]))


class AbandonedFetch(Exception):
    """The reader that claimed a block stopped before fetching it: a waiter fetches it itself."""


class BlockCache:
    """At most ``max_bytes`` of blocks, the least recently used dropped first, with singleflight.

    A reader ``claim``s the blocks it needs and gets three answers: blocks already here, blocks
    another reader is fetching right now (a future to wait on), and blocks that are now its own
    to fetch. It must ``settle`` each of its own, with the bytes, an error, or neither (it gave
    up): waiters then get the bytes, the error, or ``AbandonedFetch``. So N threads asking for
    one block at once cause one request. ``stats`` counts hits, waits and misses.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self.stats = {"hits": 0, "waits": 0, "misses": 0}
        self._blocks: OrderedDict[Hashable, bytes] = OrderedDict()
        self._inflight: dict[Hashable, Future[bytes]] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes held now (never more than ``max_bytes``)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._blocks)

    def claim(
        self, keys: Iterable[Hashable]
    ) -> tuple[dict[Hashable, bytes], dict[Hashable, Future[bytes]], list[Hashable]]:
        """``(cached, in flight elsewhere, now the caller's to fetch and settle)`` for ``keys``."""
        hits: dict[Hashable, bytes] = {}
        waits: dict[Hashable, Future[bytes]] = {}
        mine: list[Hashable] = []
        with self._lock:
            for key in keys:
                data = self._blocks.get(key)
                if data is not None:
                    self._blocks.move_to_end(key)
                    hits[key] = data
                elif key in self._inflight:
                    waits[key] = self._inflight[key]
                else:
                    self._inflight[key] = Future()
                    mine.append(key)
            self.stats["hits"] += len(hits)
            self.stats["waits"] += len(waits)
            self.stats["misses"] += len(mine)
        return hits, waits, mine

    def settle(self, key: Hashable, data: bytes | None, error: BaseException | None = None) -> None:
        """End the caller's fetch of ``key``: keep ``data`` and hand it (or ``error``) to the waiters."""
        with self._lock:
            future = self._inflight.pop(key, None)
            if data is not None and len(data) <= self.max_bytes:
                old = self._blocks.pop(key, None)
                self._bytes -= len(old) if old is not None else 0
                self._blocks[key] = data
                self._bytes += len(data)
                while self._bytes > self.max_bytes:
                    _, dropped = self._blocks.popitem(last=False)
                    self._bytes -= len(dropped)
        if future is None or future.done():
            return
        if data is not None:
            future.set_result(data)
        else:
            future.set_exception(
                error if error is not None else AbandonedFetch("the reader that asked for this block gave up")
            )

    def clear(self) -> None:
        """Drop every kept block (fetches in flight go on, and are kept when they settle)."""
        with self._lock:
            self._blocks.clear()
            self._bytes = 0


def read_through(
    cache: BlockCache,
    obj: Hashable,
    size: int,
    block: int,
    offsets: list[int],
    lengths: list[int],
    fetch: Callable[[int, int], bytes],
    submit: Callable[..., Future[Any]],
    gap: int = 0,
    max_span: int = 0,
) -> Iterator[tuple[int, bytes]]:
    """``(i, bytes of range i)`` of object ``obj`` (``size`` bytes), each as soon as its blocks are here.

    Blocks come from ``cache``, from another reader's request in flight (waited for), or from
    ``fetch(start, end)`` run through ``submit``: this reader's missing blocks merged into spans
    (``gap``, ``max_span``) and requested in the order the ranges are listed. Whatever ``fetch``
    raises reaches the caller and the readers waiting for those blocks.
    """
    missing = [0] * len(offsets)  # blocks each range still waits for
    users: dict[int, list[int]] = {}  # block -> ranges that need it, in listing order
    for i, (off, n) in enumerate(zip(offsets, lengths, strict=True)):
        wanted = range(off // block, (off + n - 1) // block + 1) if n > 0 else range(0)
        missing[i] = len(wanted)
        for b in wanted:
            users.setdefault(b, []).append(i)
        if not wanted:
            yield i, b""
    have: dict[int, bytes] = {}

    def arrived(b: int, data: bytes) -> Iterator[tuple[int, bytes]]:
        have[b] = data
        for i in users[b]:
            missing[i] -= 1
            if missing[i] == 0:
                yield i, _assemble(have, block, offsets[i], lengths[i])

    pending = list(users)
    while pending:
        hits, waits, mine = cache.claim([(obj, b) for b in pending])
        own = _fetch_blocks(cache, obj, size, block, [key[1] for key in mine], fetch, submit, gap, max_span)
        futures = {fut: (key[1], [key[1]]) for key, fut in waits.items()} | own
        pending = []
        try:
            for (_, b), data in hits.items():
                yield from arrived(b, data)
            for fut in as_completed(futures):
                first, covered = futures[fut]
                try:
                    data = fut.result()
                except AbandonedFetch:
                    pending.extend(covered)  # its reader gave up before asking: ask here
                    continue
                for b in covered:
                    yield from arrived(b, data[(b - first) * block : (b - first + 1) * block])
        finally:
            for fut in own:
                fut.cancel()  # own requests not sent yet: their waiters are told, and ask themselves


def _fetch_blocks(
    cache: BlockCache,
    obj: Hashable,
    size: int,
    block: int,
    blocks: list[int],
    fetch: Callable[[int, int], bytes],
    submit: Callable[..., Future[Any]],
    gap: int,
    max_span: int,
) -> dict[Future[Any], tuple[int, list[int]]]:
    """Request ``blocks`` (claimed by the caller) merged into spans; each span settles its blocks."""
    offsets = [b * block for b in blocks]
    lengths = [min(block, size - off) for off in offsets]
    futures: dict[Future[Any], tuple[int, list[int]]] = {}
    spans = in_listing_order(coalesce(offsets, lengths, gap, max_span))
    for k, (start, end, members) in enumerate(spans):
        first, covered = start // block, [blocks[m] for m in members]

        def settle(done: Future[Any], first: int = first, covered: list[int] = covered) -> None:
            failed = None if done.cancelled() else done.exception()
            data = None if done.cancelled() or failed is not None else done.result()
            for b in covered:
                part = None if data is None else data[(b - first) * block : (b - first + 1) * block]
                cache.settle((obj, b), part, failed)

        try:
            future = submit(fetch, start, end)
        except BaseException:
            for _, _, left in spans[k:]:  # never asked: their waiters ask themselves
                for m in left:
                    cache.settle((obj, blocks[m]), None)
            raise
        future.add_done_callback(settle)
        futures[future] = (first, covered)
    return futures


def _assemble(have: dict[int, bytes], block: int, off: int, n: int) -> bytes:
    """Bytes ``off:off+n`` from the blocks that hold them."""
    first, last = off // block, (off + n - 1) // block
    rel = off - first * block
    if first == last:
        return have[first][rel : rel + n]
    return b"".join(have[b] for b in range(first, last + 1))[rel : rel + n]
