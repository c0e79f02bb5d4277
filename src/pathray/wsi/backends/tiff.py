"""TIFF-family slides through tiffslide, with tiles fetched by exact byte ranges and decoded directly."""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from pathray.lru import LruCache
from pathray.registry import SLIDE_BACKENDS
from pathray.storage import Location, StorageConfig, describe
from pathray.wsi.backends.errors import SlideFormatError, SlideReadError, reader_failure
from pathray.wsi.backends.ranges import RangeReader, open_file
from pathray.wsi.backends.slide import FILL, Slide, to_rgb


@dataclass
class TiledLevel:
    """Where one pyramid level's tiles lie in the file, and how to decode them."""

    width: int
    height: int
    tile_w: int
    tile_h: int
    offsets: tuple[int, ...]
    bytecounts: tuple[int, ...]
    decode: Any
    jpegtables: bytes | None

    @property
    def across(self) -> int:
        return math.ceil(self.width / self.tile_w)

    @classmethod
    def from_page(cls, page: Any) -> TiledLevel | None:
        """Build from a tifffile page, or None when the page needs the general reader."""
        try:
            if not page.is_tiled or page.imagedepth != 1 or page.tiledepth != 1:
                return None
            if page.planarconfig != 1 and page.samplesperpixel > 1:
                return None
            if page.bitspersample != 8 or getattr(page, "is_ndpi", False):
                return None
            decode = page.decode  # raises for codecs imagecodecs lacks
        except Exception:  # noqa: BLE001 - the general reader will report it on first read
            return None
        across = math.ceil(page.imagewidth / page.tilewidth)
        down = math.ceil(page.imagelength / page.tilelength)
        if len(page.dataoffsets) != across * down:
            return None
        return cls(
            width=int(page.imagewidth),
            height=int(page.imagelength),
            tile_w=int(page.tilewidth),
            tile_h=int(page.tilelength),
            offsets=tuple(int(o) for o in page.dataoffsets),
            bytecounts=tuple(int(b) for b in page.databytecounts),
            decode=decode,
            jpegtables=page.jpegtables,
        )


