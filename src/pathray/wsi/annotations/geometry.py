"""Polygon helpers in level-0 pixels: point-in-polygon, areas, and rasterising onto a tile grid."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Polygon:
    """An exterior ring and its holes, as ``(n, 2)`` float arrays of level-0 (x, y)."""

    exterior: np.ndarray
    holes: tuple[np.ndarray, ...] = ()

    @property
    def rings(self) -> tuple[np.ndarray, ...]:
        return (self.exterior, *self.holes)

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        x0, y0 = self.exterior.min(axis=0)
        x1, y1 = self.exterior.max(axis=0)
        return float(x0), float(y0), float(x1), float(y1)

    @property
    def area(self) -> float:
        return ring_area(self.exterior) - sum(ring_area(h) for h in self.holes)

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Boolean per ``(n, 2)`` point: inside the exterior and outside every hole (even-odd)."""
        inside = np.zeros(len(points), bool)
        for ring in self.rings:
            inside ^= points_in_ring(points, ring)
        return inside


def ring_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)


def points_in_ring(points: np.ndarray, ring: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Even-odd ray casting, vectorised over points ``chunk`` at a time (bounded memory)."""
    out = np.zeros(len(points), bool)
    x0, y0 = ring[:, 0][None, :], ring[:, 1][None, :]
    x1, y1 = np.roll(ring[:, 0], -1)[None, :], np.roll(ring[:, 1], -1)[None, :]
    for s in range(0, len(points), chunk):
        px, py = points[s : s + chunk, 0][:, None], points[s : s + chunk, 1][:, None]
        crosses = (y0 > py) != (y1 > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            xs = x0 + (py - y0) * (x1 - x0) / (y1 - y0)
        out[s : s + chunk] = np.count_nonzero(crosses & (px < xs), axis=1) % 2 == 1
    return out


def polygons_of(geometry: dict[str, Any]) -> list[Polygon]:
    """The polygons of a GeoJSON Polygon or MultiPolygon (other geometries have none)."""
    kind = geometry.get("type")
    if kind == "Polygon":
        parts = [geometry["coordinates"]]
    elif kind == "MultiPolygon":
        parts = geometry["coordinates"]
    else:
        return []
    out = []
    for rings in parts:
        arrays = [np.asarray(r, dtype=np.float64)[:, :2] for r in rings if len(r) >= 3]
        if arrays:
            out.append(Polygon(arrays[0], tuple(arrays[1:])))
    return out


def points_of(geometry: dict[str, Any]) -> np.ndarray:
    """``(n, 2)`` coordinates of a GeoJSON Point or MultiPoint (empty for other geometries)."""
    kind = geometry.get("type")
    if kind == "Point":
        return np.asarray([geometry["coordinates"][:2]], dtype=np.float64)
    if kind == "MultiPoint":
        coords = geometry["coordinates"]
        return np.asarray([c[:2] for c in coords], dtype=np.float64).reshape(-1, 2)
    return np.zeros((0, 2))


def polygon_mask(
    polygon: Polygon, x: float, y: float, downsample: float, width: int, height: int
) -> np.ndarray:
    """Pixels of the level-0 box at ``(x, y)`` whose centres lie inside ``polygon`` (even-odd, exact).

    A scanline fill for all rows at once: each row's crossings with every ring edge, sorted;
    pixel spans between crossing pairs are marked in a difference array whose running sum
    along the row is the mask. Holes need nothing special under the even-odd rule.
    """
    edges = np.concatenate([np.stack([r, np.roll(r, -1, axis=0)], axis=1) for r in polygon.rings])
    xa, ya, xb, yb = edges[:, 0, 0], edges[:, 0, 1], edges[:, 1, 0], edges[:, 1, 1]
    yc = (y + (np.arange(height) + 0.5) * downsample)[:, None]
    crosses = (ya[None, :] > yc) != (yb[None, :] > yc)
    if not crosses.any():
        return np.zeros((height, width), bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        xs = np.where(crosses, xa + (yc - ya) * (xb - xa) / (yb - ya), np.inf)
    xs.sort(axis=1)
    n = int(crosses.sum(axis=1).max()) // 2 * 2
    # pixel i is inside when its centre x + (i + 0.5) * d lies in [xs[2k], xs[2k+1])
    with np.errstate(invalid="ignore"):
        cols = np.ceil((xs[:, :n] - x) / downsample - 0.5)
    cols = np.nan_to_num(cols, nan=width, posinf=width, neginf=0).clip(0, width).astype(np.int64)
    diff = np.zeros((height, width + 1), np.int32)
    rows = np.broadcast_to(np.arange(height)[:, None], (height, n // 2))
    np.add.at(diff, (rows, cols[:, 0::2]), 1)
    np.add.at(diff, (rows, cols[:, 1::2]), -1)
    return np.cumsum(diff[:, :width], axis=1) > 0


def rasterize(
    polygons: Sequence[tuple[Polygon, int]],
    x: float,
    y: float,
    downsample: float,
    width: int,
    height: int,
    background: int = 0,
    dtype: type = np.uint8,
) -> np.ndarray:
    """A ``(height, width)`` label map of the level-0 box at ``(x, y)``, ``downsample`` px per pixel.

    Later polygons paint over earlier ones. A pixel belongs to a polygon when its centre does.
    """
    out = np.full((height, width), background, dtype)
    x1, y1 = x + width * downsample, y + height * downsample
    for polygon, value in polygons:
        bx0, by0, bx1, by1 = polygon.bbox
        if bx1 < x or by1 < y or bx0 > x1 or by0 > y1:
            continue
        out[polygon_mask(polygon, x, y, downsample, width, height)] = value
    return out
