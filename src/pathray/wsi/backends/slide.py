"""The Slide: one interface over every reader, in physical units, with clear errors."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
from PIL import Image

from pathray.storage import Location, StorageConfig, StorageError, StorageUnavailableError, stat
from pathray.wsi.backends.errors import SlideError, SlideFormatError, SlideReadError
from pathray.wsi.backends.levels import LevelChoice, plausible_mpp, select_level
from pathray.wsi.backends.ranges import ByteCounter

Size = int | tuple[int, int]

# Pixels outside the slide read as glass: white, like the background of a scan.
FILL = 255


def as_size(size: Size) -> tuple[int, int]:
    """``224`` or ``(w, h)`` -> ``(w, h)``."""
    if isinstance(size, int):
        return size, size
    w, h = size
    return int(w), int(h)


def to_rgb(arr: np.ndarray) -> np.ndarray:
    """Any 8-bit pixel layout (grey, grey+alpha, RGB, RGBA) -> HxWx3 uint8 RGB."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.integer) and arr.size and int(arr.max()) > 255:
            arr = (arr.astype(np.float32) * (255.0 / float(np.iinfo(arr.dtype).max))).astype(np.uint8)
        else:
            arr = arr.astype(np.uint8)
    channels = arr.shape[2]
    if channels in (1, 2):
        return np.repeat(arr[..., :1], 3, axis=2)
    if channels >= 3:
        return np.ascontiguousarray(arr[..., :3])
    raise ValueError(f"unsupported pixel layout with {channels} channels")


