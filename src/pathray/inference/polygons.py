"""Class regions of a class map as polygons (with holes) in level-0 px, for QuPath GeoJSON."""

from __future__ import annotations

import numpy as np


def class_polygons(
    class_map: np.ndarray, index: int, downsample: float, min_area_px: float = 0.0
) -> list[list[list[list[float]]]]:
    """Polygon coordinates (rings of ``[x, y]``, exterior first, closed) of class ``index``.

    Contours run through the map's pixel centres at level 0.5 (marching squares, contourpy), scaled
    by ``downsample`` level-0 px per map pixel. Polygons of fewer than ``min_area_px`` map pixels
    (by their ring areas) are dropped.
    """
    import contourpy

    z = np.pad((class_map == index).astype(np.float32), 1)
    if not z.any():
        return []
    gen = contourpy.contour_generator(z=z, fill_type=contourpy.FillType.OuterOffset, corner_mask=True)
    points, offsets = gen.filled(0.5, 2.0)
    out = []
    for pts, offs in zip(points, offsets, strict=True):
        rings = [pts[a:b] for a, b in zip(offs[:-1], offs[1:], strict=True)]
        if _area(rings[0]) - sum(_area(r) for r in rings[1:]) < max(min_area_px, 1e-9):
            continue
        # padded index -> map pixel centre -> level-0 px
        out.append([(((r - 1) + 0.5) * downsample).round(2).tolist() for r in rings])
    return out


def _area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)
