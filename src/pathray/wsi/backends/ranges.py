"""Exact byte ranges of one object: ``pread`` on local files; merged and concurrent on object storage.

On S3 every request costs far more than its bytes: ~1.2 ms of client CPU through botocore, which
builds and signs each one, ~0.17 ms as a plain GET on a presigned URL. So ranges closer than
``coalesce_gap`` are merged (into requests of at most about ``max_request_bytes``), and by
default they are fetched over one presigned URL with kept-alive ``http.client`` connections
(``connections.py``), ``read_concurrency`` at a time, in the order the caller listed the ranges;
each range is handed back the moment its last byte is in, so the caller decodes while the rest of
its request is still on the wire.
With ``block_cache_bytes`` set, reads fetch aligned blocks that stay in a per-process cache, and
readers of a block in flight wait for that one request (``blocks.py``). Every request keeps the
storage's timeouts, retries and deadline.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
from collections.abc import Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pathray.storage import (
    Location,
    StorageConfig,
    StorageError,
    TransientHTTPError,
    filesystem,
    redact_logs,
    retrying,
    stat,
    time_limit,
    translate_error,
)
from pathray.wsi.backends.blocks import BlockCache, Span, coalesce, in_listing_order, read_through
from pathray.wsi.backends.connections import ConnectionPool, Sink
from pathray.wsi.backends.errors import SlideAccessError, SlideNotFoundError, SlideReadError, as_slide_error

log = logging.getLogger(__name__)

_SHARED: dict[tuple[str, int], Any] = {}
_SHARED_LOCK = threading.Lock()


def _shared(name: str, size: int = 16) -> Any:
    """Per process and size, made on first use (never at import): the HTTP connection pool
    ("http", ``size`` kept-alive connections per host), the thread pool ("threads", ``size``
    requests in flight) and the block cache ("blocks", ``size`` bytes)."""
    key = (name, size)
    with _SHARED_LOCK:
        if key not in _SHARED:
            if name == "http":
                redact_logs()  # request lines, presigned query strings included, are logged at DEBUG
                # No retries here: ``retrying`` retries with the config's backoff and deadline.
                _SHARED[key] = ConnectionPool(size)
            elif name == "blocks":
                _SHARED[key] = BlockCache(size)
            else:
                _SHARED[key] = ThreadPoolExecutor(max_workers=size, thread_name_prefix="pathray-ranges")
        return _SHARED[key]


def block_cache(storage: StorageConfig) -> BlockCache | None:
    """The process's cache of fetched blocks for ``storage`` settings (None when it is off)."""
    return _shared("blocks", storage.block_cache_bytes) if storage.block_cache_bytes else None


class _Stopped(Exception):
    """The reader went away: a streamed request ends early."""


def read_into(read: Any, buf: Any) -> int:
    """``readinto`` over a ``read(n)``: fills any writable buffer (a numpy array, bytearray or
    memoryview alike, as tifffile passes) and returns the bytes read."""
    view = memoryview(buf).cast("B")
    data = read(len(view))
    view[: len(data)] = data
    return len(data)


