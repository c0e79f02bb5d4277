"""A TIFF slide's tiles as stored, fetched by exact byte ranges, decoded in batches on CPU or GPU.

    slide = open_slide("s3://bucket/case-01.svs", storage)
    tiles = compressed_tiles(slide, level=0, indices=[0, 1, 2])   # CompressedTile: codec, bytes, geometry
    reader = CompressedTileReader.for_slide(slide)
    batch = reader.read_batch(coords, 224, mpp=0.5, device="cuda")  # (N, 3, 224, 224) uint8 on the GPU

The same regions as ``Slide.read_batch``, but the pixels are decoded where they are used: a GPU
worker takes compressed bytes (a few KB a tile) and nvJPEG decodes them, instead of a CPU reader
decoding and shipping raw pixels. Levels this path cannot serve (not tiled, NDPI, 16-bit, an
unknown codec) are read by the slide's own reader and moved to the device, so callers need no
second code path.
"""

from __future__ import annotations

import math
import threading
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

from pathray.storage import describe
from pathray.wsi.backends.errors import SlideReadError
from pathray.wsi.backends.levels import select_level
from pathray.wsi.backends.ranges import RangeReader, open_file
from pathray.wsi.backends.slide import Size, Slide, as_size
from pathray.wsi.tiledecode import (
    FILL,
    CompressedTile,
    PackedRegion,
    TileCodec,
    TileDecodeError,
    TileLayout,
    assemble,
    decode_tiles,
    pack_region,
    read_tiles,
)


