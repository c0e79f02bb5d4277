"""What a slide-level (MIL) run shows: attention heatmaps (PNG, QuPath GeoJSON) and the fold summary.

No Ray and no torch: a slide's tile coordinates and attention weights in, bytes and text out.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

SCORES = ("balanced_accuracy", "macro_f1", "auroc")
SCORE_NAMES = {"balanced_accuracy": "balanced accuracy", "macro_f1": "macro F1", "auroc": "AUROC"}


def grid_step(x: np.ndarray, y: np.ndarray, fallback: int) -> int:
    """The tile grid's stride in level-0 px: the smallest gap between distinct tile positions.

    Embedding files hold each tile's level-0 corner but not the slide's µm/px, so the grid is read
    off the coordinates themselves (``fallback`` for a slide of a single row and column).
    """
    gaps = [np.diff(np.unique(np.asarray(v, np.int64))) for v in (x, y)]
    found = [int(g[g > 0].min()) for g in gaps if (g > 0).any()]
    return min(found) if found else max(1, int(fallback))


def attention_grid(x: np.ndarray, y: np.ndarray, attention: np.ndarray, step: int) -> np.ndarray:
    """``(rows, cols)`` float map, one cell per grid position from the slide's origin, NaN where no tile.

    Values are relative to the slide's largest weight (1.0: the tile the slide rests on most), so
    heatmaps of slides with many and few tiles read the same.
    """
    cols = np.asarray(x, np.int64) // step
    rows = np.asarray(y, np.int64) // step
    grid = (
        np.full((int(rows.max()) + 1, int(cols.max()) + 1), np.nan) if len(cols) else np.full((1, 1), np.nan)
    )
    top = float(np.max(attention)) if len(attention) else 0.0
    grid[rows, cols] = np.asarray(attention, np.float64) / top if top > 0 else 0.0
    return grid


def heatmap_png(x: np.ndarray, y: np.ndarray, attention: np.ndarray, step: int, longest: int = 512) -> bytes:
    """The attention map as a PNG about ``longest`` px on its long side (cells scaled up whole):
    the colour map ``inferno`` on tiles, light grey where the slide has no tile."""
    from matplotlib import colormaps
    from PIL import Image

    grid = attention_grid(x, y, attention, step)
    rgb = (colormaps["inferno"](np.nan_to_num(grid, nan=0.0))[..., :3] * 255).astype(np.uint8)
    rgb[np.isnan(grid)] = 235
    scale = max(1, longest // max(grid.shape))
    rgb = np.repeat(np.repeat(rgb, scale, 0), scale, 1)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def heatmap_geojson(
    x: np.ndarray, y: np.ndarray, attention: np.ndarray, step: int, slide: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A QuPath FeatureCollection: one square tile per grid cell (level-0 px, ``step`` wide) with its
    ``attention`` and ``attention_relative`` (to the slide's largest) as measurements.

    ``slide`` (id, label, prediction, probabilities) goes into the collection's ``properties``.
    """
    top = float(np.max(attention)) if len(attention) else 0.0
    features = []
    for xi, yi, a in zip(
        np.asarray(x, np.int64), np.asarray(y, np.int64), np.asarray(attention), strict=True
    ):
        x0, y0, x1, y1 = int(xi), int(yi), int(xi) + step, int(yi) + step
        features.append(
            {
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]],
                },
                "properties": {
                    "objectType": "tile",
                    "measurements": {
                        "attention": float(a),
                        "attention_relative": float(a) / top if top > 0 else 0.0,
                    },
                },
            }
        )
    return {"type": "FeatureCollection", "properties": dict(slide or {}), "features": features}


def summarise(folds: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean and sample std (ddof 1) of each score over the folds, of the model and of the baseline;
    folds where a score is undefined (AUROC of a fold with one class) are left out of it."""
    out: dict[str, dict[str, float]] = {}
    for prefix in ("", "baseline/"):
        for name in SCORES:
            values = np.array([f[prefix + name] for f in folds], np.float64)
            values = values[~np.isnan(values)]
            mean = float(values.mean()) if len(values) else math.nan
            std = float(values.std(ddof=1)) if len(values) > 1 else (0.0 if len(values) else math.nan)
            out[prefix + name] = {"mean": mean, "std": std, "folds": len(values)}
    return out


def summary_lines(summary: dict[str, dict[str, float]], model: str, k: int) -> list[str]:
    """``abmil, 5 folds: balanced accuracy 0.81 ± 0.07, macro F1 ..., AUROC ...`` and the same for the
    constant (majority-class) predictor."""

    def line(prefix: str) -> str:
        return ", ".join(
            f"{SCORE_NAMES[n]} {summary[prefix + n]['mean']:.2f} ± {summary[prefix + n]['std']:.2f}"
            for n in SCORES
        )

    return [f"{model}, {k} folds: {line('')}", f"constant (majority class): {line('baseline/')}"]
