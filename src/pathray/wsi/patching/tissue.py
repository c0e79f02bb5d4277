"""Tissue masks from a thumbnail: HSV saturation, Otsu, morphology; cached per slide version."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import Field
from scipy import ndimage

from pathray.lru import LruCache
from pathray.section import Section
from pathray.wsi.backends.slide import Slide


class TissueConfig(Section):
    """How tissue is told from glass."""

    mpp: float = Field(8.0, description="mask resolution in µm/px (8-16 is enough to find tissue)")
    max_size: int = Field(2048, description="long side of the mask when the slide has no mpp")
    min_saturation: float = Field(0.05, description="Otsu threshold floor: glass is never tissue")
    max_brightness: float = Field(0.97, description="pixels brighter than this (0-1) are glass")
    closing_um: float = Field(24.0, description="gaps narrower than this inside tissue are closed")
    opening_um: float = Field(16.0, description="specks thinner than this are removed")
    min_area_um2: float = Field(20000.0, description="tissue pieces smaller than this are dropped")


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: maximises the between-class variance."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.5
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = total - w0
    m0 = np.cumsum(hist * centers)
    mt = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mt * w0 / total - m0) ** 2 / (w0 * w1 / total)
    between[~np.isfinite(between)] = 0
    return float(centers[int(np.argmax(between))])


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1]."""
    arr = rgb.astype(np.float32) / 255.0
    mx = arr.max(axis=2)
    mn = arr.min(axis=2)
    with np.errstate(divide="ignore", invalid="ignore"):
        sat = np.where(mx > 0, (mx - mn) / mx, 0.0)
    return sat.astype(np.float32)


def segment_tissue(rgb: np.ndarray, mpp: float | None, config: TissueConfig) -> np.ndarray:
    """Boolean tissue mask of a thumbnail whose pixels are ``mpp`` µm wide (None: unknown)."""
    sat = saturation(rgb)
    brightness = rgb.astype(np.float32).mean(axis=2) / 255.0
    threshold = max(otsu_threshold(sat), config.min_saturation)
    mask = (sat > threshold) & (brightness < config.max_brightness)
    px_um = mpp if mpp is not None else 8.0  # unknown scale: assume a typical mask resolution
    close_r = max(1, round(config.closing_um / px_um / 2))
    open_r = max(0, round(config.opening_um / px_um / 2))
    mask = ndimage.binary_closing(mask, structure=_disk(close_r), border_value=0)
    if open_r:
        mask = ndimage.binary_opening(mask, structure=_disk(open_r))
    mask = ndimage.binary_fill_holes(mask)
    min_px = config.min_area_um2 / (px_um * px_um)
    labels, n = ndimage.label(mask)
    if n:
        sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
        keep = np.concatenate([[False], sizes >= min_px])
        mask = keep[labels]
    return mask


def _disk(radius: int) -> np.ndarray:
    y, x = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    return (x * x + y * y) <= radius * radius


