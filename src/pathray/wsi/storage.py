"""Where slides live: URIs -> fsspec filesystems, byte-range reads, clear errors per scheme."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import fsspec
from pydantic import BaseModel, ConfigDict, Field

from pathray.wsi.errors import (
    SlideAccessError,
    SlideError,
    SlideNotFoundError,
    SlideReadError,
    UnsupportedSchemeError,
)

log = logging.getLogger(__name__)

SCHEMES = ("file", "s3", "gs", "memory", "http", "https")


class StorageConfig(BaseModel):
    """How to reach object storage. Empty fields fall back to the usual AWS environment variables."""

    model_config = ConfigDict(extra="forbid")

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. http://127.0.0.1:8333")
    key: str | None = Field(None, description="access key id (default: AWS_ACCESS_KEY_ID)")
    secret: str | None = Field(None, description="secret access key (default: AWS_SECRET_ACCESS_KEY)")
    region: str | None = Field(None, description="region (default: AWS_DEFAULT_REGION)")
    anon: bool = False
    block_size: int = Field(2**18, description="readahead block for metadata reads; tiles use exact ranges")
    cache_dir: str | None = Field(None, description="local copies of slides only OpenSlide can read")
    coalesce_gap: int = Field(
        0,
        ge=0,
        description="remote reads: merge tile ranges this many bytes apart or closer into one request",
    )

    def options_for(self, protocol: str) -> dict[str, Any]:
        """fsspec storage options for ``protocol``."""
        if protocol != "s3":
            return {}
        opts: dict[str, Any] = {
            "default_block_size": self.block_size,
            "default_cache_type": "readahead",
            "anon": self.anon,
        }
        endpoint = (
            self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        )
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
        if self.key:
            opts["key"] = self.key
        if self.secret:
            opts["secret"] = self.secret
        if self.region:
            opts.setdefault("config_kwargs", {})["region_name"] = self.region
        return opts


@dataclass(frozen=True)
class Location:
    """A parsed slide URI: the protocol and the path fsspec understands."""

    uri: str
    protocol: str
    path: str

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]


def parse_uri(uri: str | os.PathLike[str]) -> Location:
    """Split a slide URI into protocol and path; plain paths are local files."""
    text = os.fspath(uri)
    parsed = urlparse(text)
    scheme = parsed.scheme.lower()
    if scheme == "" or (len(scheme) == 1 and os.name == "nt"):
        return Location(text, "file", str(Path(text).expanduser().absolute()))
    if scheme not in SCHEMES:
        raise UnsupportedSchemeError(
            text, f"scheme {scheme!r} is not supported (use one of {', '.join(SCHEMES)})"
        )
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise UnsupportedSchemeError(text, f"file URIs must not name a host ({parsed.netloc!r})")
        return Location(text, "file", unquote(parsed.path))
    if scheme in ("http", "https"):
        return Location(text, scheme, text)
    if not parsed.netloc:
        raise UnsupportedSchemeError(text, f"a {scheme}:// URI needs a bucket name")
    return Location(text, scheme, f"{parsed.netloc}{parsed.path}")


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


_FS_LOCK = threading.Lock()


def filesystem(location: Location, storage: StorageConfig | None = None) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem for ``location`` (instances are cached by fsspec per options)."""
    storage = storage or StorageConfig()
    try:
        with _FS_LOCK:
            return fsspec.filesystem(location.protocol, **storage.options_for(location.protocol))
    except ImportError as exc:
        raise UnsupportedSchemeError(
            location.uri, f"the {location.protocol} filesystem is not installed ({exc.name})"
        ) from None