class ByteCounter:
    """Counts bytes fetched from storage, so a test can prove a tile read is a small range."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes = 0
        self.requests = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.bytes += n
            self.requests += 1


class CountingFile:
    """A read-only file wrapper that counts the bytes read through it (tifffile parses headers here)."""

    def __init__(self, raw: Any, counter: ByteCounter) -> None:
        self._raw = raw
        self._counter = counter

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self._counter.add(len(data))
        return data

    def readinto(self, buf: Any) -> int:
        return read_into(self.read, buf)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)

    def __enter__(self) -> CountingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._raw.close()


def open_file(location: Location, storage: StorageConfig | None, counter: ByteCounter) -> Any:
    """Open the object for random-access reads (header parsing); errors become SlideErrors.

    Remote objects are read through a ``RangeReader`` in cached blocks, so header reads get the
    same timeouts, retries and deadline as tiles.
    """
    storage = storage or StorageConfig()
    if location.is_local:
        try:
            return CountingFile(open(location.path, "rb"), counter)  # noqa: SIM115 - closed by the caller
        except OSError as exc:
            raise as_slide_error(translate_error(location.uri, exc)) from None
    try:
        info = stat(location, storage)
    except StorageError as exc:
        raise as_slide_error(exc) from None
    return RemoteFile(RangeReader(location, storage, counter, info=info), info["size"], storage.block_size)


class RemoteFile:
    """A read-only, seekable file over a ``RangeReader`` that reads ahead: a miss fetches at least
    ``block`` bytes from where it starts, and the last ``keep`` such spans are kept, so a TIFF
    header's many small scattered reads cost a few requests."""

    def __init__(self, reader: RangeReader, size: int, block: int, keep: int = 16) -> None:
        self.reader, self.size, self.block, self.keep = reader, size, max(4096, block), keep
        self.name = reader.location.uri
        self.closed = False
        self._pos = 0
        self._spans: list[tuple[int, bytes]] = []  # most recently used last
        self._lock = threading.Lock()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, n: int = -1) -> bytes:
        with self._lock:
            end = self.size if n is None or n < 0 else min(self.size, self._pos + n)
            data = self._span(self._pos, end) if end > self._pos else b""
            self._pos += len(data)
            return data

    def readinto(self, buf: Any) -> int:
        return read_into(self.read, buf)

    def _span(self, start: int, end: int) -> bytes:
        for k, (at, data) in enumerate(self._spans):
            if at <= start and end <= at + len(data):
                self._spans.append(self._spans.pop(k))
                return data[start - at : end - at]
        length = min(self.size, max(end, start + self.block)) - start
        data = self.reader.read_ranges([start], [length])[0]
        self._spans = [*self._spans[-(self.keep - 1) :], (start, data)]
        return data[: end - start]

    def close(self) -> None:
        self.closed = True
        self.reader.close()

    def __enter__(self) -> RemoteFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PresignedRanges:
    """Range GETs on a presigned URL of one S3 object, renewed before it expires."""

    def __init__(self, fs: Any, location: Location, expires_s: int) -> None:
        self._fs = fs
        self._location = location
        self._expires = expires_s
        self._url: str | None = None
        self._made = 0.0
        self._lock = threading.Lock()

    def url(self, renew: bool = False) -> str:
        """The current URL; raises whatever presigning raises (the caller then falls back)."""
        with self._lock:
            if renew or self._url is None or time.monotonic() - self._made > 0.8 * self._expires:
                self._url = self._fs.url(self._location.path, expires=self._expires)
                self._made = time.monotonic()
            return self._url

    def get(
        self, start: int, end: int, left: float, storage: StorageConfig, sink: Sink | None = None
    ) -> bytes | bytearray:
        """One range GET within ``left`` seconds; 5xx and network failures raise for a retry.

        ``sink(buffer, bytes so far)`` sees the bytes as they arrive (``ConnectionPool.get``).
        """
        http = _shared("http", storage.read_concurrency)
        headers = {"Range": f"bytes={start}-{end - 1}"}
        connect, read = min(storage.connect_timeout_s, left), min(storage.read_timeout_s, left)
        for attempt in range(2):
            status, data = http.get(self.url(renew=attempt > 0), headers, connect, read, sink)
            if status in (200, 206):
                return data
            body = data[:300].decode("utf-8", "replace")
            if status == 403 and "expired" in body.lower() and attempt == 0:
                continue  # the URL outlived its lifetime: sign a new one
            break
        uri = self._location.uri
        if status == 404:
            raise SlideNotFoundError(uri, "no such object (HTTP 404)")
        if status in (401, 403):
            raise SlideAccessError(uri, f"the storage refused access; check the credentials (HTTP {status})")
        if status >= 500 or status == 429:
            raise TransientHTTPError(f"HTTP {status} reading bytes {start}-{end - 1}")
        raise SlideReadError(uri, f"HTTP {status} reading bytes {start}-{end - 1}: {body.strip()[:200]}")


