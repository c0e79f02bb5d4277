"""Compressed TIFF tiles -> pixels in batches, on CPU or GPU: standalone JPEG streams, crop and resample.

    layout = TileLayout.from_page(tifffile_page)                 # grid, byte ranges, codec of a level
    tiles = read_tiles(layout, layout.indices_for(box), read_ranges)
    images = decode_tiles(tiles, device="cuda")                  # nvJPEG for JPEG, CPU processes for the rest
    region = assemble(tiles, images, box, out_size=(224, 224))   # (3, 224, 224) uint8 on the same device

Abbreviated JPEG tiles (SVS: shared tables in the JPEGTables tag) become standalone streams, so
any decoder (nvJPEG, libjpeg-turbo, PIL) takes them as they are. Aperio writes RGB, not YCbCr,
into JPEG components numbered 0, 1, 2 with no JFIF or Adobe marker; a decoder that is not told
otherwise converts them from YCbCr and the colours are wrong, so such streams get an Adobe APP14
marker with transform 0 (as tifffile tells libjpeg ``colorspace=RGB`` for them). Other codecs
(JPEG 2000, LZW, deflate, zstd, ...) are decoded on CPU by imagecodecs, in worker processes.

Needs numpy and, when used, tifffile/imagecodecs (or PIL for JPEG) and torch; nothing from the
rest of pathray, so a GPU box with only torch and tifffile runs it (benchmarks/gpu_decode.py).
"""

from __future__ import annotations

import atexit
import io
import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

# Pixels outside the slide (and missing tiles) read as glass, as ``backends.slide.FILL``.
FILL = 255
JPEG = 7
# Adobe APP14, version 100, no flags, transform 0: the components are RGB, not YCbCr.
ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
CODEC_NAMES = {
    1: "raw",
    5: "lzw",
    6: "ojpeg",
    7: "jpeg",
    8: "deflate",
    32773: "packbits",
    32946: "deflate",
    33003: "jpeg2000",
    33004: "jpeg2000",
    33005: "jpeg2000",
    34712: "jpeg2000",
    34925: "lzma",
    50000: "zstd",
    50001: "webp",
    50002: "jpegxl",
}


class TileDecodeError(ValueError):
    """A tile's bytes do not decode; says which tile and why."""


@dataclass(frozen=True)
class TileCodec:
    """What a decoder needs to know about one level's tiles (small and picklable, for worker processes)."""

    compression: int
    photometric: int
    samples: int
    predictor: int
    tile_w: int
    tile_h: int
    jpegtables: bytes | None = None
    jfif: bool = False
    extrasamples: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        """``jpeg`` for tiles that become standalone 8-bit JPEG (what nvJPEG takes); else the codec."""
        if self.compression == JPEG:
            return "jpeg" if self.samples in (1, 3) and not self.extrasamples else "tiff-jpeg"
        return CODEC_NAMES.get(self.compression, f"tiff-{self.compression}")

    @property
    def rgb_jpeg(self) -> bool:
        """JPEG components hold R, G, B (Aperio) and carry no marker that says so."""
        return self.compression == JPEG and self.photometric == 2 and not self.jfif


@dataclass(frozen=True)
class CompressedTile:
    """One tile as stored: ``data`` (a standalone stream for ``codec.name == "jpeg"``) and where it lies.

    ``x, y`` is the tile's top-left corner in pixels of its level; a decoded tile is always the
    full ``codec.tile_w`` x ``codec.tile_h`` (TIFF pads edge tiles), of which ``width`` x ``height``
    lie inside the level. Empty ``data`` is a tile the file leaves out: it decodes to glass.
    """

    level: int
    index: int
    col: int
    row: int
    x: int
    y: int
    width: int
    height: int
    codec: TileCodec
    data: bytes

    @property
    def gpu_decodable(self) -> bool:
        return self.codec.name == "jpeg" and bool(self.data)


