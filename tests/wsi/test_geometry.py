"""Polygon geometry: areas, point-in-polygon with holes, exact rasterising at pixel centres."""

from __future__ import annotations

import numpy as np
import pytest

from pathray.wsi.annotations.geometry import Polygon, points_of, polygons_of, rasterize

RING = [[2, 2], [6, 2], [6, 6], [2, 6], [2, 2]]
HOLE = [[3, 3], [5, 3], [5, 5], [3, 5], [3, 3]]


def test_polygons_and_points_from_geojson():
    (poly,) = polygons_of({"type": "Polygon", "coordinates": [RING, HOLE]})
    assert poly.area == pytest.approx(16 - 4)
    assert poly.bbox == (2, 2, 6, 6)
    multi = polygons_of({"type": "MultiPolygon", "coordinates": [[RING], [HOLE]]})
    assert [p.area for p in multi] == [16, 4]
    assert polygons_of({"type": "Point", "coordinates": [1, 2]}) == []
    assert points_of({"type": "MultiPoint", "coordinates": [[1, 2], [3, 4]]}).tolist() == [[1, 2], [3, 4]]
    assert points_of({"type": "Point", "coordinates": [5, 6]}).tolist() == [[5, 6]]


def test_contains_respects_holes():
    (poly,) = polygons_of({"type": "Polygon", "coordinates": [RING, HOLE]})
    pts = np.array([[2.5, 2.5], [4, 4], [7, 7], [5.5, 4]])
    assert poly.contains(pts).tolist() == [True, False, False, True]


def test_rasterize_is_exact_at_pixel_centres():
    (poly,) = polygons_of({"type": "Polygon", "coordinates": [RING, HOLE]})
    got = rasterize([(poly, 7)], 0, 0, 1.0, 8, 8)
    expected = np.zeros((8, 8), np.uint8)
    expected[2:6, 2:6] = 7
    expected[3:5, 3:5] = 0
    assert np.array_equal(got, expected)
    # at 2 level-0 px per pixel the centres are 1, 3, 5, 7: (3, 3) lies on the hole's edge -> hole
    half = rasterize([(poly, 1)], 0, 0, 2.0, 4, 4)
    assert half.tolist() == [[0, 0, 0, 0], [0, 0, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]


def test_rasterize_offsets_and_paint_order():
    big = Polygon(np.array([[0, 0], [100, 0], [100, 100], [0, 100]], float))
    small = Polygon(np.array([[40, 40], [60, 40], [60, 60], [40, 60]], float))
    got = rasterize([(big, 1), (small, 2)], 30, 30, 10.0, 4, 4)  # box 30..70, 10 px per pixel
    assert got.tolist() == [[1, 1, 1, 1], [1, 2, 2, 1], [1, 2, 2, 1], [1, 1, 1, 1]]
    assert rasterize([(big, 1)], 500, 500, 1.0, 3, 3).sum() == 0


@pytest.mark.parametrize("seed", range(8))
def test_rasterize_agrees_with_point_in_polygon_on_random_shapes(seed):
    rng = np.random.default_rng(seed)
    theta = np.sort(rng.uniform(0, 2 * np.pi, 40))
    radius = rng.uniform(20, 60, 40)
    outer = np.column_stack([100 + radius * np.cos(theta), 90 + radius * np.sin(theta)])
    hole = np.column_stack([100 + 8 * np.cos(theta), 90 + 8 * np.sin(theta)])
    poly = Polygon(outer, (hole,))
    x0, y0, d, w, h = 23.7, 11.2, 1.7, 90, 100
    got = rasterize([(poly, 1)], x0, y0, d, w, h).astype(bool)
    cy, cx = np.mgrid[:h, :w]
    centres = np.column_stack([x0 + (cx.ravel() + 0.5) * d, y0 + (cy.ravel() + 0.5) * d])
    expected = poly.contains(centres).reshape(h, w)
    assert got.sum() > 500
    assert np.array_equal(got, expected)