class Slide(ABC):
    """An open whole-slide image.

    Coordinates in ``read_region`` and ``read`` are level-0 pixels (as in OpenSlide), sizes
    are output pixels, and every read returns an ``(h, w, 3)`` uint8 RGB array; areas
    outside the image read as white. Instances are safe to share between threads.

    Attributes:
        uri: where the slide lives.
        backend: the reader's registry name ("tiffslide", "openslide").
        bytes_read: bytes fetched from storage through this handle.
    """

    backend: str = ""

    def __init__(
        self, location: Location, mpp_override: float | None = None, storage: StorageConfig | None = None
    ) -> None:
        self.location = location
        self.uri = location.uri
        self.storage = storage
        self.counter = ByteCounter()
        self._mpp_override = mpp_override
        self._version: str | None = None
        self._checked = False

    @property
    def version(self) -> str:
        """Size and version tag (ETag or mtime) of the object: derived data is cached under it."""
        if self._version is None:
            try:
                info = stat(self.location, self.storage)
            except StorageUnavailableError:
                return ""  # asked again next time: the storage may be back
            except StorageError:
                self._version = ""  # e.g. an object store that does not answer HEAD
            else:
                self._version = f"{info['size']}:{info['tag']}"
        return self._version or ""

    def _init_levels(
        self, dims: tuple[tuple[int, int], ...], downsamples: tuple[float, ...], props: dict[str, Any]
    ) -> None:
        """Keep what a reader found; readers open some files they cannot serve (a 0-pixel level)."""
        if not dims or min(min(d) for d in dims) <= 0:
            raise SlideFormatError(self.uri, f"the image has an empty dimension {dims[0] if dims else ()}")
        self._dims, self._downsamples, self._props = dims, downsamples, props

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._dims

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._downsamples

    @property
    def properties(self) -> dict[str, Any]:
        return self._props

    # -- what a reader provides ------------------------------------------------------------
    @property
    @abstractmethod
    def vendor(self) -> str | None: ...

    @abstractmethod
    def _raw_mpp(self) -> object: ...

    @abstractmethod
    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB pixels of ``level`` at level coordinates; the box lies inside the level."""

    def associated_images(self) -> list[str]:
        return []

    def close(self) -> None:  # noqa: B027 - readers without resources need nothing
        """Release file handles."""

    # -- derived ---------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def mpp(self) -> float | None:
        """Level-0 microns per pixel: the override, else the file's value when plausible, else None."""
        if self._mpp_override is not None:
            return float(self._mpp_override)
        return plausible_mpp(self._raw_mpp())

    @property
    def level_mpps(self) -> tuple[float, ...] | None:
        mpp = self.mpp
        if mpp is None:
            return None
        return tuple(mpp * d for d in self.level_downsamples)

    @property
    def bytes_read(self) -> int:
        return self.counter.bytes

    def info(self) -> dict[str, Any]:
        """The properties a person wants first, JSON-ready."""
        return {
            "uri": self.uri,
            "backend": self.backend,
            "vendor": self.vendor,
            "dimensions": list(self.dimensions),
            "level_count": self.level_count,
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": [round(d, 4) for d in self.level_downsamples],
            "mpp": self.mpp,
            "associated_images": self.associated_images(),
        }

    def check(self) -> None:
        """Decode a little of the coarsest level and of level 0's centre.

        Some files open and only fail on pixels (a corrupt tile, an unknown codec); ``info``
        and manifest validation call this so such slides are reported before training.
        """
        if self._checked:
            return
        lw, lh = self.level_dimensions[-1]
        self._read_level_padded(self.level_count - 1, 0, 0, min(lw, 64), min(lh, 64))
        w0, h0 = self.dimensions
        self.read_region(max(0, w0 // 2 - 16), max(0, h0 // 2 - 16), 0, (min(w0, 32), min(h0, 32)))
        self._checked = True  # an open handle that decoded once is not checked again

    # -- reading ---------------------------------------------------------------------------
    def read_region(self, x: int, y: int, level: int, size: Size) -> np.ndarray:
        """``size`` pixels of ``level`` whose top-left corner is level-0 pixel ``(x, y)``."""
        if not 0 <= level < self.level_count:
            raise SlideReadError(self.uri, f"level {level} out of range (0..{self.level_count - 1})")
        ds = self.level_downsamples[level]
        w, h = as_size(size)
        return self._read_level_padded(level, int(math.floor(x / ds)), int(math.floor(y / ds)), w, h)

    def read(self, x: int, y: int, size: Size, mpp: float) -> np.ndarray:
        """``size`` output pixels at ``mpp`` µm/px whose top-left corner is level-0 pixel ``(x, y)``.

        Picks the best pyramid level for the resolution (see ``select_level``) and resamples,
        so a request means the same tissue on every scanner.
        """
        mpps = self.level_mpps
        if mpps is None:
            raise SlideReadError(
                self.uri, "the slide has no usable mpp; pass mpp= to open_slide (e.g. 0.25) to read by µm/px"
            )
        return self.read_at(x, y, size, select_level(mpps, mpp))

    def read_batch(self, coords: Sequence[tuple[int, int]], size: Size, mpp: float) -> list[np.ndarray]:
        """Many regions of one slide at once: readers fetch all their tiles in one concurrent batch.

        This is how the tile stream reads (a batch of coordinates grouped by slide): on object
        storage one round of concurrent range requests replaces a round trip per region.
        """
        mpps = self.level_mpps
        if mpps is None:
            raise SlideReadError(
                self.uri, "the slide has no usable mpp; pass mpp= to open_slide to read by µm/px"
            )
        choice = select_level(mpps, mpp)
        w, h = as_size(size)
        ds = self.level_downsamples[choice.level]
        lw, lh = max(1, round(w * choice.scale)), max(1, round(h * choice.scale))
        boxes = [(int(math.floor(x / ds)), int(math.floor(y / ds)), lw, lh) for x, y in coords]
        with self._prefetched(choice.level, boxes):
            return [self.read_at(x, y, (w, h), choice) for x, y in coords]

    def _prefetched(self, level: int, boxes: list[tuple[int, int, int, int]]) -> AbstractContextManager[None]:
        """Readers that can fetch many boxes' pixels at once override this; the default does nothing."""
        return nullcontext()

    def read_at(self, x: int, y: int, size: Size, choice: LevelChoice) -> np.ndarray:
        """Read with a precomputed level choice (samplers compute it once per slide)."""
        w, h = as_size(size)
        ds = self.level_downsamples[choice.level]
        lx, ly = int(math.floor(x / ds)), int(math.floor(y / ds))
        if not choice.resample:
            return self._read_level_padded(choice.level, lx, ly, w, h)
        lw, lh = max(1, round(w * choice.scale)), max(1, round(h * choice.scale))
        region = self._read_level_padded(choice.level, lx, ly, lw, lh)
        return resize(region, w, h)

    def _read_level_padded(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        if w <= 0 or h <= 0:
            raise SlideReadError(self.uri, f"region size must be positive, got {w}x{h}")
        lw, lh = self.level_dimensions[level]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if x0 == x and y0 == y and x1 == x + w and y1 == y + h:
            return self._guarded_read(level, x, y, w, h)
        out = np.full((h, w, 3), FILL, np.uint8)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._guarded_read(level, x0, y0, x1 - x0, y1 - y0)
        return out

    def _guarded_read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        try:
            return self._read_level(level, x, y, w, h)
        except SlideError:
            raise
        except Exception as exc:  # noqa: BLE001 - a reader's own errors become one type
            raise SlideReadError(
                self.uri,
                f"reading level {level} at ({x}, {y}) size {w}x{h} failed: {type(exc).__name__}: {exc}",
            ) from exc

    def thumbnail(
        self, max_size: int | None = None, mpp: float | None = None, band: int = 2048
    ) -> np.ndarray:
        """A whole-slide overview, at ``mpp`` µm/px or at most ``max_size`` px on its long side.

        Reads the coarsest sufficient level in horizontal bands, so even a 50-megapixel
        single-level image is never held in memory whole.
        """
        w0, h0 = self.dimensions
        if mpp is not None:
            if self.mpp is None:
                raise SlideReadError(self.uri, "the slide has no usable mpp; ask for max_size instead")
            downsample = mpp / self.mpp
        else:
            downsample = max(w0, h0) / float(max_size or 1024)
        downsample = max(downsample, 1.0)
        out_w, out_h = max(1, round(w0 / downsample)), max(1, round(h0 / downsample))
        choice = select_level(list(self.level_downsamples), downsample)
        level = choice.level
        lw, lh = self.level_dimensions[level]
        if not choice.resample and (lw, lh) == (out_w, out_h):
            band_h = max(1, band)
            return np.concatenate(
                [self._read_level_padded(level, 0, y, lw, min(band_h, lh - y)) for y in range(0, lh, band_h)]
            )
        rows = []
        sy = lh / out_h
        # Whole output rows per band, so band edges never blur or drop a row.
        rows_per_band = max(1, int(band / sy))
        for oy in range(0, out_h, rows_per_band):
            oh = min(rows_per_band, out_h - oy)
            ly0, ly1 = round(oy * sy), min(lh, round((oy + oh) * sy))
            if ly1 <= ly0:
                ly1 = min(lh, ly0 + 1)
            strip = self._read_level_padded(level, 0, ly0, lw, ly1 - ly0)
            rows.append(resize(strip, out_w, oh))
        return np.concatenate(rows)

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.uri} {self.dimensions[0]}x{self.dimensions[1]} mpp={self.mpp}>"


def resize(arr: np.ndarray, w: int, h: int) -> np.ndarray:
    """Antialiased resize of an RGB array to ``w`` x ``h``."""
    if arr.shape[1] == w and arr.shape[0] == h:
        return arr
    img = Image.fromarray(arr)
    return np.asarray(img.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=None))
