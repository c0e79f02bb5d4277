"""Rasterise a synthetic slide's vector geometry at any downsample: tissue codes -> H&E colours + noise."""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from pathray.wsi.synth.scene import SlideGeometry

from pathray.wsi.synth.materials import (
    EPI_BENIGN,
    EPI_TUMOR,
    GLASS,
    NUC_EPI,
    NUC_STROMA,
    NUC_TUMOR,
    NUCLEUS_CODES,
    SHEET,
    STROMA,
)

# Mean colour and noise amplitude per code: pink eosin for stroma/cytoplasm, purple haematoxylin
# for nuclei, near-white glass and lumens with only slight noise.
_BASE = np.array(
    [
        (240, 240, 240),  # glass
        (230, 150, 190),  # stroma
        (236, 196, 218),  # benign epithelium: pale cytoplasm
        (206, 146, 196),  # tumour epithelium: amphophilic
        (246, 243, 247),  # lumen
        (186, 120, 178),  # G5 sheet cytoplasm
        (92, 48, 128),  # stromal nucleus
        (104, 62, 142),  # epithelial nucleus
        (78, 38, 116),  # tumour nucleus
    ],
    np.float64,
)
_AMP = np.array([1.5, 9.0, 6.0, 8.0, 2.0, 9.0, 10.0, 10.0, 10.0])
_EOSIN = (STROMA, EPI_BENIGN, EPI_TUMOR, SHEET)
_HAEMATOXYLIN = (NUC_STROMA, NUC_EPI, NUC_TUMOR)
_LEVELS = 64  # noise levels per code in the colour table
_CELL = 256  # noise is cut per cell of the output grid (a tile), each at its own seeded offset
_BANK = 1024
_MARGIN = 2  # px drawn around every window and cut off again