@dataclass
class TissueMask:
    """A boolean tissue mask that knows its scale relative to the slide.

    Attributes:
        mask: ``(h, w)`` booleans.
        downsample: level-0 pixels per mask pixel.
        mpp: µm per mask pixel, or None when the slide has no mpp.
    """

    mask: np.ndarray
    downsample: float
    mpp: float | None

    def __post_init__(self) -> None:
        # Summed-area table: any rectangle's tissue count in O(1).
        self._sat = np.pad(self.mask.astype(np.int32).cumsum(0).cumsum(1), ((1, 0), (1, 0)))

    @property
    def shape(self) -> tuple[int, int]:
        return self.mask.shape  # type: ignore[return-value]

    @property
    def tissue_fraction_total(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def fraction(self, x: float, y: float, w: float, h: float) -> float:
        """Fraction of the level-0 rectangle ``(x, y, w, h)`` that is tissue (outside the slide: glass).

        Mask pixels are weighted by how much of them the rectangle covers, so small
        rectangles get meaningful fractions too.
        """
        if w <= 0 or h <= 0:
            return 0.0
        d = self.downsample
        mx0, my0, mx1, my1 = x / d, y / d, (x + w) / d, (y + h) / d
        mh, mw = self.mask.shape
        cx0, cy0 = max(0.0, mx0), max(0.0, my0)
        cx1, cy1 = min(float(mw), mx1), min(float(mh), my1)
        if cx1 <= cx0 or cy1 <= cy0:
            return 0.0
        area = (mx1 - mx0) * (my1 - my0)
        return self._covered(cx0, cy0, cx1, cy1) / area

    def fractions(self, xs: np.ndarray, ys: np.ndarray, w: float, h: float) -> np.ndarray:
        """``fraction`` of many ``w`` x ``h`` rectangles at once (the same values, in numpy).

        The tissue grid asks this for every grid position of a slide: thousands per slide.
        """
        xs, ys = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
        out = np.zeros(xs.shape, np.float64)
        if w <= 0 or h <= 0 or not xs.size:
            return out
        d = self.downsample
        mx0, my0, mx1, my1 = xs / d, ys / d, (xs + w) / d, (ys + h) / d
        mh, mw = self.mask.shape
        cx0, cy0 = np.maximum(0.0, mx0), np.maximum(0.0, my0)
        cx1, cy1 = np.minimum(float(mw), mx1), np.minimum(float(mh), my1)
        area = (mx1 - mx0) * (my1 - my0)
        ix0, iy0 = np.floor(cx0).astype(np.int64), np.floor(cy0).astype(np.int64)
        ix1, iy1 = np.ceil(cx1).astype(np.int64), np.ceil(cy1).astype(np.int64)
        inside = (cx1 > cx0) & (cy1 > cy0)
        small = inside & ((ix1 - ix0 <= 2) | (iy1 - iy0 <= 2))
        for i in np.flatnonzero(small):  # boxes of a few mask pixels: the scalar path
            out[i] = self._covered(cx0[i], cy0[i], cx1[i], cy1[i]) / area[i]
        big = np.flatnonzero(inside & ~small)
        if big.size:
            out[big] = self._covered_many(cx0[big], cy0[big], cx1[big], cy1[big]) / area[big]
        return out

    def _covered_many(self, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray) -> np.ndarray:
        """``_covered`` of boxes at least 3 mask pixels wide and high, term for term."""
        ix0, iy0 = np.floor(x0).astype(np.int64), np.floor(y0).astype(np.int64)
        ix1, iy1 = np.ceil(x1).astype(np.int64), np.ceil(y1).astype(np.int64)
        s, m = self._sat, self.mask
        total = (s[iy1, ix1] - s[iy0, ix1] - s[iy1, ix0] + s[iy0, ix0]).astype(np.float64)
        fx0, fy0, fx1, fy1 = x0 - ix0, y0 - iy0, ix1 - x1, iy1 - y1
        cols = np.pad(m.astype(np.int32).cumsum(0), ((1, 0), (0, 0)))  # cols[y, x]: m[:y, x].sum()
        rows = np.pad(m.astype(np.int32).cumsum(1), ((0, 0), (1, 0)))  # rows[y, x]: m[y, :x].sum()
        left = (cols[iy1, ix0] - cols[iy0, ix0]).astype(np.float64)
        right = (cols[iy1, ix1 - 1] - cols[iy0, ix1 - 1]).astype(np.float64)
        top = (rows[iy0, ix1] - rows[iy0, ix0]).astype(np.float64)
        bottom = (rows[iy1 - 1, ix1] - rows[iy1 - 1, ix0]).astype(np.float64)
        total -= fx0 * left + fx1 * right
        total -= fy0 * top + fy1 * bottom
        total += fx0 * fy0 * m[iy0, ix0] + fx1 * fy0 * m[iy0, ix1 - 1]
        total += fx0 * fy1 * m[iy1 - 1, ix0] + fx1 * fy1 * m[iy1 - 1, ix1 - 1]
        return total

    def _covered(self, x0: float, y0: float, x1: float, y1: float) -> float:
        """Tissue area (in mask pixels) inside a fractional box, exact for pixel-aligned edges."""
        ix0, iy0, ix1, iy1 = int(np.floor(x0)), int(np.floor(y0)), int(np.ceil(x1)), int(np.ceil(y1))
        if ix1 - ix0 <= 2 or iy1 - iy0 <= 2:
            sub = self.mask[iy0:iy1, ix0:ix1].astype(np.float64)
            wx = np.minimum(np.arange(ix0, ix1) + 1, x1) - np.maximum(np.arange(ix0, ix1), x0)
            wy = np.minimum(np.arange(iy0, iy1) + 1, y1) - np.maximum(np.arange(iy0, iy1), y0)
            return float((sub * wy[:, None] * wx[None, :]).sum())
        # Interior by the summed-area table; the fractional border strips are small.
        s = self._sat
        total = float(s[iy1, ix1] - s[iy0, ix1] - s[iy1, ix0] + s[iy0, ix0])
        fx0, fy0 = x0 - ix0, y0 - iy0
        fx1, fy1 = ix1 - x1, iy1 - y1
        if fx0 or fy0 or fx1 or fy1:
            m = self.mask
            total -= fx0 * float(m[iy0:iy1, ix0].sum()) + fx1 * float(m[iy0:iy1, ix1 - 1].sum())
            total -= fy0 * float(m[iy0, ix0:ix1].sum()) + fy1 * float(m[iy1 - 1, ix0:ix1].sum())
            # corners were subtracted twice
            total += fx0 * fy0 * m[iy0, ix0] + fx1 * fy0 * m[iy0, ix1 - 1]
            total += fx0 * fy1 * m[iy1 - 1, ix0] + fx1 * fy1 * m[iy1 - 1, ix1 - 1]
        return total

    def to_image(self) -> Image.Image:
        return Image.fromarray((self.mask * 255).astype(np.uint8))


def compute_tissue_mask(slide: Slide, config: TissueConfig | None = None) -> TissueMask:
    """Segment tissue on a thumbnail at ``config.mpp`` (or ``max_size`` when mpp is unknown)."""
    config = config or TissueConfig()
    w0, h0 = slide.dimensions
    if slide.mpp is not None:
        thumb = slide.thumbnail(mpp=max(config.mpp, slide.mpp))
    else:
        thumb = slide.thumbnail(max_size=min(config.max_size, max(w0, h0)))
    downsample = w0 / thumb.shape[1]
    mpp = slide.mpp * downsample if slide.mpp is not None else None
    return TissueMask(segment_tissue(thumb, mpp, config), downsample, mpp)


class TissueMaskCache:
    """Masks by (URI, version, config), in memory and on disk: every process reuses one computation.

    The version is the object's size and ETag/mtime, so a changed slide gets a new mask. The
    disk copy (under ``$PATHRAY_CACHE/masks``) lets the many processes of a stream, and later
    runs, skip the thumbnail read; slides without a version are cached in memory only.
    """

    def __init__(self, capacity: int = 256, directory: Path | None = None) -> None:
        self.directory = directory
        self._masks: LruCache[str, TissueMask] = LruCache(capacity)

    def _dir(self) -> Path:
        from pathray.storage import cache_root

        return self.directory or cache_root() / "masks"

    def get(self, slide: Slide, config: TissueConfig | None = None) -> TissueMask:
        config = config or TissueConfig()
        version = slide.version
        raw = "|".join((slide.uri, version, str(slide.dimensions), str(slide.mpp), config.model_dump_json()))
        key = hashlib.sha256(raw.encode()).hexdigest()[:32]
        return self._masks.get_or_make(key, lambda: self._load_or_compute(key, slide, config, version))

    def _load_or_compute(self, key: str, slide: Slide, config: TissueConfig, version: str) -> TissueMask:
        path = self._dir() / f"{key}.npz"
        mask = self._load(path) if version else None
        if mask is None:
            mask = compute_tissue_mask(slide, config)
            if version:
                self._save(path, mask)
        return mask

    @staticmethod
    def _load(path: Path) -> TissueMask | None:
        try:
            with np.load(path) as data:
                mpp = float(data["mpp"])
                return TissueMask(
                    data["mask"].astype(bool), float(data["downsample"]), mpp if mpp > 0 else None
                )
        except (OSError, KeyError, ValueError):
            return None

    @staticmethod
    def _save(path: Path, mask: TissueMask) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
            np.savez_compressed(tmp, mask=mask.mask, downsample=mask.downsample, mpp=mask.mpp or 0.0)
            os.replace(tmp, path)  # atomic: concurrent writers leave one whole file
        except OSError:
            pass  # a read-only cache only costs recomputation


TISSUE_MASKS = TissueMaskCache()


def tissue_mask(slide: Slide, config: TissueConfig | None = None) -> TissueMask:
    """The slide's tissue mask, computed once per slide version and config."""
    return TISSUE_MASKS.get(slide, config)
