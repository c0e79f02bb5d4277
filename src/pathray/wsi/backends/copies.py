"""Local copies of slides only OpenSlide reads: atomic, shared by processes, bounded by an LRU budget.

    path = local_copy(parse_uri("s3://bucket/case/0001.dcm"), storage)  # that series, copied once

Several processes (Ray workers) share one cache folder: a copy lands under a unique temp name and
is renamed into place, and admission and eviction hold an ``fcntl.flock`` on ``<cache>/.lock``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import TypeVar

from pathray.storage import Location, StorageConfig, StorageError, cache_root, call, describe, stat

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

# Formats whose slide is several files: copy these companions along with the named file.
MULTI_FILE_SUFFIXES = {
    ".mrxs": "folder",
    ".vms": "siblings",
    ".vmu": "siblings",
    ".dcm": "siblings",
    "": "siblings",
}
DICOM_SUFFIXES = (".dcm", "")
HEAD_BYTES = 64 * 2**10  # a DICOM header read; doubled while the Series Instance UID is not in it
MAX_HEAD_BYTES = 16 * 2**20
STALE_PARTIAL_S = 3600.0  # an unfinished copy untouched this long belongs to a dead process
MIN_COPY_RATE = 8 * 2**20  # bytes/s: a whole-file copy gets size / rate on top of the deadline
WORKERS = 8


@dataclass(frozen=True)
class _Remote:
    path: str  # fsspec path of the object
    size: int
    local: str  # path relative to the copy's folder


def default_cache_dir() -> Path:
    return cache_root() / "slides"


def local_copy(location: Location, storage: StorageConfig | None) -> str:
    """A local path for ``location``: itself when local, else a cached copy (with companions).

    The cache key includes the object's size and version tag, so a changed object is copied
    again. A DICOM file brings the files of its series in the same folder, a VMS/VMU file all its
    siblings, an MRXS file its data folder. After a new copy, the least recently used copies go
    until the cache fits ``storage.cache_max_bytes`` (the new one stays, even alone over it).

    Raises:
        StorageError: naming the URI, when a request fails or the copy cannot be written.
    """
    if location.is_local:
        return location.path
    storage = storage or StorageConfig()
    info = stat(location, storage)
    key = hashlib.sha256(f"{location.uri}|{info['size']}|{info['tag']}".encode()).hexdigest()[:24]
    root = Path(storage.cache_dir).expanduser() if storage.cache_dir else default_cache_dir()
    entry = root / key
    target = entry / location.name
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root):
            if target.is_file():
                _touch(entry)
                return str(target)
        tmp = root / f"{key}.partial-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            _download(location, storage, _companions(location, storage, info["size"]), tmp)
            with _locked(root):
                if not target.is_file():  # else another process finished first: use theirs
                    shutil.rmtree(entry, ignore_errors=True)  # a broken entry without its slide
                    os.rename(tmp, entry)
                _touch(entry)
                _evict(root, storage.cache_max_bytes, keep=key, uri=location.uri)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        raise StorageError(location.uri, f"cannot make a local copy in {root} ({describe(exc)})") from None
    return str(target)


def _companions(location: Location, storage: StorageConfig, size: int) -> list[_Remote]:
    """The objects to copy for ``location``: itself and what its format needs beside it."""
    suffix = Path(location.name).suffix.lower()
    mode = MULTI_FILE_SUFFIXES.get(suffix)
    itself = _Remote(location.path, size, location.name)
    if mode == "siblings":
        parent = location.path.rsplit("/", 1)[0]
        listing = call(location, storage, "ls", parent, detail=True, refresh=True)
        siblings = [
            _Remote(e["name"], int(e.get("size") or 0), e["name"].rsplit("/", 1)[-1])
            for e in listing
            if e.get("type") == "file" and e["name"] != location.path
        ]
        if suffix in DICOM_SUFFIXES:
            siblings = _same_series(location, storage, itself, siblings)
        return [itself, *siblings]
    if mode == "folder":
        stem = location.path[: -len(suffix)]
        if not call(location, storage, "exists", stem):
            return [itself]
        found = call(location, storage, "find", stem, detail=True)
        folder = Path(location.name).stem
        return [itself] + [
            _Remote(path, int(e.get("size") or 0), f"{folder}/{path[len(stem) + 1 :]}")
            for path, e in sorted(found.items())
            if e.get("type") == "file"
        ]
    return [itself]


def _same_series(
    location: Location, storage: StorageConfig, itself: _Remote, siblings: list[_Remote]
) -> list[_Remote]:
    """The DICOM siblings whose Series Instance UID is that of ``itself`` (headers only are read)."""
    uids = _parallel(lambda r: _series_uid(_at(location, r.path), storage, r.size), [itself, *siblings])
    if uids[0] is None:
        log.warning("%s: no DICOM Series Instance UID in its header; copying it alone", location.uri)
        return []
    return [r for r, uid in zip(siblings, uids[1:], strict=True) if uid == uids[0]]


def _series_uid(location: Location, storage: StorageConfig, size: int) -> str | None:
    """The Series Instance UID (0020,000E) of a DICOM object, from a ranged read of its header;
    None when it is not a DICOM Part 10 file or has none."""
    end = min(HEAD_BYTES, size)
    while end >= 132:
        head = call(location, storage, "cat_file", location.path, start=0, end=end)
        if head[128:132] != b"DICM":
            return None
        uid = _parse_series_uid(head)
        if uid is not None or end >= min(size, MAX_HEAD_BYTES):
            return uid
        end = min(2 * end, size, MAX_HEAD_BYTES)
    return None


def _parse_series_uid(head: bytes) -> str | None:
    # read_partial stops past the tag: dcmread would read on and fail at the end of a partial header
    from pydicom.filereader import read_partial
    from pydicom.tag import Tag

    series = Tag(0x0020, 0x000E)
    try:
        ds = read_partial(
            BytesIO(head), stop_when=lambda tag, vr, length: tag > series, specific_tags=[series]
        )
        element = ds.get(series)
    except Exception:  # noqa: BLE001 - a header cut short (read more) or not DICOM at all
        return None
    value = str(element.value).strip() if element is not None and element.value else ""
    return value or None


def _download(location: Location, storage: StorageConfig, remotes: list[_Remote], folder: Path) -> None:
    for remote in remotes:
        (folder / remote.local).parent.mkdir(parents=True, exist_ok=True)

    def fetch(remote: _Remote) -> None:
        # a whole-file copy gets time in proportion to its size on top of the per-request deadline
        budget = storage.model_copy(update={"deadline_s": storage.deadline_s + remote.size / MIN_COPY_RATE})
        call(_at(location, remote.path), budget, "get_file", remote.path, str(folder / remote.local))

    _parallel(fetch, remotes)


def _at(location: Location, path: str) -> Location:
    """The Location of another object on ``location``'s storage."""
    if location.path == path:
        return location
    uri = path if location.protocol in ("http", "https") else f"{location.protocol}://{path}"
    return Location(uri=uri, protocol=location.protocol, path=path)


