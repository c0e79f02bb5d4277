"""Instance segmentation: foreground + normalised distance-to-boundary maps, marker watershed, F1/PQ.

The head predicts two channels: a foreground logit and a distance logit whose sigmoid regresses
each instance's distance transform scaled to 1 at its centre. Touching instances share a
foreground but not a centre, so markers (distance above ``marker_threshold``) separate them and
a watershed grows each marker back over its foreground (scipy only, no scikit-image).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from pathray.models.metrics import CountAccumulator


def distance_target(instances: np.ndarray) -> np.ndarray:
    """``(H, W)`` float32: each instance's Euclidean distance to its boundary, divided by its maximum.

    Computed per instance, so a pixel next to a touching neighbour is boundary too; the tile edge
    counts as boundary. Background is 0.
    """
    out = np.zeros(instances.shape, np.float32)
    for label, box in enumerate(ndimage.find_objects(instances), start=1):
        if box is None:
            continue
        mask = np.pad(instances[box] == label, 1)
        dist = ndimage.distance_transform_edt(mask)[1:-1, 1:-1]
        inside = mask[1:-1, 1:-1]
        out[box][inside] = (dist / dist.max())[inside]
    return out


def postprocess_instances(
    foreground: np.ndarray, distance: np.ndarray, fg_threshold: float = 0.5, marker_threshold: float = 0.5
) -> np.ndarray:
    """``(H, W)`` int32 instance map (1..k) from foreground probability and normalised distance.

    Markers are the connected cores where ``distance > marker_threshold``; an IFT watershed on the
    inverted distance grows them over the foreground; a marker never crosses into another
    foreground component, and foreground left without a marker becomes an instance of its own.
    """
    fg = foreground > fg_threshold
    components, _ = ndimage.label(fg)
    markers, n = ndimage.label(fg & (distance > marker_threshold))
    cost = np.round((1 - np.clip(distance, 0, 1)) * 65534).astype(np.uint16)
    cost[~fg] = 65535
    seeds = markers.astype(np.int32)
    seeds[~fg] = -1
    labels = ndimage.watershed_ift(cost, seeds).astype(np.int32)
    labels[~fg | (labels < 0)] = 0
    home = np.zeros(n + 1, np.int64)  # the foreground component each marker lies in
    home[markers[markers > 0]] = components[markers > 0]
    labels[(labels > 0) & (components != home[labels])] = 0
    rest, extra = ndimage.label(fg & (labels == 0))
    labels[rest > 0] = rest[rest > 0] + n
    ids = np.unique(labels)
    return np.searchsorted(ids[ids > 0], labels, side="right").astype(np.int32) * (labels > 0)


def instance_maps(outputs: Tensor) -> np.ndarray:
    """``(B, H, W)`` int32 instance maps (0 background, 1..k) from the head's two logit channels."""
    probs = outputs.detach().float().sigmoid().cpu().numpy()
    return np.stack([postprocess_instances(p[0], p[1]) for p in probs])


def instance_targets(maps: Tensor) -> tuple[Tensor, Tensor]:
    """Foreground ``(B, H, W)`` and normalised distance ``(B, H, W)`` of instance maps, float32 on the CPU."""
    arrays = maps.cpu().numpy().astype(np.int32)
    dist = np.stack([distance_target(m) for m in arrays])
    return torch.from_numpy((arrays > 0).astype(np.float32)), torch.from_numpy(dist)


def instance_centroids(foreground: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """``(n, 4)`` float32 ``(x, y, 0, score)`` of one tile's instances (``postprocess_instances``):
    the centroid in tile px (pixel centres at +0.5, as detections decode) and the mean foreground
    probability over the instance as its score."""
    labels = postprocess_instances(foreground, distance)
    n = int(labels.max())
    if not n:
        return np.zeros((0, 4), np.float32)
    flat = labels.ravel()
    ys, xs = np.divmod(np.arange(flat.size), labels.shape[1])
    area = np.bincount(flat, minlength=n + 1)[1:].astype(np.float64)
    cx = np.bincount(flat, xs, minlength=n + 1)[1:] / area + 0.5
    cy = np.bincount(flat, ys, minlength=n + 1)[1:] / area + 0.5
    score = np.bincount(flat, foreground.ravel(), minlength=n + 1)[1:] / area
    return np.column_stack([cx, cy, np.zeros(n), score]).astype(np.float32)


def instance_counts(true: np.ndarray, pred: np.ndarray, iou: float = 0.5) -> tuple[int, int, int, float]:
    """``(tp, fp, fn, sum of matched IoU)``: pairs with IoU above ``iou`` (0.5: at most one each)."""
    _, t = np.unique(true, return_inverse=True)
    _, p = np.unique(pred, return_inverse=True)
    t = t.reshape(true.shape) if true.min() == 0 else t.reshape(true.shape) + 1
    p = p.reshape(pred.shape) if pred.min() == 0 else p.reshape(pred.shape) + 1
    n_t, n_p = int(t.max()), int(p.max())
    inter = np.bincount((t * (n_p + 1) + p).ravel(), minlength=(n_t + 1) * (n_p + 1))
    inter = inter.reshape(n_t + 1, n_p + 1).astype(np.float64)
    area_t, area_p = inter.sum(1)[1:], inter.sum(0)[1:]
    inter = inter[1:, 1:]
    union = area_t[:, None] + area_p[None, :] - inter
    ious = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    matched = ious > iou
    tp = int(matched.sum())
    return tp, n_p - tp, n_t - tp, float(ious[matched].sum())


class InstanceMetric(CountAccumulator):
    """Dataset-level instance ``f1`` at IoU 0.5 and ``pq`` = ``sq`` (mean matched IoU) x ``f1``."""

    def __init__(self) -> None:
        super().__init__(tp=0.0, fp=0.0, fn=0.0, iou=0.0)

    @torch.no_grad()
    def update(self, outputs: Tensor, batch: dict[str, Any]) -> None:
        self.update_maps(instance_maps(outputs), batch["target"])

    def update_maps(self, preds: Any, targets: Any) -> None:
        """Count predicted instance maps against true ones, both ``(B, H, W)``."""
        targets = targets.cpu().numpy() if isinstance(targets, Tensor) else np.asarray(targets)
        for pred, true in zip(preds, targets, strict=True):
            tp, fp, fn, iou = instance_counts(true, pred)
            self.add(tp=tp, fp=fp, fn=fn, iou=iou)

    def compute(self) -> dict[str, float]:
        tp, fp, fn, iou = (float(self.counts[k]) for k in ("tp", "fp", "fn", "iou"))
        denom = tp + 0.5 * fp + 0.5 * fn
        return {
            "f1": tp / denom if denom else math.nan,
            "pq": iou / denom if denom else math.nan,
            "sq": iou / tp if tp else math.nan,
        }
