"""Detections in overlapping tiles are counted once: a real module that fires on coloured dots."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from blocks import write_image_slide
from torch import nn

from pathray.inference.analyze import analyze_slide
from pathray.inference.config import InferenceConfig
from pathray.inference.predictor import Predictor
from pathray.inference.spec import ModelSpec
from pathray.models.tasks import build_task
from pathray.wsi.annotations.classes import NUCLEUS_CLASSES

DOTS = np.array([c.color for c in NUCLEUS_CLASSES], np.float32)


class DotDetector(nn.Module):
    """Heatmap logit +10 on a pixel of exactly a nucleus class's colour, -10 elsewhere."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()[..., None, :]  # (B, H, W, 1, 3)
        hit = (x == torch.from_numpy(DOTS)).all(-1)  # (B, H, W, K)
        return (hit.float() * 20 - 10).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def dots(tmp_path_factory):
    rng = np.random.default_rng(3)
    size = 640
    image = np.full((size, size, 3), 255, np.uint8)
    image[:, :, 1] = 200  # pink-ish: the tissue mask sees tissue everywhere
    # dots on a jittered lattice 9 px apart: many fall in the overlaps of every grid
    ys, xs = np.mgrid[4 : size - 4 : 9, 4 : size - 4 : 9]
    xs = xs.ravel() + rng.integers(0, 3, xs.size)
    ys = ys.ravel() + rng.integers(0, 3, ys.size)
    cls = rng.integers(0, len(DOTS), xs.size)
    image[ys, xs] = DOTS[cls].astype(np.uint8)
    path = write_image_slide(tmp_path_factory.mktemp("dots") / "dots.tiff", image, 2.0)
    return str(path), xs, ys, cls


@pytest.mark.parametrize(("overlap", "radius_um"), [(0.125, 2.0), (0.5, 2.0), (0.7, 2.0), (0.5, 0.0)])
def test_every_dot_is_found_once_whatever_the_overlap(dots, overlap, radius_um):
    """Radius 0 turns the final NMS off: the nearest-tile-centre ownership alone must dedupe."""
    uri, xs, ys, cls = dots
    names = [c.name for c in NUCLEUS_CLASSES]
    task = build_task({"name": "detection", "classes": names, "match_radius_um": radius_um})
    spec = ModelSpec(task, tile_size=64, tile_mpp=2.0)
    config = InferenceConfig(overlap=overlap, min_tissue=0.0, chunk_tiles=9, batch_size=8, compute_threads=2)
    result = analyze_slide(uri, Predictor(DotDetector(), spec, config))
    assert result.counts == {n: int((cls == i).sum()) for i, n in enumerate(names)}
    found = np.array([(p["x"], p["y"]) for p in result.points])
    order = np.lexsort((found[:, 0], found[:, 1]))
    truth = np.column_stack([xs + 0.5, ys + 0.5])  # a peak decodes to its pixel centre
    np.testing.assert_allclose(found[order], truth[np.lexsort((truth[:, 0], truth[:, 1]))])
    features = result.geojson()["features"]
    assert len(features) == len(xs) and {f["properties"]["objectType"] for f in features} == {"detection"}
