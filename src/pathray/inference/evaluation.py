"""Whole-slide evaluation: the predictor that serves, over every annotated region of every test slide.

    scores = evaluate_slides(predictor, slides, storage)  # slides: slide_id, uri, annotations_uri, mpp
    scores.metrics  # test/macro_f1, test/f1/G3, ..., test/coverage, test/macro_f1_lo, test/macro_f1_hi

Each slide is planned over its tissue and its annotated regions together, predicted chunk by
chunk and stitched exactly as an analysis is, and compared with its annotations at the class
map's resolution (the model's mpp unless the map would be too large): pixels for class maps,
tiles for tile classifiers, matched points for detectors. Per-slide counts are kept, so the
scores come with bootstrap confidence intervals over slides.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pathray.inference.config import InferenceConfig
from pathray.inference.grid import plan_grid
from pathray.inference.outputs import NO_DATA
from pathray.inference.predictor import Predictor
from pathray.inference.stitch import Stitcher
from pathray.models.metrics import CountAccumulator, confusion_matrix
from pathray.models.points import DetectionMetric, point_counts
from pathray.storage import StorageConfig
from pathray.wsi.annotations.geometry import rasterize
from pathray.wsi.annotations.targets import AnnotationIndex, annotation_index
from pathray.wsi.backends.open import open_slide
from pathray.wsi.backends.slide import Slide
from pathray.wsi.patching.tissue import TissueConfig, TissueMask, tissue_mask

MAX_MAP_PIXELS = 64_000_000  # class map (and its per-class sums) of one slide: larger maps go coarser


@dataclass
class SlideScore:
    """One slide's counts (a metric accumulator's state) and how much of its annotations was seen."""

    slide_id: str
    state: dict[str, np.ndarray]
    annotated: float  # annotated pixels (maps) or points (detectors)
    covered: float  # of those, the ones the evaluation predicted
    tiles: int
    out_mpp: float
    seconds: float


@dataclass
class Evaluation:
    """Scores of a set of slides: ``metrics`` (``test/...``, with ``_lo``/``_hi`` bootstrap bounds)."""

    slides: list[SlideScore]
    metrics: dict[str, float] = field(default_factory=dict)


def evaluation_mask(slide: Slide, index: AnnotationIndex, tissue: TissueConfig | None) -> TissueMask:
    """The tissue mask with every annotated region added: the grid covers all annotated area."""
    mask = tissue_mask(slide, tissue)
    h, w = mask.mask.shape
    regions = [(poly, 1) for poly, _ in index.regions] + [(poly, 1) for poly in index.detections]
    if not regions:
        return mask
    annotated = rasterize(regions, 0, 0, mask.downsample, w, h).astype(bool)
    # one mask pixel more all round: a region's edge pixels whose centres miss the coarse mask
    grown = annotated.copy()
    grown[1:] |= annotated[:-1]
    grown[:-1] |= annotated[1:]
    grown[:, 1:] |= grown[:, :-1].copy()
    grown[:, :-1] |= grown[:, 1:].copy()
    return TissueMask(mask.mask | grown, mask.downsample, mask.mpp)


def eval_config(config: InferenceConfig, slide: Slide, tile_mpp: float) -> InferenceConfig:
    """The inference config an evaluation runs with: the class map at the model's mpp, coarser only
    when the slide's map would exceed ``MAX_MAP_PIXELS``."""
    w, h = slide.dimensions
    assert slide.mpp is not None
    area_um2 = w * h * slide.mpp**2
    out_mpp = max(tile_mpp, math.sqrt(area_um2 / MAX_MAP_PIXELS))
    # any tile touching tissue or an annotation is predicted; the map is clipped to that mask
    return config.model_copy(update={"out_mpp": out_mpp, "clip_to_tissue": True, "min_tissue": 1e-9})


def metric_for(predictor: Predictor) -> CountAccumulator:
    """The accumulator whose counts a slide adds: point F1 for detectors, else a confusion matrix."""
    spec = predictor.spec
    if spec.has_points:
        return DetectionMetric(spec.point_classes, spec.match_radius_um, 0.5)
    return spec.task.metrics()  # a ConfusionMetric over the task's classes