@dataclass(frozen=True)
class TileLayout:
    """How one pyramid level's tiles lie in the file: the grid, their byte ranges and their codec."""

    level: int
    width: int
    height: int
    offsets: tuple[int, ...]
    bytecounts: tuple[int, ...]
    codec: TileCodec

    @property
    def tile_w(self) -> int:
        return self.codec.tile_w

    @property
    def tile_h(self) -> int:
        return self.codec.tile_h

    @property
    def across(self) -> int:
        return math.ceil(self.width / self.tile_w)

    @property
    def down(self) -> int:
        return math.ceil(self.height / self.tile_h)

    @classmethod
    def from_page(cls, page: Any, level: int = 0) -> TileLayout | None:
        """Build from a tifffile page; None when its tiles are not plain 8-bit 2-D tiles this module decodes.

        The conditions are those of the byte-range reader in ``backends.tiff`` (tiled, one plane,
        contiguous samples, 8 bits, not NDPI), plus a codec that imagecodecs (or PIL for JPEG) has.
        """
        try:
            if not page.is_tiled or page.imagedepth != 1 or page.tiledepth != 1:
                return None
            if (page.planarconfig != 1 and page.samplesperpixel > 1) or page.bitspersample != 8:
                return None
            if getattr(page, "is_ndpi", False) or int(page.compression) not in CODEC_NAMES:
                return None
            codec = TileCodec(
                compression=int(page.compression),
                photometric=int(page.photometric),
                samples=int(page.samplesperpixel),
                predictor=int(page.predictor),
                tile_w=int(page.tilewidth),
                tile_h=int(page.tilelength),
                jpegtables=bytes(page.jpegtables) if page.jpegtables else None,
                jfif=bool(page.is_jfif) if int(page.compression) == JPEG else False,
                extrasamples=tuple(int(e) for e in page.extrasamples),
            )
        except Exception:  # noqa: BLE001 - a page tifffile cannot describe is read the general way
            return None
        layout = cls(
            level=level,
            width=int(page.imagewidth),
            height=int(page.imagelength),
            offsets=tuple(int(o) for o in page.dataoffsets),
            bytecounts=tuple(int(b) for b in page.databytecounts),
            codec=codec,
        )
        return layout if len(layout.offsets) == layout.across * layout.down else None

    def indices_for(self, x: int, y: int, w: int, h: int) -> list[int]:
        """Tiles that the box ``(x, y, w, h)`` (level pixels) touches, row by row, clipped to the level."""
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, self.width), min(y + h, self.height)
        if x1 <= x0 or y1 <= y0:
            return []
        tx0, tx1 = x0 // self.tile_w, (x1 - 1) // self.tile_w
        ty0, ty1 = y0 // self.tile_h, (y1 - 1) // self.tile_h
        return [ty * self.across + tx for ty in range(ty0, ty1 + 1) for tx in range(tx0, tx1 + 1)]

    def tile(self, index: int, data: bytes) -> CompressedTile:
        """The tile at ``index`` around its stored bytes (JPEG made standalone)."""
        row, col = divmod(index, self.across)
        x, y = col * self.tile_w, row * self.tile_h
        if data and self.codec.name == "jpeg":
            data = standalone_jpeg(data, self.codec.jpegtables, rgb=self.codec.rgb_jpeg)
        return CompressedTile(
            level=self.level,
            index=index,
            col=col,
            row=row,
            x=x,
            y=y,
            width=min(self.tile_w, self.width - x),
            height=min(self.tile_h, self.height - y),
            codec=self.codec,
            data=data,
        )


def standalone_jpeg(tile: bytes, tables: bytes | None, rgb: bool = False) -> bytes:
    """A complete JPEG stream from an abbreviated TIFF tile and the level's JPEGTables.

    ``tables`` is SOI, DQT/DHT segments, EOI; the tile is SOI, SOF, SOS, data, EOI. The stream is
    SOI + (APP14 Adobe transform 0 when ``rgb``) + the tables' segments + the tile after its SOI,
    the layout tifffile and OpenSlide hand to libjpeg. Tables the tile repeats simply override.
    """
    if tile[:2] != b"\xff\xd8":
        raise TileDecodeError(f"not a JPEG tile (first bytes 0x{tile[:4].hex()})")
    segments = b""
    if tables:
        if tables[:2] != b"\xff\xd8":
            raise TileDecodeError(f"JPEGTables does not start with SOI (0x{tables[:4].hex()})")
        end = len(tables) - 2 if tables[-2:] == b"\xff\xd9" else len(tables)
        segments = tables[2:end]
    marker = ADOBE_RGB if rgb and ADOBE_RGB[4:9] not in tile[:64] else b""
    return b"\xff\xd8" + marker + segments + tile[2:]