class RangeReader:
    """Reads exact byte ranges of one object, concurrently where the storage allows it.

    ``info`` is the object's ``stat`` where the caller has it (the block cache keys blocks by the
    object's size and tag, and otherwise asks for them once).
    """

    def __init__(
        self,
        location: Location,
        storage: StorageConfig | None,
        counter: ByteCounter,
        *,
        info: dict[str, Any] | None = None,
    ) -> None:
        storage = storage or StorageConfig()
        self.location = location
        self.storage = storage
        self.counter = counter
        self._gap = storage.coalesce_gap
        self._warned = False
        self._fd: int | None = None
        self._fs = None
        self._presigned: PresignedRanges | None = None
        self._blocks = None if location.is_local else block_cache(storage)
        self._info = info
        self._object: tuple[Hashable, int] | None = None  # (cache key of this object version, size)
        self._object_lock = threading.Lock()
        if location.is_local:
            self._fd = os.open(location.path, os.O_RDONLY)
        else:
            self._fs = filesystem(location, storage)
            if location.protocol == "s3" and storage.presigned_reads:
                self._presigned = PresignedRanges(self._fs, location, storage.presign_expires_s)

    def read_ranges(self, offsets: list[int], lengths: list[int]) -> list[bytes]:
        """Bytes at ``offsets[i]:offsets[i]+lengths[i]``, in order."""
        out = [b""] * len(offsets)
        for i, data in self.iter_ranges(offsets, lengths):
            out[i] = data
        return out

    def iter_ranges(self, offsets: list[int], lengths: list[int]) -> Iterator[tuple[int, bytes]]:
        """``(i, bytes of range i)`` as they arrive; nearby ranges are fetched as one request.

        Requests go out in the order of the ranges' first listing, so a caller that lists what it
        needs first gets it first.
        """
        if not offsets:
            return
        if self._fd is not None:
            for i, (off, n) in enumerate(zip(offsets, lengths, strict=True)):
                chunk = os.pread(self._fd, n, off)
                self.counter.add(len(chunk))
                if len(chunk) != n:
                    raise SlideReadError(
                        self.location.uri, f"short read: {len(chunk)} of {n} bytes at offset {off}"
                    )
                yield i, chunk
            return
        if self._blocks is not None:
            yield from self._iter_blocks(offsets, lengths)
            return
        spans = self._plan(offsets, lengths)
        self._prepare()
        if self._presigned is not None:
            yield from self._stream(spans, offsets, lengths)
            return
        for k, data in self._fetch(spans):
            start, _, members = spans[k]
            for i in members:
                rel = offsets[i] - start
                yield i, data[rel : rel + lengths[i]]

    def _plan(self, offsets: list[int], lengths: list[int]) -> list[Span]:
        """Coalesced spans, cut at ``max_request_bytes``, in the order their ranges were listed."""
        return in_listing_order(coalesce(offsets, lengths, self._gap, self.storage.max_request_bytes))

    # -- fetching spans ----------------------------------------------------------------------------
    def _prepare(self) -> None:
        """Presign once; presigning is an optimisation, so a failure means the filesystem path."""
        if self._presigned is not None:
            try:
                self._presigned.url()
            except Exception as exc:  # noqa: BLE001 - fall back to the filesystem
                log.info(
                    "%s: no presigned URL (%s); reading through the filesystem",
                    self.location.uri,
                    type(exc).__name__,
                )
                self._presigned = None

    def _fetch_one(self, start: int, end: int) -> bytes:
        """Bytes ``start:end`` in one request, retried within the deadline; counted; SlideErrors."""
        uri, storage, presigned, fs = self.location.uri, self.storage, self._presigned, self._fs

        def attempt(left: float) -> bytes:
            if presigned is not None:
                return presigned.get(start, end, left, storage)
            return fs.cat_file(self.location.path, start=start, end=end, **time_limit(fs, left))  # type: ignore[union-attr]

        try:
            data = retrying(uri, storage, attempt)
        except StorageError as exc:
            raise as_slide_error(exc) from None
        self.counter.add(len(data))
        return data if len(data) == end - start else self._whole_object_fallback(data, start, end - start)

    def _stream(
        self, spans: list[Span], offsets: list[int], lengths: list[int]
    ) -> Iterator[tuple[int, bytes]]:
        """Each range as soon as its last byte is here, though it came in a larger request: the
        requests run on the thread pool and hand each range over the moment it is complete."""
        arrived: queue.SimpleQueue[tuple[int, bytes] | BaseException | None] = queue.SimpleQueue()
        stop = threading.Event()
        pool = _shared("threads", self.storage.read_concurrency)
        futures = [pool.submit(self._stream_span, span, offsets, lengths, arrived, stop) for span in spans]
        try:
            for _ in futures:
                while (item := arrived.get()) is not None:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
        finally:
            stop.set()  # requests still running end at their next chunk
            for fut in futures:
                fut.cancel()

    def _stream_span(
        self,
        span: Span,
        offsets: list[int],
        lengths: list[int],
        arrived: queue.SimpleQueue[tuple[int, bytes] | BaseException | None],
        stop: threading.Event,
    ) -> None:
        """Fetch one span, retried within the deadline, putting its ranges into ``arrived`` as they
        complete, then None (or the error). A retry asks only for what has not been handed over."""
        start, end, members = span
        order = sorted(members, key=lambda i: offsets[i])  # as they lie in the body
        done = 0  # members handed over, in ``order``; kept across retries
        presigned, storage = self._presigned, self.storage
        assert presigned is not None

        def attempt(left: float) -> None:
            nonlocal done
            if done == len(order):
                return
            base = offsets[order[done]]

            def sink(buf: bytearray, got: int) -> None:
                nonlocal done
                if stop.is_set():
                    raise _Stopped
                while done < len(order) and offsets[order[done]] - base + lengths[order[done]] <= got:
                    i = order[done]
                    arrived.put(
                        (i, bytes(memoryview(buf)[offsets[i] - base : offsets[i] - base + lengths[i]]))
                    )
                    done += 1

            data = presigned.get(base, end, left, storage, sink)
            self.counter.add(len(data))
            if done < len(order):  # not streamed: an answer that was not partial
                if len(data) != end - base:
                    data = self._whole_object_fallback(bytes(data), base, end - base)
                sink(bytearray(data), len(data))

        try:
            retrying(self.location.uri, storage, attempt)
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, which raises it
            if stop.is_set():  # the reader is gone (and the failure may be its ``_Stopped``)
                arrived.put(None)
            else:
                arrived.put(as_slide_error(exc) if isinstance(exc, StorageError) else exc)
        else:
            arrived.put(None)

    def _fetch(self, spans: list[Span]) -> Iterator[tuple[int, bytes]]:
        """Each span's bytes through the filesystem, whose own concurrency (s3fs, gcsfs, http: one
        event loop) fetches them all at once; retried within the storage deadline."""
        fs, path = self._fs, self.location.path
        assert fs is not None

        def attempt(left: float) -> list[Any]:
            limit = time_limit(fs, left)
            if hasattr(fs, "cat_ranges"):
                starts, ends = [s for s, _, _ in spans], [e for _, e, _ in spans]
                out = fs.cat_ranges([path] * len(spans), starts, ends, on_error="return", **limit)
            else:
                out = [fs.cat_file(path, start=s, end=e, **limit) for s, e, _ in spans]
            for item in out:
                if isinstance(item, BaseException):
                    raise item
            return out

        try:
            out = retrying(self.location.uri, self.storage, attempt)
        except StorageError as exc:
            raise as_slide_error(exc) from None
        for k, data in enumerate(out):
            self.counter.add(len(data))
            start, end, _ = spans[k]
            if len(data) != end - start:
                data = self._whole_object_fallback(data, start, end - start)
            yield k, data

    # -- through the block cache -------------------------------------------------------------------
    def _version(self) -> tuple[Hashable, int]:
        """This object's cache key (endpoint, credentials, URI, size and tag) and size; one HEAD."""
        with self._object_lock:
            if self._object is None:
                try:
                    info = self._info or stat(self.location, self.storage)
                except StorageError as exc:
                    raise as_slide_error(exc) from None
                who = hashlib.sha256(
                    repr((self.storage.endpoint(), self.storage.credentials(), self.storage.anon)).encode()
                ).hexdigest()[:16]
                self._object = ((who, self.location.uri, info["size"], info["tag"]), info["size"])
            return self._object

    def _iter_blocks(self, offsets: list[int], lengths: list[int]) -> Iterator[tuple[int, bytes]]:
        """Ranges assembled from aligned blocks: cached ones, ones other readers are fetching right
        now (waited for), and the rest fetched here, merged and concurrently, then kept."""
        assert self._blocks is not None
        obj, size = self._version()
        for off, n in zip(offsets, lengths, strict=True):
            if off + n > size:
                raise SlideReadError(
                    self.location.uri, f"short read: bytes {off}-{off + n - 1} lie beyond its {size} bytes"
                )
        self._prepare()
        pool = _shared("threads", self.storage.read_concurrency)
        storage = self.storage
        yield from read_through(
            self._blocks,
            obj,
            size,
            storage.block_cache_block,
            offsets,
            lengths,
            self._fetch_one,
            pool.submit,
            gap=self._gap,
            max_span=storage.max_request_bytes,
        )

    def _whole_object_fallback(self, chunk: bytes, off: int, n: int) -> bytes:
        """A server that ignores Range sends the whole object: slice it, and say so once."""
        if len(chunk) >= off + n:
            if not self._warned:
                self._warned = True
                log.warning(
                    "%s: the server ignored a byte-range request; whole objects are fetched",
                    self.location.uri,
                )
            return chunk[off : off + n]
        raise SlideReadError(self.location.uri, f"short read: {len(chunk)} of {n} bytes at offset {off}")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