def score_slide(
    predictor: Predictor,
    slide: Slide,
    slide_id: str,
    index: AnnotationIndex,
    tissue: TissueConfig | None = None,
) -> SlideScore:
    """Predict the slide over its tissue and annotations (as an analysis does) and count against them."""
    t0 = time.perf_counter()
    spec = predictor.spec
    config = eval_config(predictor.config, slide, spec.tile_mpp)
    plan = plan_grid(slide, spec, config, tissue, mask=evaluation_mask(slide, index, tissue))
    stitcher = Stitcher(plan, spec)
    with Predictor(predictor.model, spec, config) as evaluator:
        for result in evaluator.iter_chunks(slide, plan, plan.chunks(config.chunk_tiles)):
            stitcher.add(result)
    out = stitcher.finish()
    metric = metric_for(predictor)
    rows, cols = plan.map_shape
    d = plan.downsample
    if spec.has_points:
        truth = _true_points(index, spec.point_classes)
        names = spec.point_classes
        pred = np.array([[p["x"], p["y"], names.index(p["class"])] for p in out.points or []]).reshape(-1, 3)
        evaluated = stitcher.covered_map()
        inside = _inside(evaluated, truth[:, :2], d)
        radius = spec.match_radius_um / plan.slide_mpp
        tp, n_pred, n_true = point_counts(pred, truth, radius, len(spec.point_classes))
        metric.add(tp=tp, n_pred=n_pred, n_true=n_true)
        annotated, covered = float(len(truth)), float(inside.sum())
    else:
        assert out.class_map is not None
        lookup = {name: k for k, name in enumerate(spec.classes)}
        truth = rasterize([(p, lookup[c]) for p, c in index.regions if c in lookup], 0, 0, d, cols, rows)
        marked = rasterize([(p, 1) for p, _ in index.regions], 0, 0, d, cols, rows).astype(bool)
        evaluated = out.class_map != NO_DATA
        if spec.task.output.per_tile:
            truth_t, pred_t = _tile_labels(plan, out.class_map, truth, marked)
            metric.add(confusion=_confusion(truth_t, pred_t, len(spec.classes)))
        else:
            metric.add(confusion=_confusion(truth[evaluated], out.class_map[evaluated], len(spec.classes)))
        annotated, covered = float(marked.sum()), float((marked & evaluated).sum())
    return SlideScore(
        slide_id, metric.state(), annotated, covered, plan.n_tiles, plan.out_mpp, time.perf_counter() - t0
    )


