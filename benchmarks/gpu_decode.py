"""JPEG tiles decoded by nvJPEG vs the CPU: the streams pathray's compressed-tile path hands a decoder.

    python benchmarks/gpu_decode.py                                # synthetic slides; no CUDA: CPU half only
    python benchmarks/gpu_decode.py --slides /data/svs --tiles 4096 --batch 256 --workers 8

Sources: a pyramidal JPEG TIFF written by tifffile (complete YCbCr 4:2:0 tiles); an Aperio-style
one (RGB components numbered 0, 1, 2, shared JPEGTables, no JFIF or Adobe marker: the tiles that
need the Adobe APP14 marker); and each .svs/.tif/.tiff in --slides with a JPEG level. Tiles are
read by byte range and made standalone by ``pathray.wsi.tiledecode`` (as the slide reader does),
then decoded in batches of --batch by ``decode_tiles`` on ``cpu`` (libjpeg-turbo via imagecodecs,
else PIL; one process, or --workers processes) and on ``cuda`` (nvJPEG through
torchvision.io.decode_jpeg). Prints each source's max/mean abs difference (cuda vs cpu) and
tiles/s, then one line:

    gpu_decode tiles_per_s cpu=X cuda=Y ratio=Y/X max_abs_diff=Z mean_abs_diff=M tiles=N

Ray-free, and pathray's storage layer is not imported: a GPU box needs torch, torchvision,
tifffile and numpy (imagecodecs or Pillow for the CPU decoder). Takes well under 2 minutes.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

try:
    import pathray.wsi.tiledecode  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`: use its src/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pathray.wsi.tiledecode import CompressedTile, TileLayout, decode_tiles, read_tiles  # noqa: E402

TILE = 256


def tissue_like(size: int, seed: int) -> np.ndarray:
    """An H&E-coloured smooth field with speckle: compresses like tissue, not like noise."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(seed)
    low = torch.from_numpy(rng.random((1, 2, size // 48 + 2, size // 48 + 2), dtype=np.float32))
    field = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)[0].clamp(0, 1).numpy()
    pink, purple, white = np.array([232, 170, 205.0]), np.array([120, 70, 160.0]), np.array([245, 243, 246.0])
    mix = field[0][..., None]
    rgb = mix * pink + (1 - mix) * purple
    glass = (field[1] > 0.7)[..., None]
    rgb = np.where(glass, white, rgb) + rng.normal(0, 9, (size, size, 1))
    return rgb.clip(0, 255).astype(np.uint8)


def write_generic_jpeg_tiff(path: Path, image: np.ndarray) -> None:
    """A tiled pyramid (level 0 + one SubIFD level) with tifffile's JPEG, or PIL's without imagecodecs."""
    import tifffile

    try:
        import imagecodecs  # noqa: F401 - tifffile encodes JPEG with it
    except ImportError:
        encode: dict[str, Any] | None = None
    else:
        encode = {}
    with tifffile.TiffWriter(path) as tif:
        for k, level in enumerate((image, image[::2, ::2])):
            extra: dict[str, Any] = {"subifds": 1} if k == 0 else {"subfiletype": 1}
            if encode is not None:
                tif.write(level, tile=(TILE, TILE), photometric="rgb", compression="jpeg", **extra)
            else:  # complete JFIF tiles from PIL, written as they are
                extra["compression"] = "jpeg"
                h, w = level.shape[:2]
                data = (
                    _pil_jpeg(_tile(level, r, c)) for r in range(-(-h // TILE)) for c in range(-(-w // TILE))
                )
                shape = level.shape
                tif.write(data, shape=shape, dtype=np.uint8, tile=(TILE, TILE), photometric="rgb", **extra)


def _tile(image: np.ndarray, r: int, c: int) -> np.ndarray:
    out = np.zeros((TILE, TILE, 3), np.uint8)
    part = image[r * TILE : (r + 1) * TILE, c * TILE : (c + 1) * TILE]
    out[: part.shape[0], : part.shape[1]] = part
    return out


def _pil_jpeg(tile: np.ndarray, **kwargs: Any) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(tile).save(buf, format="JPEG", quality=85, **kwargs)
    return buf.getvalue()


def _segments(jpeg: bytes) -> list[tuple[int, bytes]]:
    """(marker, whole segment) from after SOI up to and including SOS; the scan data follows."""
    out, i = [], 2
    while True:
        marker, length = jpeg[i + 1], int.from_bytes(jpeg[i + 2 : i + 4], "big")
        out.append((marker, jpeg[i : i + 2 + length]))
        i += 2 + length
        if marker == 0xDA:
            return out + [(0, jpeg[i:])]


def aperio_style(tile: np.ndarray) -> tuple[bytes, bytes]:
    """(tables, abbreviated tile) as Aperio writes them: RGB components 0, 1, 2, no APP0/APP14."""
    ids = {82: 0, 71: 1, 66: 2}  # PIL's 'R', 'G', 'B' component ids -> Aperio's
    tables, body = b"", b""
    for marker, seg in _segments(_pil_jpeg(tile, keep_rgb=True, subsampling=0)):
        if marker in (0xDB, 0xC4):
            tables += seg
        elif marker == 0xC0:  # SOF0: 8 header bytes, then (id, sampling, table) per component
            seg = bytearray(seg)
            for k in range(seg[9]):
                seg[10 + 3 * k] = ids[seg[10 + 3 * k]]
            body += bytes(seg)
        elif marker == 0xDA:  # SOS: 5 header bytes, then (id, tables) per component
            seg = bytearray(seg)
            for k in range(seg[4]):
                seg[5 + 2 * k] = ids[seg[5 + 2 * k]]
            body += bytes(seg)
        elif marker == 0:
            body += seg
    return b"\xff\xd8" + tables + b"\xff\xd9", b"\xff\xd8" + body


def write_aperio_style_tiff(path: Path, image: np.ndarray) -> None:
    import tifffile

    h, w = image.shape[:2]
    pairs = [aperio_style(_tile(image, r, c)) for r in range(-(-h // TILE)) for c in range(-(-w // TILE))]
    tables = {t for t, _ in pairs}
    if len(tables) != 1:
        raise ValueError("the encoder gave tiles different tables; they cannot share JPEGTables")
    rgb_jpeg = {"compression": "jpeg", "subsampling": (1, 1), "compressionargs": {"outcolorspace": 2}}
    with tifffile.TiffWriter(path) as tif:  # Photometric RGB, JPEGTables, abbreviated tiles: as Aperio
        tiles = iter([t for _, t in pairs])
        shape, tile = image.shape, (TILE, TILE)
        tif.write(
            tiles,
            shape=shape,
            dtype=np.uint8,
            tile=tile,
            photometric="rgb",
            jpegtables=tables.pop(),
            **rgb_jpeg,
        )


def jpeg_tiles(path: Path, limit: int) -> list[CompressedTile]:
    """Standalone JPEG tiles of ``path``'s JPEG levels (level 0 first), read by byte range."""
    import tifffile

    tiles: list[CompressedTile] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        with tifffile.TiffFile(path) as tif:
            for level, lvl in enumerate(tif.series[0].levels):
                layout = TileLayout.from_page(lvl.keyframe, level)
                if layout is None or layout.codec.name != "jpeg" or len(tiles) >= limit:
                    continue
                wanted = list(range(min(len(layout.offsets), limit - len(tiles))))
                tiles += read_tiles(layout, wanted, lambda o, n: list(map(os.pread, [fd] * len(o), n, o)))
    finally:
        os.close(fd)
    return [t for t in tiles if t.data]


def timed(fn: Any, tiles: list[CompressedTile], batch: int, total: int, sync: Any) -> tuple[float, list[Any]]:
    """Tiles/s decoding ``total`` tiles (the list repeated) in batches; the first pass's outputs."""
    first = [im for k in range(0, len(tiles), batch) for im in fn(tiles[k : k + batch])]
    sync()
    start, done = time.perf_counter(), 0
    while done < total:
        for k in range(0, len(tiles), batch):
            fn(tiles[k : k + batch])
            done += len(tiles[k : k + batch])
            if done >= total:
                break
    sync()
    return done / (time.perf_counter() - start), first


MIN_TILES = 16  # fewer tiles than this time nothing useful (one 64 px tile, 1024 times)


def collect_sources(
    workdir: Path, size: int, limit: int, slides: Path | None
) -> dict[str, tuple[list[CompressedTile], np.ndarray | None]]:
    """Up to ``limit`` standalone JPEG tiles per source, and the pixels they encode (synthetic ones)."""
    image = tissue_like(size, seed=0)
    sources: dict[str, tuple[list[CompressedTile], np.ndarray | None]] = {}
    write_generic_jpeg_tiff(workdir / "generic.tiff", image)
    sources["synthetic generic JPEG TIFF (YCbCr 4:2:0)"] = (
        jpeg_tiles(workdir / "generic.tiff", limit),
        image,
    )
    try:
        write_aperio_style_tiff(workdir / "aperio.tiff", image)
    except (TypeError, ValueError, KeyError) as exc:  # an old Pillow without keep_rgb
        print(f"aperio-style source skipped: {type(exc).__name__}: {exc}")
    else:
        sources["synthetic Aperio-style (RGB, JPEGTables)"] = (
            jpeg_tiles(workdir / "aperio.tiff", limit),
            image,
        )
    for path in sorted(slides.rglob("*") if slides else []):
        if path.suffix.lower() not in {".svs", ".tif", ".tiff"}:
            continue
        try:
            tiles = jpeg_tiles(path, limit)
        except Exception as exc:  # noqa: BLE001 - a broken or odd file is reported, the rest go on
            print(f"{path.name}: skipped ({type(exc).__name__}: {exc})")
            continue
        if len(tiles) < MIN_TILES:
            print(f"{path.name}: skipped ({len(tiles)} JPEG tiles; at least {MIN_TILES} are timed)")
            continue
        sources[path.name] = (tiles, None)
    return sources


def vs_source(tiles: list[CompressedTile], images: list[Any], source: np.ndarray) -> float:
    """Mean abs difference of decoded level-0 tiles from the pixels encoded: colours right or wrong."""
    diffs = []
    for tile, image in zip(tiles, images, strict=True):
        if tile.level == 0:
            want = source[tile.y : tile.y + tile.height, tile.x : tile.x + tile.width]
            got = image.permute(1, 2, 0).cpu().numpy()[: tile.height, : tile.width]
            diffs.append(np.abs(got.astype(np.int16) - want).mean())
    return float(np.mean(diffs))


def compare(gpu_out: list[Any], cpu_out: list[Any]) -> tuple[int, float, int]:
    """Max abs difference, summed abs difference and values compared, GPU tiles against CPU tiles."""
    diffs = [(g.cpu().short() - c.short()).abs() for g, c in zip(gpu_out, cpu_out, strict=True)]
    return max(int(d.max()) for d in diffs), sum(float(d.sum()) for d in diffs), sum(d.numel() for d in diffs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slides", type=Path, help="a folder of .svs/.tif(f) slides to take JPEG tiles from")
    parser.add_argument("--size", type=int, default=2048, help="synthetic slide edge in px (256 px tiles)")
    parser.add_argument("--tiles", type=int, default=1024, help="tiles decoded per source and decoder")
    parser.add_argument("--batch", type=int, default=128, help="tiles per decode call")
    parser.add_argument("--workers", type=int, default=0, help="CPU decoder processes (0: this process)")
    args = parser.parse_args()

    import torch

    cuda, why = torch.cuda.is_available(), "no CUDA device"
    if cuda:
        try:
            import torchvision.io  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - a torchvision that does not match the torch
            cuda, why = False, f"torchvision.io does not load ({type(exc).__name__})"
    with tempfile.TemporaryDirectory(prefix="gpu-decode-") as tmp:
        sources = collect_sources(Path(tmp), args.size, args.tiles, args.slides)
    gpu_name = f"nvJPEG on {torch.cuda.get_device_name()}" if cuda else f"skipped: {why}"
    print(f"decoders: cpu ({_cpu_decoder()}, {args.workers or 1} process(es)), cuda ({gpu_name})")

    def cpu_fn(ts: list[CompressedTile]) -> list[Any]:
        return decode_tiles(ts, device="cpu", workers=args.workers)

    def gpu_fn(ts: list[CompressedTile]) -> list[Any]:
        return decode_tiles(ts, device="cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    n, cpu_s, cuda_s, worst, diff_sum, diff_px = 0, 0.0, 0.0, 0, 0.0, 0
    for name, (tiles, source) in sources.items():
        total = max(args.tiles, len(tiles))
        cpu_rate, cpu_out = timed(cpu_fn, tiles, args.batch, total, lambda: None)
        n, cpu_s = n + total, cpu_s + total / cpu_rate
        line = f"{name}: {len(tiles)} tiles {tiles[0].codec.tile_w}x{tiles[0].codec.tile_h}"
        line += f"  cpu {cpu_rate:6.0f}/s"
        if source is not None:
            line += f" (vs encoded pixels: mean {vs_source(tiles, cpu_out, source):.2f})"
        if cuda:
            gpu_rate, gpu_out = timed(gpu_fn, tiles, args.batch, total, sync)
            top, total_diff, px = compare(gpu_out, cpu_out)
            cuda_s, worst, diff_sum, diff_px = (
                cuda_s + total / gpu_rate,
                max(worst, top),
                diff_sum + total_diff,
                diff_px + px,
            )
            line += f"  cuda {gpu_rate:6.0f}/s  x{gpu_rate / cpu_rate:.1f}"
            line += f"  max_abs_diff {top}  mean {total_diff / px:.3f}"
        print(line, flush=True)
    print(f"ray imported: {'YES' if 'ray' in sys.modules else 'no'}")
    cpu = n / cpu_s
    if cuda:
        gpu = n / cuda_s
        print(
            f"gpu_decode tiles_per_s cpu={cpu:.0f} cuda={gpu:.0f} ratio={gpu / cpu:.2f} "
            f"max_abs_diff={worst} mean_abs_diff={diff_sum / diff_px:.3f} tiles={n}"
        )
    else:
        print(f"gpu_decode tiles_per_s cpu={cpu:.0f} cuda=skipped ratio=n/a max_abs_diff=n/a tiles={n}")


def _cpu_decoder() -> str:
    try:
        import imagecodecs

        return f"imagecodecs {imagecodecs.__version__} libjpeg-turbo"
    except ImportError:
        import PIL

        return f"Pillow {PIL.__version__}"


if __name__ == "__main__":
    main()