def read_tiles(
    layout: TileLayout, indices: Sequence[int], read_ranges: Callable[[list[int], list[int]], list[bytes]]
) -> list[CompressedTile]:
    """The tiles at ``indices`` (duplicates kept once), their bytes fetched by one ``read_ranges`` call."""
    wanted = list(dict.fromkeys(indices))
    stored = [i for i in wanted if layout.bytecounts[i] > 0]
    chunks = read_ranges([layout.offsets[i] for i in stored], [layout.bytecounts[i] for i in stored])
    data = dict(zip(stored, chunks, strict=True))
    return [layout.tile(i, data.get(i, b"")) for i in wanted]


# -- decoding on CPU ------------------------------------------------------------------------------


def _as_rgb(arr: np.ndarray, h: int, w: int) -> np.ndarray:
    """Decoder output -> (h, w, 3) uint8: grey repeated, alpha and extra samples dropped."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[..., None]
    arr = arr.reshape(arr.shape[-3:])[:h, :w]
    if arr.shape[2] < 3:
        arr = np.repeat(arr[..., :1], 3, axis=2)
    return np.ascontiguousarray(arr[..., :3], dtype=np.uint8)


def decode_jpeg_cpu(stream: bytes) -> np.ndarray:
    """A standalone JPEG stream -> RGB, by libjpeg-turbo through imagecodecs, else PIL."""
    try:
        import imagecodecs
    except ImportError:
        from PIL import Image

        with Image.open(io.BytesIO(stream)) as img:
            arr = np.asarray(img.convert("RGB"))
    else:
        arr = imagecodecs.jpeg8_decode(stream)
    return _as_rgb(arr, arr.shape[0], arr.shape[1])


def _decode_stored(codec: TileCodec, data: bytes) -> np.ndarray:
    """Tile bytes of any codec tifffile knows -> RGB, the way tifffile's own decoder does it."""
    import imagecodecs
    from tifffile import TIFF

    h, w, s = codec.tile_h, codec.tile_w, codec.samples
    if codec.compression == JPEG:
        # tifffile's choice (jpeg_decode_colorspace): YCbCr -> RGB; "RGB" without JFIF is RGB (Aperio)
        colorspace = outcolorspace = None
        if not codec.extrasamples and codec.photometric in (2, 6):
            colorspace, outcolorspace = (2 if codec.rgb_jpeg else None), 2
        arr = imagecodecs.jpeg_decode(
            data,
            tables=codec.jpegtables,
            colorspace=colorspace,
            outcolorspace=outcolorspace,
            shape=(h, w),
        )
        return _as_rgb(arr, h, w)
    if codec.compression in TIFF.IMAGE_COMPRESSIONS:  # JPEG 2000, WebP, JPEG XL: images, not bytes
        return _as_rgb(TIFF.DECOMPRESSORS[codec.compression](data), h, w)
    size = h * w * s
    raw = data if codec.compression == 1 else TIFF.DECOMPRESSORS[codec.compression](data, out=size)
    flat = np.frombuffer(raw, np.uint8)
    if flat.size < size:
        raise TileDecodeError(f"{codec.name} tile holds {flat.size} bytes, {size} expected")
    arr = flat[:size].reshape(h, w, s).copy()
    if codec.predictor != 1:
        arr = TIFF.UNPREDICTORS[codec.predictor](arr, axis=-2, out=arr)
    return _as_rgb(arr, h, w)


