"""Instances in overlapping tiles are counted once: a real module that segments coloured discs."""

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

DISC = torch.tensor([60.0, 20.0, 90.0])
RADIUS = 3


class DiscInstances(nn.Module):
    """Foreground and distance logits +10 on a disc-coloured pixel, -10 elsewhere: every disc is
    one marker, so one instance, wherever a tile cuts it."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        hit = (images.float() == DISC).all(-1).float() * 20 - 10  # (B, H, W)
        return torch.stack([hit, hit], 1)


@pytest.fixture(scope="module")
def discs(tmp_path_factory):
    rng = np.random.default_rng(5)
    size = 640
    image = np.full((size, size, 3), 255, np.uint8)
    image[:, :, 1] = 200  # tissue everywhere
    ys, xs = np.mgrid[8 : size - 8 : 16, 8 : size - 8 : 16]
    xs, ys = xs.ravel() + rng.integers(-2, 3, xs.size), ys.ravel() + rng.integers(-2, 3, ys.size)
    keep = rng.random(xs.size) < 0.7  # gaps, so tiles differ
    xs, ys = xs[keep], ys[keep]
    yy, xx = np.mgrid[-RADIUS : RADIUS + 1, -RADIUS : RADIUS + 1]
    inside = yy**2 + xx**2 <= RADIUS**2
    for x, y in zip(xs, ys, strict=True):
        image[y + yy[inside], x + xx[inside]] = DISC.numpy().astype(np.uint8)
    path = write_image_slide(tmp_path_factory.mktemp("discs") / "discs.tiff", image, 2.0)
    return str(path), xs, ys, int(inside.sum())


@pytest.mark.parametrize(("overlap", "radius_um"), [(0.125, 2.0), (0.5, 2.0), (0.5, 0.0)])
def test_every_disc_is_one_instance_at_its_centre_whatever_the_overlap(discs, overlap, radius_um):
    """A disc cut by a tile border is seen whole by a neighbour; the cut copy's centroid lies on
    the neighbour's side, so ownership alone (radius 0: no final NMS) keeps each disc once."""
    uri, xs, ys, disc_px = discs
    spec = ModelSpec(build_task({"name": "instance", "match_radius_um": radius_um}), 64, 2.0)
    config = InferenceConfig(
        overlap=overlap,
        min_tissue=0.0,
        clip_to_tissue=False,
        chunk_tiles=9,
        batch_size=8,
        compute_threads=2,
        out_mpp=2.0,
    )
    result = analyze_slide(uri, Predictor(DiscInstances(), spec, config))
    assert result.counts == {"Instance": len(xs)}
    found = np.array([(p["x"], p["y"]) for p in result.points])
    truth = np.column_stack([xs + 0.5, ys + 0.5])  # a symmetric disc's centroid: its centre pixel
    np.testing.assert_allclose(found[np.lexsort(found.T)], truth[np.lexsort(truth.T)], atol=1e-4)
    # the foreground map is stitched too: at 1 map px per slide px, exactly the discs' pixels
    assert result.areas_mm2["Foreground"] == pytest.approx(len(xs) * disc_px * (2.0 / 1000) ** 2)
    points = [f for f in result.geojson()["features"] if f["properties"]["objectType"] == "detection"]
    assert len(points) == len(xs)  # (each disc is under the least region area: no polygons)
    assert {f["properties"]["classification"]["name"] for f in points} == {"Instance"}
