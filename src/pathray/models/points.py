"""Cells as points: gaussian centre heatmaps per class, peak decoding, F1 within a radius in µm.

Heatmaps are compared at the tile's full resolution: the head upsamples its stride-4 logits to
the tile size, so a point decodes to its own pixel (no 4 px quantisation of 2 µm at 0.5 µm/px).
A point ``(x, y)`` in tile pixels lies in pixel ``(floor(y), floor(x))``; a peak in pixel
``(r, c)`` decodes to the pixel centre ``(c + 0.5, r + 0.5)``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pathray.models.metrics import CountAccumulator

_CHUNK = 64  # points rendered at once: bounds memory to CHUNK x H x W floats


def render_heatmaps(
    points: Tensor, mpp: Tensor, n_classes: int, hw: tuple[int, int], sigma_um: float
) -> Tensor:
    """``(B, n_classes, H, W)`` heatmaps: a gaussian of ``sigma_um / mpp`` px per point, max where they meet.

    Args:
        points: ``(B, P, 3)`` rows ``(x, y, class)`` in tile pixels; rows with class < 0 are padding.
        mpp: ``(B,)`` µm per pixel of each tile, so sigma is the same tissue size at every resolution.
    """
    h, w = hw
    device = points.device
    heat = torch.zeros(points.shape[0], n_classes, h * w, device=device)
    rows = torch.arange(h, device=device, dtype=torch.float32)
    cols = torch.arange(w, device=device, dtype=torch.float32)
    for b in range(points.shape[0]):
        pts = points[b].float()
        pts = pts[(pts[:, 2] >= 0) & (pts[:, 2] < n_classes)]
        sigma = sigma_um / float(mpp[b])
        for chunk in pts.split(_CHUNK):
            cx = chunk[:, 0].floor().clamp(0, w - 1)
            cy = chunk[:, 1].floor().clamp(0, h - 1)
            gx = torch.exp(-((cols[None] - cx[:, None]) ** 2) / (2 * sigma**2))
            gy = torch.exp(-((rows[None] - cy[:, None]) ** 2) / (2 * sigma**2))
            g = (gy[:, :, None] * gx[:, None, :]).reshape(len(chunk), h * w)
            index = chunk[:, 2].long()[:, None].expand(-1, h * w)
            heat[b].scatter_reduce_(0, index, g, reduce="amax")
    return heat.reshape(points.shape[0], n_classes, h, w)


def focal_loss(logits: Tensor, target: Tensor, alpha: float = 2.0, beta: float = 4.0) -> Tensor:
    """CenterNet's penalty-reduced focal loss, normalised by the number of points.

    Pixels near a centre (target close to 1) are barely penalised for firing, so the heatmap
    may be as wide as the cell; the focal term keeps the many easy background pixels quiet.
    """
    logits = logits.float()
    p = logits.sigmoid()
    pos = target.eq(1).float()
    pos_loss = -((1 - p) ** alpha) * F.logsigmoid(logits) * pos
    neg_loss = -((1 - target) ** beta) * p**alpha * F.logsigmoid(-logits) * (1 - pos)
    return (pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp_min(1.0)


def decode_points(heat: Tensor, threshold: float, kernel: int = 3) -> list[np.ndarray]:
    """Local maxima above ``threshold``: per tile a ``(n, 4)`` float32 array ``(x, y, class, score)``."""
    pooled = F.max_pool2d(heat, kernel, stride=1, padding=kernel // 2)
    keep = (heat == pooled) & (heat > threshold)
    b, k, y, x = keep.nonzero(as_tuple=True)
    rows = torch.stack([x.float() + 0.5, y.float() + 0.5, k.float(), heat[b, k, y, x].float()], 1)
    rows, b = rows.cpu().numpy(), b.cpu().numpy()
    return [rows[b == i].astype(np.float32) for i in range(heat.shape[0])]


def match_points(pred: np.ndarray, true: np.ndarray, radius: float) -> int:
    """True positives of a greedy one-to-one matching, closest pairs first, within ``radius`` px."""
    if not len(pred) or not len(true):
        return 0
    dist = np.linalg.norm(pred[:, None, :2] - true[None, :, :2], axis=-1)
    pi, ti = np.nonzero(dist <= radius)
    used_p, used_t, tp = set(), set(), 0
    for i in np.argsort(dist[pi, ti], kind="stable"):
        if pi[i] not in used_p and ti[i] not in used_t:
            used_p.add(pi[i])
            used_t.add(ti[i])
            tp += 1
    return tp


def point_counts(
    pred: np.ndarray, true: np.ndarray, radius: float, n_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class ``(tp, n_pred, n_true)``; a prediction matches only a true point of its own class."""
    tp, n_pred, n_true = np.zeros(n_classes), np.zeros(n_classes), np.zeros(n_classes)
    for k in range(n_classes):
        p, t = pred[pred[:, 2] == k], true[true[:, 2] == k]
        tp[k], n_pred[k], n_true[k] = match_points(p, t, radius), len(p), len(t)
    return tp, n_pred, n_true


def _f1(tp: float, n_pred: float, n_true: float) -> float:
    return float(2 * tp / (n_pred + n_true)) if n_pred + n_true else math.nan


class DetectionMetric(CountAccumulator):
    """Point F1 after matching within ``radius_um``: ``f1`` (all classes), ``f1/<class>``, ``macro_f1``."""

    def __init__(self, classes: list[str], radius_um: float, threshold: float) -> None:
        n = len(classes)
        super().__init__(tp=np.zeros(n), n_pred=np.zeros(n), n_true=np.zeros(n))
        self.classes, self.radius_um, self.threshold = classes, radius_um, threshold

    @torch.no_grad()
    def update(self, outputs: Tensor, batch: dict[str, Any]) -> None:
        preds = decode_points(outputs.float().sigmoid(), self.threshold)
        self.update_points(preds, batch["target"], batch["mpp"])

    def update_points(self, preds: list[np.ndarray], target: Any, mpp: Any) -> None:
        """Count already decoded points against ``target`` rows ``(x, y, class)`` (-1 rows: padding)."""
        target = np.asarray(target.cpu() if isinstance(target, Tensor) else target, np.float64)
        mpp = np.asarray(mpp.cpu() if isinstance(mpp, Tensor) else mpp, np.float64).reshape(-1)
        for pred, true, m in zip(preds, target, mpp, strict=True):
            true = true[true[:, 2] >= 0]
            tp, n_pred, n_true = point_counts(pred, true, self.radius_um / m, len(self.classes))
            self.add(tp=tp, n_pred=n_pred, n_true=n_true)

    def compute(self) -> dict[str, float]:
        tp, n_pred, n_true = self.counts["tp"], self.counts["n_pred"], self.counts["n_true"]
        out = {
            "f1": _f1(tp.sum(), n_pred.sum(), n_true.sum()),
            "precision": float(tp.sum() / n_pred.sum()) if n_pred.sum() else math.nan,
            "recall": float(tp.sum() / n_true.sum()) if n_true.sum() else math.nan,
        }
        per_class = [_f1(*c) for c in zip(tp, n_pred, n_true, strict=True)]
        out.update({f"f1/{name}": v for name, v in zip(self.classes, per_class, strict=True)})
        present = [v for v in per_class if not math.isnan(v)]
        out["macro_f1"] = float(np.mean(present)) if present else math.nan
        return out