def translate_error(uri: str, exc: BaseException) -> SlideError:
    """Map a storage exception onto the SlideError a person can act on."""
    if isinstance(exc, SlideError):
        return exc
    text = f"{type(exc).__name__}: {exc}".strip()
    low = text.lower()
    if isinstance(exc, FileNotFoundError) or "nosuchkey" in low or "nosuchbucket" in low or "404" in low:
        return SlideNotFoundError(uri, "no such file or object" + (f" ({exc})" if str(exc) else ""))
    if isinstance(exc, PermissionError) or "accessdenied" in low or "access denied" in low or "403" in low:
        return SlideAccessError(uri, f"the storage refused access; check the credentials ({text})")
    if isinstance(exc, IsADirectoryError):
        return SlideNotFoundError(uri, "is a directory, not a slide file")
    return SlideError(uri, text)


def stat(location: Location, storage: StorageConfig | None = None) -> dict[str, Any]:
    """Size and version tag of the object: the cache key for masks and local copies."""
    fs = filesystem(location, storage)
    try:
        info = fs.info(location.path)
    except Exception as exc:  # noqa: BLE001 - every storage error becomes a SlideError
        raise translate_error(location.uri, exc) from None
    if info.get("type") == "directory":
        raise SlideNotFoundError(location.uri, "is a directory, not a slide file")
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return {"size": int(info.get("size") or 0), "tag": str(tag).strip('"')}


def open_file(location: Location, storage: StorageConfig | None, counter: ByteCounter) -> CountingFile:
    """Open the object for random access reads (header parsing); errors become SlideErrors."""
    fs = filesystem(location, storage)
    try:
        raw = fs.open(location.path, "rb")
    except Exception as exc:  # noqa: BLE001
        raise translate_error(location.uri, exc) from None
    return CountingFile(raw, counter)


class RangeReader:
    """Reads exact byte ranges of one object, concurrently where the storage allows it."""

    def __init__(self, location: Location, storage: StorageConfig | None, counter: ByteCounter) -> None:
        self.location = location
        self.counter = counter
        self._fs = None if location.is_local else filesystem(location, storage)
        self._fd: int | None = None
        self._warned = False
        self._gap = (storage or StorageConfig()).coalesce_gap
        if location.is_local:
            self._fd = os.open(location.path, os.O_RDONLY)

    def read_ranges(self, offsets: list[int], lengths: list[int]) -> list[bytes]:
        """Bytes at ``offsets[i]:offsets[i]+lengths[i]``.

        Remote ranges go out in one concurrent batch, and ranges that touch (or lie within
        ``coalesce_gap`` bytes of each other) are merged first: tiles of one pyramid row sit
        side by side in the file, and on object storage each request costs far more than
        its bytes.
        """
        if not offsets:
            return []
        if self._fd is not None:
            out = [os.pread(self._fd, n, off) for off, n in zip(offsets, lengths, strict=True)]
            for off, n, chunk in zip(offsets, lengths, out, strict=True):
                self.counter.add(len(chunk))
                if len(chunk) != n:
                    raise SlideReadError(
                        self.location.uri, f"short read: {len(chunk)} of {n} bytes at offset {off}"
                    )
            return out
        spans = coalesce(offsets, lengths, self._gap)
        datas = self._fetch([s for s, _, _ in spans], [e for _, e, _ in spans])
        out = [b""] * len(offsets)
        for (start, end, members), data in zip(spans, datas, strict=True):
            self.counter.add(len(data))
            if len(data) != end - start:
                data = self._whole_object_fallback(data, start, end - start)
            for i in members:
                rel = offsets[i] - start
                out[i] = data[rel : rel + lengths[i]]
        return out

    def _fetch(self, starts: list[int], ends: list[int]) -> list[bytes]:
        assert self._fs is not None
        path = self.location.path
        try:
            if hasattr(self._fs, "cat_ranges"):
                out = self._fs.cat_ranges([path] * len(starts), starts, ends)
            else:
                out = [self._fs.cat_file(path, start=s, end=e) for s, e in zip(starts, ends, strict=True)]
        except Exception as exc:  # noqa: BLE001
            raise translate_error(self.location.uri, exc) from None
        for item in out:
            if isinstance(item, BaseException):
                raise translate_error(self.location.uri, item)
        return out

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
