"""``open_slide``: any URI -> the right reader, with handles cached by URI."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from pathray.lru import LruCache
from pathray.registry import SLIDE_BACKENDS
from pathray.storage import Location, StorageConfig, StorageError, parse_uri
from pathray.wsi.backends.errors import SlideFormatError, as_slide_error
from pathray.wsi.backends.ranges import ByteCounter, open_file
from pathray.wsi.backends.slide import Slide

# Formats that neither reader opens correctly: tiffslide would return a VSI's overview image
# as if it were the slide, so refuse them by name instead of returning wrong pixels.
REFUSED_SUFFIXES = {
    ".vsi": "Olympus VSI is not supported (its pixels are in .ets files no reader here understands)",
    ".ets": "Olympus ETS files are not supported",
    ".czi": "Zeiss CZI is not supported",
}
OPENSLIDE_ONLY_SUFFIXES = {".mrxs", ".vms", ".vmu", ".dcm", ".svslide"}
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def sniff(location: Location, storage: StorageConfig | None) -> str:
    """Choose a backend from the file's suffix and first bytes (one small read)."""
    suffix = Path(location.name).suffix.lower()
    if suffix in REFUSED_SUFFIXES:
        raise SlideFormatError(location.uri, REFUSED_SUFFIXES[suffix])
    if suffix in OPENSLIDE_ONLY_SUFFIXES:
        return "openslide"
    with open_file(location, storage, ByteCounter()) as fh:
        head = fh.read(132)
    if head[:4] in TIFF_MAGICS:
        return tiff_backend()
    if head[128:132] == b"DICM":
        return "openslide"
    if not head:
        raise SlideFormatError(location.uri, "the file is empty")
    raise SlideFormatError(location.uri, f"not a TIFF or DICOM file (first bytes 0x{head[:4].hex()})")


@functools.cache
def tiff_backend() -> str:
    """``tiffslide`` where it imports, else the ``tifffile`` backend (a slim image: the GPU suite's)."""
    try:
        import tiffslide  # noqa: F401
    except ImportError:
        return "tifffile"
    return "tiffslide"


SLIDE_CACHE: LruCache[tuple[Any, ...], Slide] = LruCache(32)
"""Open slides by URI and options; an evicted handle closes when its last user lets go."""


def open_slide(
    uri: str | Path,
    storage: StorageConfig | None = None,
    *,
    mpp: float | None = None,
    backend: str = "auto",
    cache: bool = True,
    tile_cache: int = 64,
) -> Slide:
    """Open a slide from a path, ``file://``, ``s3://``, ``gs://``, ``memory://`` or ``http(s)://``.

    Args:
        uri: where the slide is.
        storage: endpoint and credentials for object storage (default: AWS environment).
        mpp: level-0 µm/px that overrides the file's value (for slides that lack one).
        backend: "auto" (sniffed from the file), or a registered backend name.
        cache: reuse an open handle for the same URI and options.
        tile_cache: decoded tiles kept per slide for neighbouring reads.

    Raises:
        SlideError: a subclass naming the URI and the cause, for every failure.
    """
    import pathray.wsi.backends.openslide  # noqa: F401 - registers the backends
    import pathray.wsi.backends.tiff  # noqa: F401
    import pathray.wsi.backends.tifffile_slide  # noqa: F401 - backend="tifffile": no tiffslide needed

    try:
        location = parse_uri(uri)
    except StorageError as exc:
        raise as_slide_error(exc) from None
    storage = storage or StorageConfig()

    def opener() -> Slide:
        name = sniff(location, storage) if backend == "auto" else backend
        cls = SLIDE_BACKENDS.get(name)
        try:
            return cls(location, storage, mpp_override=mpp, tile_cache=tile_cache)
        except StorageError as exc:
            raise as_slide_error(exc) from None
        except Exception as exc:  # noqa: BLE001 - nothing escapes as a bare library error
            raise SlideFormatError(location.uri, f"{type(exc).__name__}: {exc}") from None

    if not cache:
        return opener()
    key = (location.uri, backend, mpp, tile_cache, storage.identity())
    return SLIDE_CACHE.get_or_make(key, opener)
