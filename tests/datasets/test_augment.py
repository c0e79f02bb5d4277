"""Augmentations: targets follow the pixels (as each task spec moves them); colour changes within bounds."""

from __future__ import annotations

import numpy as np
import pytest

from pathray.datasets.augment import AugmentConfig, augment, hed_jitter, multicrop
from pathray.models.tasks import build_task

SPATIAL_ONLY = AugmentConfig(hed_sigma=0, brightness=0, contrast=0)


@pytest.mark.parametrize("seed", range(12))
def test_mask_and_points_follow_the_pixels(seed):

    size = 32
    image = np.zeros((size, size, 3), np.uint8)
    mask = np.zeros((size, size), np.uint8)
    points = np.full((3, 3), -1.0, np.float32)
    for k, (r, c) in enumerate([(3, 5), (20, 9), (30, 28)]):
        image[r, c] = 50 + 50 * k
        mask[r, c] = k + 1
        points[k] = (c + 0.5, r + 0.5, k)
    img_a, spatial = augment(image, SPATIAL_ONLY, np.random.default_rng(seed))
    mask_a = build_task({"name": "segmentation"}).follow(mask, spatial)
    pts_b = build_task({"name": "detection"}).follow(points, spatial)
    for k in range(3):
        r, c = np.argwhere(mask_a == k + 1)[0]
        assert img_a[r, c, 0] == 50 + 50 * k
        assert tuple(pts_b[k]) == (c + 0.5, r + 0.5, k)


def test_padding_rows_of_points_stay_padding():
    pts = np.array([[1.5, 2.5, 0], [-1, -1, -1]], np.float32)
    _, spatial = augment(np.zeros((8, 8, 3), np.uint8), SPATIAL_ONLY, np.random.default_rng(1))
    out = build_task({"name": "detection"}).follow(pts, spatial)
    assert (out[1] == -1).all()


def test_hed_jitter_changes_stained_colour_within_bounds_and_tints_white_only_slightly():
    # The stain shift (±sigma in HED optical density) tints glass too, as scanners do: white may
    # lose at most 255 * (1 - exp(-sigma * |row|_1)) per channel, a few grey levels for sigma 0.05.
    tile = np.full((16, 16, 3), (200, 120, 170), np.uint8)
    tile[:4] = 255
    white_shifts, stain_shifts = [], []
    for seed in range(20):
        out = hed_jitter(tile, 0.05, np.random.default_rng(seed))
        assert out.dtype == np.uint8 and out.shape == tile.shape
        white_shifts.append(np.abs(out[:4].astype(int) - 255).max())
        stain_shifts.append(np.abs(out[8:].astype(int) - tile[8:]).mean())
    assert max(white_shifts) <= 25 and min(stain_shifts) > 0 and max(stain_shifts) < 40
    assert max(white_shifts) > 0  # glass is not kept pure white: the shift is additive
    assert hed_jitter(tile, 0.0, np.random.default_rng(0)) is tile


def test_multicrop_views():
    cfg = AugmentConfig(global_crops=2, global_size=64, local_crops=3, local_size=24)
    views = multicrop(
        np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8), cfg, np.random.default_rng(0)
    )
    assert sorted(views) == ["global_0", "global_1", "local_0", "local_1", "local_2"]
    assert views["global_0"].shape == (64, 64, 3) and views["local_2"].shape == (24, 24, 3)
    assert not np.array_equal(views["global_0"], views["global_1"])
