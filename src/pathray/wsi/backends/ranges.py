"""Exact byte ranges of one object: ``pread`` on local files; merged and concurrent on object storage.

On S3 every request costs far more than its bytes, and most of a client's CPU per request goes
into botocore building and signing it. So ranges that touch are merged, and by default they
are fetched over one presigned URL with a plain HTTP connection pool, many at a time, and
handed back as they complete so the caller decodes while the rest are still on the wire.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
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
from pathray.wsi.backends.errors import SlideAccessError, SlideNotFoundError, SlideReadError, as_slide_error

log = logging.getLogger(__name__)

_SHARED: dict[str, Any] = {}
_SHARED_LOCK = threading.Lock()


def _shared(name: str) -> Any:
    """One HTTP pool and one thread pool per process, made on first use (never at import)."""
    with _SHARED_LOCK:
        if name not in _SHARED:
            if name == "http":
                import urllib3

                redact_logs()  # urllib3 logs request lines, query strings included, at DEBUG
                # No retries here: ``retrying`` retries with the config's backoff and deadline.
                _SHARED[name] = urllib3.PoolManager(maxsize=32, retries=False)
            else:
                _SHARED[name] = ThreadPoolExecutor(max_workers=16, thread_name_prefix="pathray-ranges")
        return _SHARED[name]


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
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

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
        size = stat(location, storage)["size"]
    except StorageError as exc:
        raise as_slide_error(exc) from None
    return RemoteFile(RangeReader(location, storage, counter), size, storage.block_size)


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
        view = memoryview(buf).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

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


def coalesce(offsets: list[int], lengths: list[int], gap: int) -> list[tuple[int, int, list[int]]]:
    """Merge ranges into ``(start, end, member indices)`` spans; ranges ``gap`` bytes apart or closer join."""
    order = sorted(range(len(offsets)), key=lambda i: offsets[i])
    spans: list[tuple[int, int, list[int]]] = []
    for i in order:
        start, end = offsets[i], offsets[i] + lengths[i]
        if spans and start - spans[-1][1] <= gap:
            s0, e0, members = spans[-1]
            members.append(i)
            spans[-1] = (s0, max(e0, end), members)
        else:
            spans.append((start, end, [i]))
    return spans


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

    def get(self, start: int, end: int, left: float, storage: StorageConfig) -> bytes:
        """One range GET within ``left`` seconds; 5xx and network failures raise for a retry."""
        import urllib3

        timeout = urllib3.Timeout(
            connect=min(storage.connect_timeout_s, left), read=min(storage.read_timeout_s, left)
        )
        http = _shared("http")
        headers = {"Range": f"bytes={start}-{end - 1}"}
        for attempt in range(2):
            resp = http.request("GET", self.url(renew=attempt > 0), headers=headers, timeout=timeout)
            if resp.status in (200, 206):
                return resp.data
            body = resp.data[:300].decode("utf-8", "replace")
            if resp.status == 403 and "expired" in body.lower() and attempt == 0:
                continue  # the URL outlived its lifetime: sign a new one
            break
        uri = self._location.uri
        if resp.status == 404:
            raise SlideNotFoundError(uri, "no such object (HTTP 404)")
        if resp.status in (401, 403):
            raise SlideAccessError(
                uri, f"the storage refused access; check the credentials (HTTP {resp.status})"
            )
        if resp.status >= 500 or resp.status == 429:
            raise TransientHTTPError(f"HTTP {resp.status} reading bytes {start}-{end - 1}")
        raise SlideReadError(uri, f"HTTP {resp.status} reading bytes {start}-{end - 1}: {body.strip()[:200]}")


class RangeReader:
    """Reads exact byte ranges of one object, concurrently where the storage allows it."""

    def __init__(self, location: Location, storage: StorageConfig | None, counter: ByteCounter) -> None:
        storage = storage or StorageConfig()
        self.location = location
        self.storage = storage
        self.counter = counter
        self._gap = storage.coalesce_gap
        self._warned = False
        self._fd: int | None = None
        self._fs = None
        self._presigned: PresignedRanges | None = None
        if location.is_local:
            self._fd = os.open(location.path, os.O_RDONLY)
        else:
            self._fs = filesystem(location, storage)
            if location.protocol == "s3" and storage.presigned_reads:
                self._presigned = PresignedRanges(self._fs, location, storage.presign_expires_s)

    @property
    def remote(self) -> bool:
        """Whether reads cross a network (batching them pays off)."""
        return self._fd is None

    def read_ranges(self, offsets: list[int], lengths: list[int]) -> list[bytes]:
        """Bytes at ``offsets[i]:offsets[i]+lengths[i]``, in order."""
        out = [b""] * len(offsets)
        for i, data in self.iter_ranges(offsets, lengths):
            out[i] = data
        return out

    def iter_ranges(self, offsets: list[int], lengths: list[int]) -> Iterator[tuple[int, bytes]]:
        """``(i, bytes of range i)`` as they arrive; touching ranges are fetched as one request."""
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
        spans = coalesce(offsets, lengths, self._gap)
        for k, data in self._fetch(spans):
            start, end, members = spans[k]
            self.counter.add(len(data))
            if len(data) != end - start:
                data = self._whole_object_fallback(data, start, end - start)
            for i in members:
                rel = offsets[i] - start
                yield i, data[rel : rel + lengths[i]]

    def _fetch(self, spans: list[tuple[int, int, list[int]]]) -> Iterator[tuple[int, bytes]]:
        """Each span's bytes as it arrives; every request is retried within the storage deadline."""
        uri, storage = self.location.uri, self.storage
        if self._presigned is not None:
            try:
                self._presigned.url()
            except Exception as exc:  # noqa: BLE001 - presigning is an optimisation; fall back
                log.info("%s: no presigned URL (%s); reading through the filesystem", uri, type(exc).__name__)
                self._presigned = None
        if self._presigned is not None:
            presigned = self._presigned

            def one(start: int, end: int) -> bytes:
                return retrying(uri, storage, lambda left: presigned.get(start, end, left, storage))

            pool = _shared("threads")
            futures = {pool.submit(one, s, e): k for k, (s, e, _) in enumerate(spans)}
            try:
                for fut in as_completed(futures):
                    try:
                        data = fut.result()
                    except StorageError as exc:
                        raise as_slide_error(exc) from None
                    yield futures[fut], data
            finally:
                for fut in futures:
                    fut.cancel()
            return
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
            out = retrying(uri, storage, attempt)
        except StorageError as exc:
            raise as_slide_error(exc) from None
        yield from enumerate(out)

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
