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
        262144,
        ge=0,
        description="remote reads: ranges this close become one request (requests cost more than bytes)",
    )
    presigned_reads: bool = Field(
        True,
        description="s3: fetch tile ranges over a presigned URL with a plain HTTP pool (less CPU)",
    )
    presign_expires_s: int = Field(3600, gt=60, description="lifetime of presigned URLs; renewed at 80 %")

    def options_for(self, protocol: str) -> dict[str, Any]:
        """fsspec storage options for ``protocol``."""
        if protocol != "s3":
            return {}
        # No filesystem-wide block size: s3fs writes need blocks of >= 5 MB; slide reads pass
        # ``block_size`` themselves (``open_file``).
        opts: dict[str, Any] = {"anon": self.anon}
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


def cache_root() -> Path:
    """Where pathray keeps local copies and derived data: ``$PATHRAY_CACHE`` or ~/.cache/pathray."""
    return Path(os.environ.get("PATHRAY_CACHE", Path.home() / ".cache" / "pathray")).expanduser()


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
    readahead: dict[str, Any] = {}
    if location.protocol == "s3":
        readahead = {"block_size": (storage or StorageConfig()).block_size, "cache_type": "readahead"}
    try:
        raw = fs.open(location.path, "rb", **readahead)
    except Exception as exc:  # noqa: BLE001
        raise translate_error(location.uri, exc) from None
    return CountingFile(raw, counter)
