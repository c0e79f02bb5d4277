"""Tile probabilities -> mean probability over each class-map pixel a tile covers (exact box means)."""

from __future__ import annotations

import numpy as np
import torch

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
    pixel gets the mean of exactly the tile pixels under it (separable: a row average of column
    averages). ``(N, C, 1, 1)`` inputs pass through.

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
    ey, ex = _edges(ys, rows, k, d, scale, s), _edges(xs, cols, k, d, scale, s)
    if _shared(ey) and _shared(ex):  # a grid on the map's pixels: every tile has the same boxes
        wy, wx = _box_weights(ey[:, :1], s, probs.device)[0], _box_weights(ex[:, :1], s, probs.device)[0]
        return wy @ probs.float() @ wx.T, rows, cols, heights, widths  # (k, s) @ (n, c, s, s) @ (s, k)
    # (n, k, s) @ (n, c, s, s) @ (n, s, k): every box mean as two small batched matmuls
    means = torch.einsum(
        "njp,ncpq,nkq->ncjk",
        _box_weights(ey, s, probs.device),
        probs.float(),
        _box_weights(ex, s, probs.device),
    )
    return means, rows, cols, heights, widths


def _shared(edges: np.ndarray) -> bool:
    """Whether every tile of the batch has the same box edges (``(2, n, k)``)."""
    return bool((edges == edges[:, :1]).all())


def _box_weights(edges: np.ndarray, s: int, device: torch.device) -> torch.Tensor:
    """``(n, k, s)`` float32: row ``j`` averages tile pixels ``[lo_j, hi_j)``."""
    lo, hi = edges[0][..., None], edges[1][..., None]
    p = np.arange(s)
    inside = (p >= lo) & (p < hi)
    return torch.from_numpy(inside / (hi - lo)).float().to(device)
