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


@pytest.fixture(scope="module")
def stained(testdata) -> np.ndarray:
    """Tiles cut from a real H&E slide (CMU-1-Small-Region), so stain jitter meets real stain."""
    import tifffile

    level = tifffile.imread(testdata / "aperio" / "CMU-1-Small-Region.svs", key=0)
    return np.stack([level[300 + 150 * i :, 400 + 170 * i :][:96, :96] for i in range(8)])


@pytest.mark.parametrize(
    "config",
    [
        AugmentConfig(),
        AugmentConfig(hed_sigma=0.0),
        AugmentConfig(brightness=0.0, contrast=0.0, hed_sigma=0.2),
        AugmentConfig(flips=False, rot90=False, brightness=0.3, contrast=0.0),
    ],
    ids=["default", "no-hed", "hed-only", "brightness-only"],
)
def test_augment_on_the_device_equals_the_readers(config, stained):
    """Drawn once on the reader, applied where the tile is decoded (torch): the same tile as numpy's."""
    import torch

    from pathray.datasets.augment import TileAugment, apply_augment, augment_tiles, draw_augment

    tiles = stained
    rng = np.random.default_rng(3)
    draws = [draw_augment(config, rng, tiles.shape[1]) for _ in tiles]
    assert len({(d.spatial.flip_x, d.spatial.flip_y, d.spatial.turns) for d in draws}) > (
        2 if config.flips else 0
    )
    vectors = np.stack([d.vector() for d in draws])
    assert all(np.array_equal(TileAugment.from_vector(v, tiles.shape[1]).vector(), v) for v in vectors)
    want = np.stack([apply_augment(t, d) for t, d in zip(tiles, draws, strict=True)])
    got = augment_tiles(torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous(), vectors).permute(0, 2, 3, 1)
    diff = np.abs(got.numpy().astype(int) - want.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())
    assert (want != tiles).any()  # something was augmented


def test_augment_draws_as_before(stained):
    """``augment`` is ``draw_augment`` then ``apply_augment``: the stream cuts the tiles it cut before."""
    from pathray.datasets.augment import apply_augment, draw_augment

    tile = stained[0]
    config = AugmentConfig(hed_sigma=0.1, brightness=0.2, contrast=0.2)
    image, spatial = augment(tile, config, np.random.default_rng(11))
    draw = draw_augment(config, np.random.default_rng(11), tile.shape[0])
    assert draw.spatial == spatial and np.array_equal(apply_augment(tile, draw), image)