class CompressedTileReader:
    """Raw tiles of one open slide's pyramid levels, by byte ranges, and regions decoded from them.

    Reads the TIFF tile tables itself (one header parse, through the slide's storage settings)
    and fetches through a ``RangeReader`` that counts into the slide's ``bytes_read``. Holds the
    slide weakly: the reader of a closed and forgotten slide goes with it.
    """

    def __init__(self, slide: Slide) -> None:
        self.uri = slide.uri
        self._slide = weakref.ref(slide)
        self._dims = slide.level_dimensions
        self._downsamples = slide.level_downsamples
        self._mpps = slide.level_mpps
        self._layouts = self._read_layouts(slide)
        self._ranges = RangeReader(slide.location, slide.storage, slide.counter)
        weakref.finalize(self, self._ranges.close)

    def _read_layouts(self, slide: Slide) -> list[TileLayout | None]:
        """Each level's tile layout, None where raw tiles cannot be served (and why, for the error)."""
        import tifffile

        self._why = "it has no plain tiles (not tiled, NDPI, not 8-bit, or an unknown codec)"
        if slide.vendor == "hamamatsu":  # NDPI "tiles" are whole JPEG strips with restart markers
            return [None] * len(self._dims)
        series_index = int(slide.properties.get("tiffslide.series-index", 0) or 0)
        layouts: list[TileLayout | None] = []
        with open_file(slide.location, slide.storage, slide.counter) as fh:
            try:
                with warnings.catch_warnings(), tifffile.TiffFile(fh) as tif:
                    warnings.simplefilter("ignore")
                    levels = tif.series[series_index].levels
                    layouts = [TileLayout.from_page(lvl.keyframe, i) for i, lvl in enumerate(levels)]
            except Exception as exc:  # noqa: BLE001 - not a TIFF file (DICOM), or one tifffile cannot parse
                self._why = f"its TIFF tile tables do not read ({describe(exc)})"
        # A level serves raw tiles only where it is the level the slide's reader reports.
        found = dict(enumerate(layouts))
        return [
            lay if (lay := found.get(i)) is not None and (lay.width, lay.height) == dims else None
            for i, dims in enumerate(self._dims)
        ]

    @classmethod
    def for_slide(cls, slide: Slide) -> CompressedTileReader:
        """The reader of ``slide``, made once per open slide."""
        with _READERS_LOCK:
            reader = _READERS.get(slide)
            if reader is None:
                reader = _READERS[slide] = cls(slide)
            return reader

    # -- raw tiles ---------------------------------------------------------------------------
    def servable(self, level: int) -> bool:
        """Whether ``level``'s tiles can be read raw (tiled, 8-bit, a codec decoded here)."""
        return 0 <= level < len(self._layouts) and self._layouts[level] is not None

    def layout(self, level: int) -> TileLayout:
        """Grid, byte ranges and codec of ``level``; SlideReadError when it has no raw tiles to serve."""
        if not 0 <= level < len(self._layouts):
            raise SlideReadError(self.uri, f"level {level} out of range (0..{len(self._layouts) - 1})")
        layout = self._layouts[level]
        if layout is None:
            raise SlideReadError(
                self.uri, f"level {level} cannot be read as raw tiles: {self._why}; use Slide.read_region"
            )
        return layout

    def compressed_tiles(self, level: int, indices: Sequence[int]) -> list[CompressedTile]:
        """Tiles ``indices`` (row-major in the level's grid) as stored, fetched in one batch of ranges."""
        layout = self.layout(level)
        bad = [i for i in indices if not 0 <= i < len(layout.offsets)]
        if bad:
            raise SlideReadError(self.uri, f"tile index {bad[0]} out of range for level {level}")
        try:
            return read_tiles(layout, indices, self._ranges.read_ranges)
        except TileDecodeError as exc:
            raise SlideReadError(self.uri, f"level {level}: {exc}") from None

    def decode(self, tiles: Sequence[CompressedTile], device: Any = "cpu", workers: int = 0) -> list[Any]:
        """``decode_tiles`` with failures said as this slide's SlideReadError."""
        try:
            return decode_tiles(tiles, device=device, workers=workers)
        except TileDecodeError as exc:
            raise SlideReadError(self.uri, str(exc)) from None

    # -- regions -----------------------------------------------------------------------------
    def read_region(
        self, x: int, y: int, level: int, size: Size, device: Any = "cpu", workers: int = 0
    ) -> Any:
        """``Slide.read_region`` as a ``(3, h, w)`` uint8 tensor on ``device``, decoded there."""
        w, h = as_size(size)
        ds = self._downsamples[level]
        box = (int(math.floor(x / ds)), int(math.floor(y / ds)), w, h)
        return self._regions(level, [box], None, device, workers)[0]

    def read_batch(
        self, coords: Sequence[tuple[int, int]], size: Size, mpp: float, device: Any = "cpu", workers: int = 0
    ) -> Any:
        """``Slide.read_batch`` as one ``(N, 3, h, w)`` uint8 tensor on ``device``.

        The regions' tiles are fetched in one batch of ranges and decoded in one batch (nvJPEG on
        ``cuda``), then cropped and resampled on the device (antialiased bilinear, as the slide's
        reader resizes). A level without raw tiles is read by the slide's reader instead.
        """
        w, h = as_size(size)
        plan = self._plan(coords, (w, h), mpp)
        if plan is None:
            return self._fallback(coords, (w, h), mpp, device)
        level, boxes, out_size = plan
        import torch

        regions = self._regions(level, boxes, out_size, device, workers)
        if not regions:
            return torch.empty((0, 3, h, w), dtype=torch.uint8, device=device)
        return torch.stack(regions)

    def packed_regions(self, coords: Sequence[tuple[int, int]], size: Size, mpp: float) -> list[bytes]:
        """The regions ``read_batch`` would cut, undecoded: each its tiles as stored and its box,
        packed as bytes (``tiledecode.pack_region``) for ``decode_regions`` where they are used.

        A level without raw tiles is read and decoded here, and each region travels as one
        uncompressed tile of its pixels, so the receiver has one path for both.
        """
        w, h = as_size(size)
        plan = self._plan(coords, (w, h), mpp)
        if plan is None:
            slide = self._slide()
            if slide is None:
                raise SlideReadError(self.uri, "the slide was closed")
            codec = TileCodec(compression=1, photometric=2, samples=3, predictor=1, tile_w=w, tile_h=h)
            pixels = [
                CompressedTile(0, 0, 0, 0, 0, 0, w, h, codec, a.tobytes())
                for a in slide.read_batch(coords, (w, h), mpp)
            ]
            return [pack_region(PackedRegion((tile,), (0, 0, w, h))) for tile in pixels]
        level, boxes, out_size = plan
        layout = self.layout(level)
        wanted = [i for box in boxes for i in layout.indices_for(*box)]
        tiles = {t.index: t for t in self.compressed_tiles(level, wanted)}
        return [
            pack_region(PackedRegion(tuple(tiles[i] for i in layout.indices_for(*box)), box, out_size))
            for box in boxes
        ]

    def _plan(
        self, coords: Sequence[tuple[int, int]], size: tuple[int, int], mpp: float
    ) -> tuple[int, list[tuple[int, int, int, int]], tuple[int, int] | None] | None:
        """The level, the boxes in its pixels and the size they are resampled to (None: kept) for
        ``size`` px regions at ``mpp``; None when that level has no raw tiles to serve."""
        if self._mpps is None:
            raise SlideReadError(self.uri, "the slide has no usable mpp; pass mpp= to open_slide")
        choice = select_level(self._mpps, mpp)
        if not self.servable(choice.level):
            return None
        w, h = size
        ds = self._downsamples[choice.level]
        lw, lh = (w, h)
        if choice.resample:
            lw, lh = max(1, round(w * choice.scale)), max(1, round(h * choice.scale))
        boxes = [(int(math.floor(x / ds)), int(math.floor(y / ds)), lw, lh) for x, y in coords]
        return choice.level, boxes, ((w, h) if choice.resample else None)

    def _regions(
        self,
        level: int,
        boxes: list[tuple[int, int, int, int]],
        out_size: tuple[int, int] | None,
        device: Any,
        workers: int,
    ) -> list[Any]:
        layout = self.layout(level)
        wanted = [i for box in boxes for i in layout.indices_for(*box)]
        tiles = self.compressed_tiles(level, wanted)
        images = self.decode(tiles, device=device, workers=workers)
        by_index = {t.index: (t, im) for t, im in zip(tiles, images, strict=True)}
        regions = []
        for box in boxes:
            touched = [by_index[i] for i in layout.indices_for(*box)]
            regions.append(
                assemble([t for t, _ in touched], [im for _, im in touched], box, out_size=out_size)
                if touched
                else _glass(box, out_size, device)
            )
        return regions

    def _fallback(
        self, coords: Sequence[tuple[int, int]], size: tuple[int, int], mpp: float, device: Any
    ) -> Any:
        import numpy as np
        import torch

        slide = self._slide()
        if slide is None:
            raise SlideReadError(self.uri, "the slide was closed")
        arrays = slide.read_batch(coords, size, mpp)
        w, h = size
        if not arrays:
            return torch.empty((0, 3, h, w), dtype=torch.uint8, device=device)
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous().to(device)

    def close(self) -> None:
        self._ranges.close()


def _glass(box: tuple[int, int, int, int], out_size: tuple[int, int] | None, device: Any) -> Any:
    import torch

    w, h = out_size or box[2:]
    return torch.full((3, h, w), FILL, dtype=torch.uint8, device=device)


_READERS: weakref.WeakKeyDictionary[Slide, CompressedTileReader] = weakref.WeakKeyDictionary()
_READERS_LOCK = threading.Lock()


def compressed_tiles(slide: Slide, level: int, indices: Sequence[int]) -> list[CompressedTile]:
    """Tiles ``indices`` of ``level`` as stored: codec, bytes (JPEG made standalone) and geometry.

    Raises:
        SlideReadError: the level has no plain tiles (or the file no TIFF tile tables), an index is
            out of range, or a fetch fails.
    """
    return CompressedTileReader.for_slide(slide).compressed_tiles(level, indices)