def _parallel(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    if len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(min(WORKERS, len(items)), thread_name_prefix="pathray-copy") as pool:
        return list(pool.map(fn, items))


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """An exclusive lock on the cache folder, across processes and threads (one open file each)."""
    import fcntl

    with open(root / ".lock", "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _touch(path: Path) -> None:
    now = time.time_ns()  # finer than the kernel's own clock for utime(None)
    os.utime(path, ns=(now, now))


def _files(folder: Path) -> Iterator[os.stat_result]:
    for dirpath, _, names in os.walk(folder):
        for name in names:
            try:
                yield os.stat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue


def _evict(root: Path, budget: int, keep: str, uri: str) -> None:
    """Remove the least recently used copies until the cache fits ``budget``; never ``keep``.
    Call with the lock held. Unfinished copies older than an hour go too."""
    now = time.time()
    entries: list[tuple[int, str, Path, int]] = []
    for child in root.iterdir():
        if child.name.startswith(".") or not child.is_dir():
            continue
        try:
            mtime = child.stat().st_mtime_ns
        except FileNotFoundError:  # an unfinished copy its process just gave up
            continue
        if ".partial" in child.name:
            last = max([mtime, *(s.st_mtime_ns for s in _files(child))])
            if now - last / 1e9 > STALE_PARTIAL_S:
                shutil.rmtree(child, ignore_errors=True)
            continue
        entries.append((mtime, child.name, child, sum(s.st_size for s in _files(child))))
    total = sum(e[3] for e in entries)
    for _, name, path, size in sorted(entries):
        if total <= budget:
            break
        if name != keep:
            shutil.rmtree(path, ignore_errors=True)
            total -= size
            log.info("slide cache %s: evicted %s (%d bytes)", root, name, size)
    if total > budget:
        log.warning(
            "the local copy of %s (%d bytes) alone exceeds the slide cache budget (cache_max_bytes=%d)",
            uri,
            total,
            budget,
        )
