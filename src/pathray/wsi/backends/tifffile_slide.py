"""TIFF slides read with tifffile alone: no tiffslide, zarr or imagecodecs (a slim GPU worker's image).

    slide = open_slide("s3://bucket/case-01.svs", storage, backend="tifffile")

Aperio SVS and generic pyramidal TIFFs (series 0 and its levels, as tiffslide reads them). The mpp
comes from the Aperio description, else the resolution tags. Tiled levels are read by the exact
byte ranges of their tiles and decoded by ``pathray.wsi.tiledecode`` (libjpeg-turbo through
imagecodecs, or PIL for JPEG when imagecodecs is missing); a small level without tiles is read
whole by tifffile. The pixels equal the tiffslide backend's (same decoder: exactly).
"""

from __future__ import annotations

import re
import threading
import warnings
from fractions import Fraction
from typing import Any

import numpy as np

from pathray.lru import LruCache
from pathray.registry import SLIDE_BACKENDS
from pathray.storage import Location, StorageConfig, describe
from pathray.wsi.backends.errors import SlideFormatError, SlideReadError, reader_failure
from pathray.wsi.backends.ranges import RangeReader, open_file
from pathray.wsi.backends.slide import FILL, Slide, to_rgb
from pathray.wsi.tiledecode import TileDecodeError, TileLayout, decode_tiles_cpu, read_tiles

MAX_UNTILED_PIXELS = 2**26
"""A level without tiles is decoded whole and kept; larger ones need the tiffslide backend."""

# µm per ResolutionUnit (2: inch, 3: centimetre, 4: millimetre, 5: micrometre), as tiffslide reads them
_UM_PER_UNIT = {2: 25400.0, 3: 10000.0, 4: 1000.0, 5: 1.0}


def _mpp_from_tags(page: Any) -> float | None:
    try:
        unit = int(page.tags["ResolutionUnit"].value)
        xres = Fraction(*page.tags["XResolution"].value)
        return _UM_PER_UNIT[unit] / float(xres)
    except (KeyError, ValueError, TypeError, ZeroDivisionError):
        return None


def _aperio_mpp(description: str) -> float | None:
    """``MPP = 0.499`` of an Aperio ImageDescription (``key = value`` fields between ``|``)."""
    match = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", description)
    try:
        return float(match.group(1)) if match else None
    except ValueError:
        return None


@SLIDE_BACKENDS.register("tifffile")
class TifffileBackend(Slide):
    """Aperio SVS and generic pyramidal TIFF through tifffile and ``tiledecode``, by byte ranges."""

    backend = "tifffile"

    def __init__(
        self,
        location: Location,
        storage: StorageConfig | None = None,
        mpp_override: float | None = None,
        tile_cache: int = 64,
    ) -> None:
        super().__init__(location, mpp_override, storage)
        import tifffile

        self._source = open_file(location, storage, self.counter)  # its readinto fills numpy buffers
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._tif = tifffile.TiffFile(self._source)
                if self._tif.is_ndpi:
                    raise SlideFormatError(location.uri, "NDPI needs the tiffslide backend")
                self._levels = list(self._tif.series[0].levels)
                dims = tuple(self._level_size(lvl) for lvl in self._levels)
                page0 = self._tif.pages[0]
                description = str(page0.description or "")
        except SlideFormatError:
            self._close_source()
            raise
        except Exception as exc:  # noqa: BLE001 - every reader failure becomes a SlideFormatError
            self._close_source()
            raise reader_failure(location.uri, "tifffile", exc) from None
        self._vendor = "aperio" if description.startswith("Aperio") else "generic-tiff"
        mpp = _aperio_mpp(description) if self._vendor == "aperio" else None
        self._mpp = mpp if mpp is not None else _mpp_from_tags(page0)
        w0, h0 = dims[0]
        downsamples = tuple(((w0 / w) + (h0 / h)) / 2.0 for w, h in dims)  # as tiffslide computes them
        props = {"tiffslide.series-index": 0, "tiffslide.vendor": self._vendor, "tiffslide.mpp-x": self._mpp}
        try:
            self._init_levels(dims, downsamples, props)
        except SlideFormatError:
            self._close_source()
            raise
        self._layouts = [TileLayout.from_page(lvl.keyframe, i) for i, lvl in enumerate(self._levels)]
        self._ranges = RangeReader(location, storage, self.counter)
        self._cache: LruCache[tuple[int, int], np.ndarray] = LruCache(tile_cache)  # neighbours share tiles
        self._whole: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _level_size(level: Any) -> tuple[int, int]:
        page = level.keyframe
        return int(page.imagewidth), int(page.imagelength)

    def _close_source(self) -> None:
        if hasattr(self._source, "close"):
            self._source.close()

    @property
    def vendor(self) -> str | None:
        return self._vendor

    def _raw_mpp(self) -> object:
        return self._mpp

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        layout = self._layouts[level]
        if layout is None:
            return self._read_untiled(level)[y : y + h, x : x + w].copy()
        wanted = layout.indices_for(x, y, w, h)
        tiles = self._tiles(layout, wanted)
        out = np.full((h, w, 3), FILL, np.uint8)
        for index in wanted:
            row, col = divmod(index, layout.across)
            ox, oy = col * layout.tile_w, row * layout.tile_h
            x0, y0 = max(x, ox), max(y, oy)
            x1, y1 = min(x + w, ox + layout.tile_w), min(y + h, oy + layout.tile_h)
            out[y0 - y : y1 - y, x0 - x : x1 - x] = tiles[index][y0 - oy : y1 - oy, x0 - ox : x1 - ox]
        return out

    def _tiles(self, layout: TileLayout, wanted: list[int]) -> dict[int, np.ndarray]:
        """Decoded tiles by index: cached ones, the rest fetched in one batch of ranges and decoded."""
        found = {i: t for i in dict.fromkeys(wanted) if (t := self._cache.get((layout.level, i))) is not None}
        fetch = [i for i in dict.fromkeys(wanted) if i not in found]
        if fetch:
            try:
                stored = read_tiles(layout, fetch, self._ranges.read_ranges)
                decoded = decode_tiles_cpu(stored)
            except TileDecodeError as exc:
                raise SlideReadError(self.uri, str(exc)) from None
            for tile, pixels in zip(stored, decoded, strict=True):
                self._cache.put((layout.level, tile.index), pixels)
                found[tile.index] = pixels
        return found

    def _read_untiled(self, level: int) -> np.ndarray:
        with self._lock:
            if level not in self._whole:
                w, h = self.level_dimensions[level]
                if w * h > MAX_UNTILED_PIXELS:
                    raise SlideReadError(
                        self.uri, f"level {level} ({w}x{h}) has no tiles to read by range; use tiffslide"
                    )
                try:
                    self._whole[level] = to_rgb(np.asarray(self._levels[level].asarray()))
                except Exception as exc:  # noqa: BLE001 - e.g. a codec that needs imagecodecs
                    cause = f"level {level} does not decode ({describe(exc)})"
                    raise SlideReadError(self.uri, cause) from None
            return self._whole[level]

    def close(self) -> None:
        self._ranges.close()
        try:
            self._tif.close()
        finally:
            self._close_source()