@lru_cache(maxsize=8)
def _noise_bank(seed: int) -> np.ndarray:
    """A smooth noise texture, quantised to ``_LEVELS`` steps; cells are cut from it at random offsets."""
    from scipy.ndimage import gaussian_filter

    field = np.random.default_rng([seed, 0x401CE]).standard_normal((_BANK, _BANK))
    field = gaussian_filter(field, sigma=1.0, mode="wrap")
    field /= field.std()
    bank = np.clip(np.rint(field * 10 + _LEVELS // 2), 0, _LEVELS - 1).astype(np.uint8)
    bank.flags.writeable = False
    return bank


@lru_cache(maxsize=64)
def _colour_table(stain: tuple[float, ...], grain: float) -> np.ndarray:
    """RGBX per (code, noise level) as uint32, so one gather colours a whole strip.

    ``grain`` scales the noise: a coarse pixel averages many fine ones, so it is less noisy.
    """
    base = _BASE.copy()
    shift = np.asarray(stain).reshape(2, 3)
    base[list(_EOSIN)] += shift[0]
    base[list(_HAEMATOXYLIN)] += shift[1]
    t = (np.arange(_LEVELS) - _LEVELS // 2) / 10.0
    direction = np.array([0.85, 1.0, 0.8])
    rgb = base[:, None, :] + grain * _AMP[:, None, None] * t[None, :, None] * direction
    table = np.zeros((len(_BASE) * _LEVELS, 4), np.uint8)
    table[:, :3] = np.clip(np.rint(rgb.reshape(-1, 3)), 0, 255)
    return table.view(np.uint32).ravel()


def rasterize_codes(
    geometry: SlideGeometry, x: float, y: float, w: int, h: int, downsample: float
) -> np.ndarray:
    """Tissue codes of the ``w`` x ``h`` output pixels whose level-0 origin is (``x``, ``y``).

    Every level is drawn from the same vector geometry at its own resolution, so no level is a
    resampled copy of another and nothing of slide size is ever held in memory.
    """
    # PIL rounds negative fractional coordinates towards zero and clamps spans into the image;
    # integer coordinates in an image with a margin make every window render the same pixels.
    d, m = float(downsample), _MARGIN
    img = Image.new("L", (w + 2 * m, h + 2 * m), GLASS)
    draw = ImageDraw.Draw(img)
    x1, y1 = x + w * d, y + h * d
    b = geometry.shape_bounds
    hits = np.flatnonzero((b[:, 0] < x1) & (b[:, 2] > x) & (b[:, 1] < y1) & (b[:, 3] > y))
    for i in hits:
        pts = np.floor((geometry.shape_polygons[i] - (x, y)) / d) + m  # vertex -> pixel it falls in
        draw.polygon(pts.ravel().tolist(), fill=int(geometry.shape_codes[i]))

    xy, radius = geometry.nuclei_xy, geometry.nuclei_radius
    reach = float(radius.max()) if len(radius) else 0.0
    i0, i1 = np.searchsorted(xy[:, 1], [y - reach, y1 + reach])
    index = np.arange(i0, i1)
    index = index[(xy[index, 0] > x - reach) & (xy[index, 0] < x1 + reach)]
    centre = (xy[index] - (x, y)) / d
    r = radius[index] / d
    code = NUCLEUS_CODES[geometry.nuclei_class[index]]
    big = r.min(axis=1) >= 0.75
    lo = np.ceil(centre[big] - r[big] - 0.5)  # first and last pixel whose centre is inside
    hi = np.maximum(np.floor(centre[big] + r[big] - 0.5), lo)
    for box, c in zip(np.hstack([lo, hi]).tolist(), code[big].tolist(), strict=True):
        draw.ellipse([v + m for v in box], fill=c)
    codes = np.array(img)[m : m + h, m : m + w]

    # Nuclei smaller than a pixel: paint a pixel with probability equal to the covered area, so
    # coarse levels keep the mean colour of fine ones.
    small = ~big
    keep = _hash_unit(index[small]) < np.pi * r[small, 0] * r[small, 1]
    px = np.floor(centre[small][keep]).astype(np.int64)
    inside = (px[:, 0] >= 0) & (px[:, 0] < w) & (px[:, 1] >= 0) & (px[:, 1] < h)
    codes[px[inside, 1], px[inside, 0]] = code[small][keep][inside]
    return codes


def _hash_unit(index: np.ndarray) -> np.ndarray:
    """A fixed pseudo-random number in [0, 1) per nucleus index, the same at every level."""
    v = (index.astype(np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
    v ^= v >> np.uint64(29)
    return (v % np.uint64(1 << 24)).astype(np.float64) / float(1 << 24)


def noise_levels(seed: int, x0: int, y0: int, w: int, h: int, level_key: int) -> np.ndarray:
    """Noise level per output pixel; pixel (``x0``, ``y0``) is in output-grid coordinates.

    Each 256-px cell of the output grid takes the bank at an offset drawn from a Generator
    seeded by (seed, level, cell row), so a region renders the same whatever window asks for it.
    """
    bank = _noise_bank(seed)
    out = np.empty((h, w), np.uint8)
    c1 = (x0 + w - 1) // _CELL
    for row in range(y0 // _CELL, (y0 + h - 1) // _CELL + 1):
        ncols = max(c1 + 1, 1)
        offsets = np.random.default_rng([seed, level_key, row & 0xFFFFFFFF]).integers(
            0, _BANK - _CELL, size=(ncols, 2)
        )
        ys, ye = max(y0, row * _CELL), min(y0 + h, (row + 1) * _CELL)
        for col in range(x0 // _CELL, c1 + 1):
            xs, xe = max(x0, col * _CELL), min(x0 + w, (col + 1) * _CELL)
            oy, ox = offsets[col % ncols] - (row * _CELL, col * _CELL)
            out[ys - y0 : ye - y0, xs - x0 : xe - x0] = bank[oy + ys : oy + ye, ox + xs : ox + xe]
    return out


def render_rgbx(
    geometry: SlideGeometry, x: float, y: float, w: int, h: int, downsample: float, seed: int
) -> np.ndarray:
    """Like :func:`render_region` but (h, w, 4) with a padding channel: one gather, no copy."""
    codes = rasterize_codes(geometry, x, y, w, h, downsample)
    level_key = int(round(downsample * 64))
    noise = noise_levels(seed, int(x // downsample), int(y // downsample), w, h, level_key)
    grain = round(max(0.3, float(downsample) ** -0.5), 2)
    table = _colour_table(tuple(np.asarray(geometry.stain, np.float64).ravel().tolist()), grain)
    idx = (codes.astype(np.uint16) << 6) | noise
    return table[idx].view(np.uint8).reshape(h, w, 4)


def render_region(
    geometry: SlideGeometry,
    x: float,
    y: float,
    w: int,
    h: int,
    downsample: float = 1.0,
    seed: int | None = None,
) -> np.ndarray:
    """RGB pixels (h, w, 3) of the slide at ``downsample``, top-left at level-0 (``x``, ``y``).

    The same call the slide writer makes per tile row, so tests can check pixels against the
    geometry without a file. ``seed`` defaults to the geometry's own seed.
    """
    seed = geometry.seed if seed is None else seed
    return np.ascontiguousarray(render_rgbx(geometry, x, y, w, h, downsample, seed)[..., :3])
