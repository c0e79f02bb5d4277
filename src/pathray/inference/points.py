"""Detections across overlapping tiles: each point kept once, by the tile whose centre is nearest."""

from __future__ import annotations

import math

import numpy as np

from pathray.inference.grid import GridPlan


def grid_keys(plan: GridPlan, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """One integer per grid tile (grid tiles sit at multiples of the stride)."""
    ncols = plan.width // plan.stride + 2
    return (ys // plan.stride) * ncols + xs // plan.stride


def owned(plan: GridPlan, points: np.ndarray, tile_x: np.ndarray, tile_y: np.ndarray) -> np.ndarray:
    """Which points (level-0 ``(x, y, ...)`` rows, found in the tiles at ``tile_x, tile_y``) to keep.

    A point in an overlap is seen by every tile that covers it; only the covering tile of the plan
    whose centre is nearest keeps it (ties: the smaller grid key), so a whole-slide count holds
    each cell once whichever chunk or replica predicted which tile.
    """
    if not len(points):
        return np.zeros(0, bool)
    present = np.sort(grid_keys(plan, plan.xs, plan.ys))
    half, s, e = plan.extent / 2.0, plan.stride, plan.extent
    span = math.ceil(e / s)
    px, py = points[:, 0], points[:, 1]
    best_d = np.full(len(points), np.inf)
    best_k = np.full(len(points), -1, np.int64)
    for dy in range(span):
        for dx in range(span):
            ix = np.floor(px / s).astype(np.int64) - dx
            iy = np.floor(py / s).astype(np.int64) - dy
            cx, cy = ix * s, iy * s
            covers = (ix >= 0) & (iy >= 0) & (px >= cx) & (px < cx + e) & (py >= cy) & (py < cy + e)
            keys = grid_keys(plan, cx, cy)
            pos = np.clip(np.searchsorted(present, keys), 0, len(present) - 1)
            ok = covers & (present[pos] == keys)
            dist = np.hypot(px - (cx + half), py - (cy + half))
            better = ok & ((dist < best_d) | ((dist == best_d) & (keys < best_k)))
            best_d = np.where(better, dist, best_d)
            best_k = np.where(better, keys, best_k)
    return best_k == grid_keys(plan, tile_x, tile_y)


def suppress_duplicates(points: np.ndarray, tiles: np.ndarray, radius: float) -> np.ndarray:
    """Keep-mask after greedy NMS (highest score first) between points of *different* tiles within
    ``radius`` level-0 px: one cell found on both sides of an ownership border counts once."""
    keep = np.ones(len(points), bool)
    if len(points) < 2 or radius <= 0:
        return keep
    from scipy.spatial import cKDTree

    pairs = cKDTree(points[:, :2]).query_pairs(radius, output_type="ndarray")
    if not len(pairs):
        return keep
    pairs = pairs[tiles[pairs[:, 0]] != tiles[pairs[:, 1]]]
    order = np.argsort(-np.maximum(points[pairs[:, 0], 3], points[pairs[:, 1], 3]), kind="stable")
    for i, j in pairs[order]:
        if keep[i] and keep[j]:
            loser = j if points[i, 3] >= points[j, 3] else i
            keep[loser] = False
    return keep
