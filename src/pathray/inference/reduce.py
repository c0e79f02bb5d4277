"""Tile probabilities -> mean probability over each class-map pixel a tile covers (exact box means)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pathray.inference.grid import GridPlan, map_windows, window_counts


def _edges(starts: np.ndarray, first: np.ndarray, k: int, d: float, scale: float, s: int) -> np.ndarray:
    """``(n, k + 1)`` tile-pixel edges of map pixels ``first + j``; each box at least one pixel wide."""
    j = np.arange(k + 1)
    edges = np.rint(((first[:, None] + j) * d - starts[:, None]) * scale)
    edges = np.clip(edges, 0, s).astype(np.int64)
    lo = np.minimum(edges[:, :-1], s - 1)
    hi = np.maximum(edges[:, 1:], lo + 1)
    return np.stack([lo, hi])  # (2, n, k)


def window_means(
    probs: torch.Tensor, plan: GridPlan, xs: np.ndarray, ys: np.ndarray
) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Box means of ``(N, C, S, S)`` tile probabilities over the class-map pixels of each tile.

    A map pixel's box is its footprint in tile pixels (edges rounded to tile pixels), so a map
    pixel gets the mean of exactly the tile pixels under it. ``(N, C, 1, 1)`` inputs pass through.

    Returns:
        ``(means (N, C, k, k), rows, cols, heights, widths)``; the window of tile ``i`` is its
        first ``heights[i] x widths[i]`` values, placed at map pixel ``(rows[i], cols[i])``.
    """
    rows, cols, k = map_windows(plan, xs, ys)
    heights, widths = window_counts(plan, ys, rows), window_counts(plan, xs, cols)
    n, c, s, _ = probs.shape
    if s == 1:
        return probs, rows, cols, heights, widths
    d, scale = plan.downsample, s / plan.extent
    ey = torch.from_numpy(_edges(ys, rows, k, d, scale, s)).to(probs.device)
    ex = torch.from_numpy(_edges(xs, cols, k, d, scale, s)).to(probs.device)
    dtype = torch.float64 if probs.device.type == "cpu" else torch.float32
    integral = F.pad(probs.to(dtype).cumsum(2).cumsum(3), (1, 0, 1, 0)).permute(0, 2, 3, 1)
    b = torch.arange(n, device=probs.device)[:, None, None]

    def at(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        return integral[b, yy[:, :, None], xx[:, None, :]]  # (n, k, k, c)

    y0, y1, x0, x1 = ey[0], ey[1], ex[0], ex[1]
    total = at(y1, x1) - at(y0, x1) - at(y1, x0) + at(y0, x0)
    area = ((y1 - y0)[:, :, None] * (x1 - x0)[:, None, :]).to(dtype)
    means = (total / area[..., None]).permute(0, 3, 1, 2)
    return means, rows, cols, heights, widths
