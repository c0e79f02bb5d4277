"""Synthetic H&E-like prostate slides with known Gleason regions and nuclei, written as SVS-like TIFFs."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from pydantic import Field

from pathray.section import Section
from pathray.wsi.annotations.geojson import write_geojson
from pathray.wsi.synth.render import render_region, render_rgbx
from pathray.wsi.synth.scene import SlideGeometry, generate_geometry

_MAX_SEEDS_PER_SET = 10_000


class SynthConfig(Section):
    """Size, pyramid and encoding of synthetic slides; the look is fixed so labels stay comparable."""

    size: int = Field(20000, ge=256, description="level-0 width and height in px")
    width: int | None = Field(None, ge=256, description="level-0 width; default: size")
    height: int | None = Field(None, ge=256, description="level-0 height; default: size")
    tile: int = Field(256, ge=16, multiple_of=16, description="TIFF tile edge in px")
    mpp: float = Field(0.25, gt=0, description="level-0 microns per pixel (0.25: 40x)")
    level_factor: int = Field(2, ge=2, description="downsample between pyramid levels")
    jpeg_quality: int = Field(85, ge=1, le=100)
    workers: int = Field(2, ge=1, description="threads that JPEG-encode tiles")


@dataclass(frozen=True)
class SyntheticSlide:
    """A written slide and its ground truth; ``label`` is the primary pattern ("Benign" if no tumour)."""

    slide_id: str
    path: Path
    annotations_path: Path
    label: str
    width: int
    height: int
    mpp: float


def _pyramid(width: int, height: int, factor: int) -> list[tuple[int, int, int]]:
    """(width, height, downsample) per level, down to a short side of ~1024 px and at least 3 levels."""
    levels, d = [(width, height, 1)], 1
    while min(levels[-1][:2]) > 1024 or len(levels) < 3:
        d *= factor
        if min(width, height) // d < 1:
            break
        levels.append((width // d, height // d, d))
    return levels


def _tiles(geometry: SlideGeometry, width: int, height: int, d: int, tile: int) -> Iterator[np.ndarray]:
    """Tiles of one level in row-major order; tile rows are rendered one ahead on a second thread."""
    nx, ny = math.ceil(width / tile), math.ceil(height / tile)

    def row(r: int) -> np.ndarray:
        return render_rgbx(geometry, 0, r * tile * d, nx * tile, tile, d, geometry.seed)

    with ThreadPoolExecutor(1) as pool:
        pending = deque(pool.submit(row, r) for r in range(min(2, ny)))
        for r in range(ny):
            strip = pending.popleft().result()
            if r + 2 < ny:
                pending.append(pool.submit(row, r + 2))
            for c in range(nx):
                yield strip[:, c * tile : (c + 1) * tile, :3]


def write_synthetic_slide(
    path: Path, seed: int, config: SynthConfig | None = None, slide_id: str | None = None
) -> SyntheticSlide:
    """Write slide ``seed`` as an SVS-like pyramidal TIFF plus its QuPath GeoJSON next to it.

    The layout (level 0, a stripped thumbnail at IFD 1, then the other levels as top-level
    tiled IFDs, Aperio ImageDescription with MPP) is the one both OpenSlide and tiffslide read
    as a pyramid. Tiles are rendered and encoded as a stream; same seed and config, same bytes.
    """
    config = config or SynthConfig()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = config.width or config.size, config.height or config.size
    geometry = generate_geometry(seed, width, height, config.mpp)
    levels = _pyramid(width, height, config.level_factor)
    t, q, mpp = config.tile, config.jpeg_quality, config.mpp
    meta = f"|AppMag = {10 / mpp:g}|MPP = {mpp:g}"
    header = "Aperio Image Library v12.0.0\r\n"
    common = {"photometric": "rgb", "compression": "jpeg", "compressionargs": {"level": q}, "metadata": None}
    with tifffile.TiffWriter(path, bigtiff=width * height * 3 >= 2**32) as tif:
        for i, (w, h, d) in enumerate(levels):
            if i == 1:
                td = max(width, height) / 768
                tw, th = int(width / td), int(height / td)
                thumb = render_region(geometry, 0, 0, tw, th, td, geometry.seed)
                desc = f"{header}{width}x{height} -> {tw}x{th} - {meta}"
                tif.write(thumb, description=desc, rowsperstrip=16, **common)
            desc = (
                f"{header}{width}x{height} [0,0 {width}x{height}] ({t}x{t}) JPEG/RGB Q={q}{meta}"
                if i == 0
                else f"{header}{width}x{height} -> {w}x{h} - ({t}x{t}) JPEG/RGB Q={q}{meta}"
            )
            tif.write(
                _tiles(geometry, w, h, d, t),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(t, t),
                description=desc,
                resolution=(1e4 / (mpp * d), 1e4 / (mpp * d)),
                resolutionunit="CENTIMETER",
                maxworkers=config.workers,
                buffersize=math.ceil(w / t) * t * t * 3,  # encode a tile row at a time: bounded memory
                **common,
            )
    annotations_path = path.with_suffix(".geojson")
    write_geojson(annotations_path, geometry.annotations())
    return SyntheticSlide(slide_id or path.stem, path, annotations_path, geometry.label, width, height, mpp)


def write_synthetic_slides(
    out_dir: Path, n: int = 8, seed: int = 0, config: SynthConfig | None = None
) -> list[SyntheticSlide]:
    """Write ``slide_000.svs`` ... with GeoJSON; slide ``i`` uses seed ``seed * 10000 + i``.

    Consecutive slide seeds cycle through the primary patterns, so any 8 slides hold two
    Benign-only slides and two of each primary tumour pattern.
    """
    if not 0 < n <= _MAX_SEEDS_PER_SET:
        raise ValueError(f"n must be in 1..{_MAX_SEEDS_PER_SET}, got {n}")
    out_dir = Path(out_dir)
    return [
        write_synthetic_slide(out_dir / f"slide_{i:03d}.svs", seed * _MAX_SEEDS_PER_SET + i, config)
        for i in range(n)
    ]