@SLIDE_BACKENDS.register("tiffslide")
class TiffSlideBackend(Slide):
    """SVS, generic pyramidal TIFF, NDPI, ... read with tiffslide, from a path or any fsspec URL.

    Metadata (vendor, mpp, levels) come from tiffslide. Pixels of tiled levels are read by
    fetching exactly the byte ranges of the tiles a region touches (concurrently on object
    storage) and decoding them with imagecodecs; other layouts go through tiffslide's reader.
    """

    backend = "tiffslide"

    def __init__(
        self,
        location: Location,
        storage: StorageConfig | None = None,
        mpp_override: float | None = None,
        tile_cache: int = 64,
    ) -> None:
        super().__init__(location, mpp_override, storage)
        from tiffslide import TiffSlide

        self._lock = threading.Lock()
        source: Any = location.path if location.is_local else open_file(location, storage, self.counter)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "metadata parsing only partially implemented"
                self._ts = TiffSlide(source)
                props = dict(self._ts.properties)
                dims = tuple(tuple(int(v) for v in d) for d in self._ts.level_dimensions)
                downsamples = tuple(float(d) for d in self._ts.level_downsamples)
        except Exception as exc:  # noqa: BLE001 - every reader failure becomes a SlideFormatError
            self._close_source(source)
            raise reader_failure(location.uri, "tiffslide", exc) from None
        try:
            self._init_levels(dims, downsamples, props)  # type: ignore[arg-type]
        except SlideFormatError:
            self._close_source(source)
            raise
        self._source = source
        series = self._ts.ts_tifffile.series[int(props.get("tiffslide.series-index", 0) or 0)]
        for lvl in series.levels:
            try:
                lvl.keyframe.decode  # noqa: B018 - raises for a codec no decoder exists for
            except (ValueError, NotImplementedError) as exc:
                self._close_source(source)
                raise SlideFormatError(
                    location.uri, f"unsupported pixel encoding ({describe(exc)})"
                ) from None
        self._tiled: list[TiledLevel | None] = [TiledLevel.from_page(lvl.keyframe) for lvl in series.levels]
        self._ranges = RangeReader(location, storage, self.counter)
        self._cache: LruCache[tuple[int, int], np.ndarray] = LruCache(tile_cache)  # neighbours share tiles
        self._batch = threading.local()  # tiles prefetched by read_batch, per calling thread

    @staticmethod
    def _close_source(source: Any) -> None:
        if hasattr(source, "close"):
            source.close()

    @property
    def vendor(self) -> str | None:
        vendor = self._props.get("tiffslide.vendor")
        return str(vendor) if vendor else "generic-tiff"

    def _raw_mpp(self) -> object:
        return self._props.get("tiffslide.mpp-x")

    def associated_images(self) -> list[str]:
        try:
            return sorted(self._ts.associated_images)
        except Exception:  # noqa: BLE001 - associated images are optional extras
            return []

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        tiled = self._tiled[level] if level < len(self._tiled) else None
        if tiled is None or (tiled.width, tiled.height) != self._dims[level]:
            return self._read_general(level, x, y, w, h)
        return self._read_tiles(level, tiled, x, y, w, h)

    @staticmethod
    def _tile_indices(lv: TiledLevel, x: int, y: int, w: int, h: int) -> list[int]:
        """Tiles of a level that the box ``(x, y, w, h)`` touches (clipped to the level)."""
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, lv.width), min(y + h, lv.height)
        if x1 <= x0 or y1 <= y0:
            return []
        tx0, tx1 = x0 // lv.tile_w, (x1 - 1) // lv.tile_w
        ty0, ty1 = y0 // lv.tile_h, (y1 - 1) // lv.tile_h
        return [ty * lv.across + tx for ty in range(ty0, ty1 + 1) for tx in range(tx0, tx1 + 1)]

    def _decode(self, level: int, lv: TiledLevel, index: int, data: bytes) -> np.ndarray:
        """One tile's pixels, kept in the tile cache."""
        try:
            decoded, _, _ = lv.decode(data, index, jpegtables=lv.jpegtables, _fullsize=True)
        except Exception as exc:  # noqa: BLE001 - a codec's own error, said with the tile
            ty, tx = divmod(index, lv.across)
            raise SlideReadError(
                self.uri, f"tile ({tx}, {ty}) of level {level} does not decode: {describe(exc)}"
            ) from exc
        tile = to_rgb(np.asarray(decoded).reshape(decoded.shape[-3:]))
        self._cache.put((level, index), tile)
        return tile

    def _fetch_tiles(self, level: int, lv: TiledLevel, wanted: list[int]) -> dict[int, np.ndarray]:
        """Decoded tiles by index: cached ones, the rest fetched in one concurrent batch of ranges."""
        tiles: dict[int, np.ndarray] = {}
        fetch = []
        for index in dict.fromkeys(wanted):
            tile = self._cache.get((level, index))
            if tile is not None:
                tiles[index] = tile
            elif lv.bytecounts[index] > 0:
                fetch.append(index)
        if fetch:
            arriving = self._ranges.iter_ranges(
                [lv.offsets[i] for i in fetch], [lv.bytecounts[i] for i in fetch]
            )
            for k, data in arriving:  # decode each tile while the others are still on their way
                tiles[fetch[k]] = self._decode(level, lv, fetch[k], data)
        return tiles

    @contextlib.contextmanager
    def _prefetched(self, level: int, boxes: list[tuple[int, int, int, int]]) -> Iterator[None]:
        """A ``read_batch``'s regions made together, local or remote: each stored tile they share
        is read and decoded once a batch (random regions of one slide share most of theirs)."""
        lv = self._tiled[level] if level < len(self._tiled) else None
        if lv is None or (lv.width, lv.height) != self._dims[level]:
            yield  # a level tifffile does not tile as the pyramid says: read region by region
            return
        self._batch.tiles = batch = _BatchRegions(self, level, lv, boxes)
        try:
            yield
        finally:
            self._batch.tiles = None
            batch.close()

    def _read_tiles(self, level: int, lv: TiledLevel, x: int, y: int, w: int, h: int) -> np.ndarray:
        batch: _BatchRegions | None = getattr(self._batch, "tiles", None)
        made = batch.take((x, y, w, h)) if batch is not None and batch.level == level else None
        if made is not None:
            return made
        wanted = self._tile_indices(lv, x, y, w, h)
        return self._assemble(lv, self._fetch_tiles(level, lv, wanted), x, y, w, h)

    @staticmethod
    def _assemble(lv: TiledLevel, tiles: dict[int, np.ndarray], x: int, y: int, w: int, h: int) -> np.ndarray:
        """The box ``(x, y, w, h)`` of a level from its decoded tiles; missing (empty) tiles are glass."""
        out = np.empty((h, w, 3), np.uint8)
        for index in TiffSlideBackend._tile_indices(lv, x, y, w, h):
            ty, tx = divmod(index, lv.across)
            ox, oy = tx * lv.tile_w, ty * lv.tile_h
            sx0, sy0 = max(x, ox), max(y, oy)
            sx1, sy1 = min(x + w, ox + lv.tile_w), min(y + h, oy + lv.tile_h)
            tile = tiles.get(index)
            dst = out[sy0 - y : sy1 - y, sx0 - x : sx1 - x]
            if tile is None:
                dst[...] = FILL
            else:
                dst[...] = tile[sy0 - oy : sy1 - oy, sx0 - ox : sx1 - ox]
        return out

    def _read_general(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        from tiffslide._zarr import get_zarr_selection

        axes = self._props.get("tiffslide.series-axes", "YXS")
        with self._lock:
            if axes == "CYX":
                arr = get_zarr_selection(
                    self._ts.zarr_group, level, (slice(None), slice(y, y + h), slice(x, x + w))
                )
                arr = np.moveaxis(arr, 0, -1)
            else:
                arr = get_zarr_selection(self._ts.zarr_group, level, (slice(y, y + h), slice(x, x + w), ...))
        arr = np.asarray(arr)
        if arr.shape[0] != h or arr.shape[1] != w:
            raise SlideReadError(self.uri, f"level {level} returned {arr.shape[:2]} for a {h}x{w} request")
        return to_rgb(arr)

    def close(self) -> None:
        self._ranges.close()
        try:
            self._ts.close()
        finally:
            self._close_source(self._source)


class _BatchRegions:
    """The regions of one ``read_batch``, made in the order their tiles arrive.

    All their tiles' bytes are requested at once; a region is assembled as soon as its last tile
    is here (its tiles decoded then), and a decoded tile is dropped after its last region. So the
    CPU decodes whatever has arrived instead of waiting for the region asked for next, and a batch
    never holds hundreds of decoded tiles at a time (on object storage, allocating those cost more
    than the requests).
    """

    def __init__(
        self, slide: TiffSlideBackend, level: int, lv: TiledLevel, boxes: list[tuple[int, int, int, int]]
    ) -> None:
        self.slide, self.level, self.lv = slide, level, lv
        width, height = slide.level_dimensions[level]
        self.boxes: list[tuple[int, int, int, int]] = []
        self.open: dict[tuple[int, int, int, int], deque[int]] = {}  # box -> its regions not taken yet
        for x, y, w, h in boxes:  # clipped as Slide._read_level_padded clips them
            x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
            if x1 > x0 and y1 > y0:
                self.open.setdefault((x0, y0, x1 - x0, y1 - y0), deque()).append(len(self.boxes))
                self.boxes.append((x0, y0, x1 - x0, y1 - y0))
        self.tiles_of = [slide._tile_indices(lv, *box) for box in self.boxes]
        self.uses = Counter(i for tiles in self.tiles_of for i in tiles)
        self.decoded: dict[int, np.ndarray] = {}
        for i in self.uses:
            tile = slide._cache.get((level, i))
            if tile is not None:
                self.decoded[i] = tile
        self.fetch = [i for i in self.uses if i not in self.decoded and lv.bytecounts[i] > 0]
        fetching = set(self.fetch)
        self.waiting: dict[int, list[int]] = {}  # tile -> regions that wait for it
        self.missing = [0] * len(self.boxes)  # tiles each region waits for
        for k, tiles in enumerate(self.tiles_of):
            for i in tiles:
                if i in fetching:
                    self.missing[k] += 1
                    self.waiting.setdefault(i, []).append(k)
        self.raw: dict[int, bytes] = {}
        self.ready: dict[int, np.ndarray] = {}
        # Listed by region, so the first regions' tiles are asked for first.
        self._arriving = slide._ranges.iter_ranges(
            [lv.offsets[i] for i in self.fetch], [lv.bytecounts[i] for i in self.fetch]
        )

    def take(self, box: tuple[int, int, int, int]) -> np.ndarray | None:
        """The pixels of ``box`` (waiting for its tiles, making others meanwhile), or None if not ours."""
        regions = self.open.get(box)
        if not regions:
            return None
        k = regions.popleft()
        while self.missing[k] > 0:
            got = next(self._arriving, None)
            if got is None:
                raise SlideReadError(self.slide.uri, f"level {self.level}: tiles of a region never arrived")
            index = self.fetch[got[0]]
            self.raw[index] = got[1]
            for j in self.waiting.get(index, ()):
                self.missing[j] -= 1
                if self.missing[j] == 0 and j != k:
                    self.ready[j] = self._make(j)
        made = self.ready.pop(k, None)
        return made if made is not None else self._make(k)

    def _make(self, k: int) -> np.ndarray:
        tiles: dict[int, np.ndarray] = {}
        for i in self.tiles_of[k]:
            tile = self.decoded.get(i)
            if tile is None and i in self.raw:
                tile = self.slide._decode(self.level, self.lv, i, self.raw.pop(i))
            if tile is not None:
                tiles[i] = tile
            self.uses[i] -= 1
            if self.uses[i] > 0 and tile is not None:
                self.decoded[i] = tile
            else:
                self.decoded.pop(i, None)
        return self.slide._assemble(self.lv, tiles, *self.boxes[k])

    def close(self) -> None:
        self._arriving.close()  # requests not sent yet are dropped