def decode_tile(tile: CompressedTile) -> np.ndarray:
    """One tile -> ``(tile_h, tile_w, 3)`` uint8 RGB on CPU; a left-out tile is glass."""
    codec = tile.codec
    if not tile.data:
        return np.full((codec.tile_h, codec.tile_w, 3), FILL, np.uint8)
    try:
        if codec.name == "jpeg":
            arr = decode_jpeg_cpu(tile.data)
            if arr.shape[:2] != (codec.tile_h, codec.tile_w):
                got, want = f"{arr.shape[1]}x{arr.shape[0]}", f"{codec.tile_w}x{codec.tile_h}"
                raise ValueError(f"decoded {got}, the level's tiles are {want}")
            return arr
        return _decode_stored(codec, tile.data)
    except TileDecodeError as exc:
        raise TileDecodeError(f"tile ({tile.col}, {tile.row}) of level {tile.level}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a codec's own error, said with the tile
        raise TileDecodeError(
            f"tile ({tile.col}, {tile.row}) of level {tile.level} ({codec.name}) does not decode: "
            f"{type(exc).__name__}: {exc}"
        ) from None


_POOLS: dict[int, ProcessPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(workers: int) -> ProcessPoolExecutor:
    """A process pool per size, started on first use (spawned: safe beside CUDA and threads)."""
    import multiprocessing

    with _POOLS_LOCK:
        if workers not in _POOLS:
            if not _POOLS:
                atexit.register(shutdown_pools)
            ctx = multiprocessing.get_context("spawn")
            _POOLS[workers] = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
        return _POOLS[workers]


def shutdown_pools() -> None:
    """Stop the decoding processes (they are started again on the next use)."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for pool in pools:
        pool.shutdown(wait=True, cancel_futures=True)


def decode_tiles_cpu(tiles: Sequence[CompressedTile], workers: int = 0) -> list[np.ndarray]:
    """Tiles -> HWC RGB arrays on CPU: in this process, or spread over ``workers`` processes."""
    if workers <= 0 or len(tiles) < 2:
        return [decode_tile(t) for t in tiles]
    chunk = max(1, len(tiles) // (4 * workers))
    return list(_pool(workers).map(decode_tile, tiles, chunksize=chunk))


# -- decoding into torch tensors, on the device the caller names -----------------------------------


def _to_chw(arr: np.ndarray, device: Any) -> Any:
    """HWC array -> CHW view on ``device`` (moved as stored, permuted there: no copy on CPU)."""
    import torch

    return torch.from_numpy(arr).to(device, non_blocking=True).permute(2, 0, 1)


def _decode_cpu(tiles: Sequence[CompressedTile], device: Any, workers: int) -> list[Any]:
    return [_to_chw(a, device) for a in decode_tiles_cpu(tiles, workers)]


def _decode_cuda(tiles: Sequence[CompressedTile], device: Any, workers: int) -> list[Any]:
    """Standalone JPEG tiles through nvJPEG in one batched call; everything else on CPU, then moved."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    out: list[Any] = [None] * len(tiles)
    gpu = [i for i, t in enumerate(tiles) if t.gpu_decodable]
    rest = [i for i, t in enumerate(tiles) if not t.gpu_decodable]
    if gpu:
        streams = [torch.frombuffer(bytearray(tiles[i].data), dtype=torch.uint8) for i in gpu]
        try:
            images = decode_jpeg(streams, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad stream fails the batch: find it, the rest still decode on GPU
            images = []
            for i, stream in zip(gpu, streams, strict=True):
                try:
                    images.append(decode_jpeg(stream, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    images.append(_to_chw(decode_tile(tiles[i]), device))  # raises TileDecodeError
        for i, image in zip(gpu, images, strict=True):
            out[i] = image
    for i, image in zip(rest, _decode_cpu([tiles[i] for i in rest], device, workers), strict=True):
        out[i] = image
    return out


DECODERS: dict[str, Callable[[Sequence[CompressedTile], Any, int], list[Any]]] = {
    "cpu": _decode_cpu,
    "cuda": _decode_cuda,
}


def decode_tiles(tiles: Sequence[CompressedTile], device: Any = "cpu", workers: int = 0) -> list[Any]:
    """Tiles -> ``(3, tile_h, tile_w)`` uint8 RGB tensors on ``device``.

    ``cpu``: libjpeg-turbo (imagecodecs, else PIL) and imagecodecs for the other codecs, in this
    process or in ``workers`` processes. ``cuda``: JPEG tiles batched through nvJPEG
    (``torchvision.io.decode_jpeg``), the others decoded on CPU as above and moved to the GPU.

    Raises:
        TileDecodeError: a tile does not decode (which one, and the codec's reason).
        ValueError: a device type no decoder exists for.
    """
    import torch

    device = torch.device(device)
    decoder = DECODERS.get(device.type)
    if decoder is None:
        raise ValueError(f"no tile decoder for device {device.type!r}; known: {', '.join(sorted(DECODERS))}")
    return decoder(tiles, device, workers)


# -- regions from decoded tiles --------------------------------------------------------------------


def resample(images: Any, size: tuple[int, int]) -> Any:
    """``(..., 3, h, w)`` uint8 -> ``size = (w, h)``, antialiased bilinear (as PIL's BILINEAR resize)."""
    import torch
    import torch.nn.functional as F

    w, h = size
    if tuple(images.shape[-2:]) == (h, w):
        return images
    batch = images.reshape(-1, *images.shape[-3:]).float()
    out = F.interpolate(batch, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    out = out.round_().clamp_(0, 255).to(torch.uint8)
    return out.reshape(*images.shape[:-2], h, w)


def assemble(
    tiles: Sequence[CompressedTile],
    images: Sequence[Any],
    box: tuple[int, int, int, int],
    out_size: tuple[int, int] | None = None,
) -> Any:
    """The box ``(x, y, w, h)`` of a level from its decoded tiles, resampled to ``out_size`` (w, h).

    ``tiles[i]`` decoded to ``images[i]``; tiles the box does not touch are ignored, and parts
    of the box that no tile covers (outside the level) are glass. Runs on the images' device.
    """
    import torch

    x, y, w, h = box
    device = images[0].device if len(images) else torch.device("cpu")
    out = torch.full((3, h, w), FILL, dtype=torch.uint8, device=device)
    for tile, image in zip(tiles, images, strict=True):
        x0, y0 = max(x, tile.x), max(y, tile.y)
        x1, y1 = min(x + w, tile.x + tile.width), min(y + h, tile.y + tile.height)
        if x1 > x0 and y1 > y0:
            src = image[:, y0 - tile.y : y1 - tile.y, x0 - tile.x : x1 - tile.x]
            out[:, y0 - y : y1 - y, x0 - x : x1 - x] = src
    return out if out_size is None else resample(out, out_size)


# -- regions packed as bytes: what a CPU reader hands a GPU worker ---------------------------------

PACKED_MAGIC = b"PRT1"


@dataclass(frozen=True)
class PackedRegion:
    """One region to cut on the device: its tiles as stored, the box in level pixels and the size
    it is resampled to (None: the box's own)."""

    tiles: tuple[CompressedTile, ...]
    box: tuple[int, int, int, int]
    out_size: tuple[int, int] | None = None


def pack_region(region: PackedRegion) -> bytes:
    """``region`` as bytes: ``PRT1``, a 4-byte header length, a JSON header, then the tiles' data.

    Plain data only (no pickle): a row of the training stream carries it from a reader process
    to the worker that decodes it. Every tile of a region shares one codec (one level's).
    """
    import json

    codecs = {t.codec for t in region.tiles}
    if len(codecs) > 1:
        raise ValueError("a packed region's tiles come from one level and share its codec")
    codec = next(iter(codecs)) if codecs else None
    tables = (codec.jpegtables or b"") if codec is not None else b""
    header = {
        "box": list(region.box),
        "out": list(region.out_size) if region.out_size else None,
        "codec": None
        if codec is None
        else {
            "compression": codec.compression,
            "photometric": codec.photometric,
            "samples": codec.samples,
            "predictor": codec.predictor,
            "tile_w": codec.tile_w,
            "tile_h": codec.tile_h,
            "jfif": codec.jfif,
            "extrasamples": list(codec.extrasamples),
            "tables": len(tables),
        },
        "tiles": [
            [t.level, t.index, t.col, t.row, t.x, t.y, t.width, t.height, len(t.data)] for t in region.tiles
        ],
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    size = len(head).to_bytes(4, "little")
    return b"".join([PACKED_MAGIC, size, head, tables, *(t.data for t in region.tiles)])


def unpack_region(blob: bytes) -> PackedRegion:
    """The region ``pack_region`` packed; TileDecodeError for bytes that are not one."""
    import json

    view = memoryview(blob)
    if bytes(view[:4]) != PACKED_MAGIC or len(view) < 8:
        raise TileDecodeError("not a packed region (no PRT1 header)")
    n = int.from_bytes(view[4:8], "little")
    try:
        header = json.loads(bytes(view[8 : 8 + n]))
        pos = 8 + n
        spec = header["codec"]
        codec = None
        if spec is not None:
            tables = bytes(view[pos : pos + spec["tables"]]) or None
            pos += spec["tables"]
            codec = TileCodec(
                compression=int(spec["compression"]),
                photometric=int(spec["photometric"]),
                samples=int(spec["samples"]),
                predictor=int(spec["predictor"]),
                tile_w=int(spec["tile_w"]),
                tile_h=int(spec["tile_h"]),
                jpegtables=tables,
                jfif=bool(spec["jfif"]),
                extrasamples=tuple(int(e) for e in spec["extrasamples"]),
            )
        tiles = []
        for level, index, col, row, x, y, width, height, size in header["tiles"]:
            if codec is None or pos + size > len(view):
                raise ValueError("the tiles' data is shorter than the header says")
            data = bytes(view[pos : pos + size])
            pos += size
            tiles.append(CompressedTile(level, index, col, row, x, y, width, height, codec, data))
        box = tuple(int(v) for v in header["box"])
        out = tuple(int(v) for v in header["out"]) if header["out"] else None
    except (ValueError, KeyError, TypeError) as exc:
        raise TileDecodeError(f"a packed region does not read: {exc}") from None
    return PackedRegion(tuple(tiles), box, out)  # type: ignore[arg-type]


def decode_regions(blobs: Sequence[bytes], device: Any = "cpu", workers: int = 0) -> Any:
    """Packed regions -> one ``(N, 3, h, w)`` uint8 tensor on ``device``.

    Every region's tiles are decoded in one ``decode_tiles`` call (one nvJPEG batch on ``cuda``),
    then cut and resampled there. A tile that several regions share (same codec and bytes: the
    regions of one batch overlap) is decoded once. The regions must come out the same size (one
    stream's tiles).
    """
    import torch

    regions = [unpack_region(b) for b in blobs]
    first: dict[tuple[TileCodec, bytes], int] = {}  # a stored tile -> its place in ``unique``
    unique: list[CompressedTile] = []
    which: list[int] = []  # each region's tiles, in order -> their place in ``unique``
    for tile in (t for r in regions for t in r.tiles):
        k = first.setdefault((tile.codec, tile.data), len(unique))
        if k == len(unique):
            unique.append(tile)
        which.append(k)
    decoded = decode_tiles(unique, device=device, workers=workers)
    images = [decoded[k] for k in which]
    out, k = [], 0
    for region in regions:
        n = len(region.tiles)
        if n:
            out.append(assemble(region.tiles, images[k : k + n], region.box, region.out_size))
        else:
            w, h = region.out_size or region.box[2:]
            out.append(torch.full((3, h, w), FILL, dtype=torch.uint8, device=torch.device(device)))
        k += n
    if not out:
        return torch.empty((0, 3, 0, 0), dtype=torch.uint8, device=torch.device(device))
    sizes = {tuple(o.shape) for o in out}
    if len(sizes) > 1:
        raise TileDecodeError(f"packed regions of different sizes in one batch: {sorted(sizes)}")
    return torch.stack(out)