def _confusion(truth: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    """``confusion_matrix`` of two label arrays; NO_DATA (255) and other values outside the classes
    are left out."""
    return confusion_matrix(
        torch.from_numpy(truth.astype(np.int64)), torch.from_numpy(pred.astype(np.int64)), n
    )


def _true_points(index: AnnotationIndex, classes: list[str]) -> np.ndarray:
    """``(m, 3)`` level-0 ``(x, y, class)`` of the annotated points of ``classes``."""
    rows = [
        (x, y, classes.index(name))
        for (x, y), name in zip(index.points, index.point_classes, strict=True)
        if name in classes
    ]
    return np.asarray(rows, np.float64).reshape(-1, 3)


def _inside(mask: np.ndarray, xy: np.ndarray, downsample: float) -> np.ndarray:
    r = np.clip((xy[:, 1] / downsample).astype(np.int64), 0, mask.shape[0] - 1)
    c = np.clip((xy[:, 0] / downsample).astype(np.int64), 0, mask.shape[1] - 1)
    return mask[r, c] if len(xy) else np.zeros(0, bool)


def _tile_labels(
    plan: Any, class_map: np.ndarray, truth: np.ndarray, marked: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per grid tile, the true class at its centre (annotated tiles only) and the predicted one."""
    d = plan.downsample
    cx = ((plan.xs + plan.extent / 2) / d).astype(np.int64).clip(0, class_map.shape[1] - 1)
    cy = ((plan.ys + plan.extent / 2) / d).astype(np.int64).clip(0, class_map.shape[0] - 1)
    keep = marked[cy, cx]
    return truth[cy, cx][keep], class_map[cy, cx][keep]


def bootstrap(
    states: list[dict[str, np.ndarray]],
    make: Callable[[], CountAccumulator],
    n: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap over slides: ``(lo, hi)`` per score of ``make().compute()``.

    Slides are resampled with replacement ``n`` times; each resample's counts are summed and
    scored. NaN bounds for a score that is undefined in most resamples.
    """
    if not states:
        return {}
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(n):
        metric = make()
        for i in rng.integers(0, len(states), len(states)):
            metric.merge(states[i])
        for key, value in metric.compute().items():
            draws.setdefault(key, []).append(value)
    tail = (1.0 - level) / 2 * 100
    out = {}
    for key, values in draws.items():
        arr = np.asarray(values, np.float64)
        arr = arr[~np.isnan(arr)]
        if len(arr) < n / 2:
            out[key] = (math.nan, math.nan)
        else:
            out[key] = (float(np.percentile(arr, tail)), float(np.percentile(arr, 100 - tail)))
    return out


def summarise(
    scores: list[SlideScore], make: Callable[[], CountAccumulator], n_boot: int = 1000, seed: int = 0
) -> dict[str, float]:
    """``test/<score>`` over all slides with ``_lo``/``_hi`` bootstrap bounds, ``test/coverage``,
    ``test/slides``, ``test/tiles`` and ``test/eval_mpp``."""
    metric = make()
    for s in scores:
        metric.merge(s.state)
    out = {f"test/{k}": float(v) for k, v in metric.compute().items()}
    for key, (lo, hi) in bootstrap([s.state for s in scores], make, n_boot, seed=seed).items():
        out[f"test/{key}_lo"], out[f"test/{key}_hi"] = lo, hi
    annotated = sum(s.annotated for s in scores)
    out["test/coverage"] = sum(s.covered for s in scores) / annotated if annotated else math.nan
    out["test/slides"] = float(len(scores))
    out["test/tiles"] = float(sum(s.tiles for s in scores))
    out["test/eval_mpp"] = max((s.out_mpp for s in scores), default=math.nan)
    out["test/seconds_per_slide"] = float(np.mean([s.seconds for s in scores])) if scores else math.nan
    return out


def majority_baseline(scores: list[SlideScore], make: Callable[[], CountAccumulator]) -> dict[str, float]:
    """What always predicting the most frequent true class scores (confusion-matrix metrics only)."""
    if not scores or "confusion" not in scores[0].state:
        return {}
    cm = sum(s.state["confusion"] for s in scores)
    support = cm.sum(1)
    constant = np.zeros_like(cm)
    constant[:, int(support.argmax())] = support
    metric = make()
    metric.merge({"confusion": constant})
    return {f"baseline/{k}": float(v) for k, v in metric.compute().items()}


def evaluate_slides(
    predictor: Predictor,
    slides: Iterable[dict[str, Any]],
    storage: StorageConfig | None = None,
    tissue: TissueConfig | None = None,
    n_boot: int = 1000,
) -> Evaluation:
    """Score every slide (``slide_id``, ``uri``, ``annotations_uri``, optional ``mpp``) whole.

    Raises:
        SlideError: a test slide cannot be read (an evaluation must not silently drop one).
    """
    scores = []
    for row in slides:
        mpp = row.get("mpp")
        slide = open_slide(str(row["uri"]), storage, mpp=float(mpp) if _number(mpp) else None)
        index = annotation_index(str(row.get("annotations_uri") or ""), storage)
        scores.append(score_slide(predictor, slide, str(row["slide_id"]), index, tissue))
    make = lambda: metric_for(predictor)  # noqa: E731 - a fresh accumulator per resample
    metrics = summarise(scores, make, n_boot) | majority_baseline(scores, make)
    return Evaluation(scores, metrics)


def _number(value: Any) -> bool:
    try:
        return value is not None and float(value) > 0
    except (TypeError, ValueError):
        return False
