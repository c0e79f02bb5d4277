"""Self-supervised multi-crop (DINOv2's odds, Midnight's HED jitter) and Midnight's HSV tile filter."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from pathray.datasets.augment import (
    AugmentConfig,
    hsv_tile_ok,
    local_size_for_patch,
    multicrop,
    opencv_hsv,
    random_resized_crop,
)

SMALL = {"global_size": 64, "local_size": 32, "local_crops": 3}
# every odds off: a view is its random resized crop and nothing else
OFF = AugmentConfig(
    **SMALL,
    hflip_p=0,
    vflip_p=0,
    hed_p=0,
    jitter_p=0,
    grayscale_p=0,
    global_blur_p=(0, 0),
    local_blur_p=0,
    global_solarize_p=(0, 0),
)


def he_tile(size: int = 128, seed: int = 0) -> np.ndarray:
    """Pink eosin stroma with purple haematoxylin nuclei and a little noise, as an H&E tile looks."""
    rng = np.random.default_rng(seed)
    tile = np.empty((size, size, 3), np.float32)
    tile[:] = (235, 160, 205)
    yy, xx = np.mgrid[:size, :size]
    for cy, cx, r in rng.uniform((0, 0, 3), (size, size, 8), (40, 3)):
        tile[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = (120, 70, 160)
    tile += rng.normal(0, 6, tile.shape)
    return np.clip(tile, 0, 255).astype(np.uint8)


def views(config: AugmentConfig, seed: int = 0, tile: np.ndarray | None = None) -> dict[str, np.ndarray]:
    return multicrop(he_tile() if tile is None else tile, config, np.random.default_rng(seed))


def high_frequency(image: np.ndarray) -> float:
    """Mean absolute difference between horizontal neighbours: what a blur takes away."""
    return float(np.abs(np.diff(image.astype(np.float32), axis=1)).mean())


def test_defaults_are_dinov2s():
    cfg = AugmentConfig()
    assert (cfg.global_size, cfg.global_scale, cfg.local_size, cfg.local_scale) == (
        224,
        (0.32, 1.0),
        96,
        (0.05, 0.32),
    )
    assert (cfg.hflip_p, cfg.jitter_p, cfg.grayscale_p) == (0.5, 0.8, 0.2)
    assert (cfg.jitter_brightness, cfg.jitter_contrast, cfg.jitter_saturation, cfg.jitter_hue) == (
        0.4,
        0.4,
        0.2,
        0.1,
    )
    assert (cfg.global_blur_p, cfg.local_blur_p, cfg.blur_sigma) == ((1.0, 0.1), 0.5, (0.1, 2.0))
    assert (cfg.global_solarize_p, cfg.solarize_threshold, cfg.crop_resample) == ((0.0, 0.2), 128, "bicubic")
    assert cfg.hed_p == 0.0 and cfg.hsv_filter is False


def test_odds_outside_zero_to_one_are_refused():
    with pytest.raises(ValidationError, match="jitter_p"):
        AugmentConfig(jitter_p=1.5)
    with pytest.raises(ValidationError, match="global_blur_p"):
        AugmentConfig(global_blur_p=(1.0, -0.1))


@pytest.mark.parametrize(
    ("settings", "sizes"),
    [
        ({}, (224, 96)),
        ({"global_crops": 1, "local_crops": 8, "local_size": 98}, (224, 98)),
        (SMALL, (64, 32)),
    ],
)
def test_views_have_the_configured_count_size_and_dtype(settings, sizes):
    cfg = AugmentConfig(**settings)
    out = views(cfg, tile=he_tile(256))
    names = [f"global_{i}" for i in range(cfg.global_crops)] + [f"local_{i}" for i in range(cfg.local_crops)]
    assert list(out) == names
    for name, view in out.items():
        side = sizes[0] if name.startswith("global") else sizes[1]
        assert view.shape == (side, side, 3) and view.dtype == np.uint8 and view.flags.c_contiguous


def test_same_seed_same_views_other_seed_other_views():
    cfg = AugmentConfig(**SMALL)
    a, b, c = views(cfg, 3), views(cfg, 3), views(cfg, 4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not any(np.array_equal(a[k], c[k]) for k in a)


def test_with_every_odds_off_a_view_is_a_plain_resized_crop():
    tile = he_tile()
    rng = np.random.default_rng(5)
    out = views(OFF, 5, tile)
    for name, view in out.items():
        size, scale = (64, OFF.global_scale) if name.startswith("global") else (32, OFF.local_scale)
        assert np.array_equal(view, random_resized_crop(tile, size, scale, rng, Image.Resampling.BICUBIC))


def test_flips_mirror_every_view():
    plain = views(OFF, 1)
    for key, flip in (("hflip_p", lambda v: v[:, ::-1]), ("vflip_p", lambda v: v[::-1])):
        flipped = views(OFF.model_copy(update={key: 1.0}), 1)
        assert all(np.array_equal(flipped[k], flip(plain[k])) for k in plain)


def test_grayscale_odds_one_greys_every_view_and_zero_none():
    grey = views(AugmentConfig(**SMALL, grayscale_p=1.0))
    assert all((v[..., 0] == v[..., 1]).all() and (v[..., 1] == v[..., 2]).all() for v in grey.values())
    colour = views(OFF)
    assert not any((v[..., 0] == v[..., 2]).all() for v in colour.values())


def test_solarisation_inverts_bright_values_of_the_second_global_view_only():
    plain = views(AugmentConfig(**SMALL, global_solarize_p=(0.0, 0.0)), 2)
    solar = views(AugmentConfig(**SMALL, global_solarize_p=(0.0, 1.0)), 2)
    g = plain["global_1"]
    assert (g >= 128).any() and (g < 128).any()
    assert np.array_equal(solar["global_1"], np.where(g >= 128, 255 - g, g))
    assert all(np.array_equal(plain[k], solar[k]) for k in plain if k != "global_1")


def test_blur_odds_one_takes_away_high_frequencies():
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    sharp = views(OFF, tile=noise)
    blur = OFF.model_copy(update={"global_blur_p": (1.0, 1.0), "local_blur_p": 1.0, "blur_sigma": (1.0, 2.0)})
    blurred = views(blur, tile=noise)
    # the first view is the same crop in both; later ones differ (each blur draws its sigma)
    assert high_frequency(blurred["global_0"]) < 0.8 * high_frequency(sharp["global_0"])
    for k in sharp:
        assert high_frequency(blurred[k]) < high_frequency(sharp[k])


def test_colour_jitter_odds_one_changes_colour():
    jittered = views(OFF.model_copy(update={"jitter_p": 1.0}))
    assert not np.array_equal(jittered["global_0"], views(OFF)["global_0"])


def test_hed_jitter_applies_with_hed_p_one_and_not_with_zero():
    plain = views(OFF)
    assert all(np.array_equal(v, plain[k]) for k, v in views(OFF.model_copy(update={"hed_p": 0.0})).items())
    stained = views(OFF.model_copy(update={"hed_p": 1.0, "hed_sigma": 0.1}))
    shift = np.abs(stained["global_0"].astype(int) - plain["global_0"]).mean()
    assert 0 < shift < 40


@pytest.mark.parametrize(("patch", "size"), [(16, 96), (14, 98), (8, 96), (32, 96), (12, 96), (10, 100)])
def test_local_size_for_patch(patch, size):
    assert local_size_for_patch(patch) == size and size % patch == 0


def test_local_size_for_patch_refuses_a_nonpositive_patch():
    with pytest.raises(ValueError, match="positive"):
        local_size_for_patch(0)


def test_opencv_hsv_matches_opencv():
    # reference values from cv2.cvtColor(..., cv2.COLOR_RGB2HSV) (opencv-python-headless 5.1.0)
    rgb = [
        (255, 255, 255),
        (0, 0, 0),
        (235, 160, 205),
        (120, 70, 160),
        (40, 140, 60),
        (30, 60, 160),
        (220, 120, 110),
    ]
    want = [
        (0, 0, 255),
        (0, 0, 0),
        (162, 81, 235),
        (137, 143, 160),
        (66, 182, 140),
        (113, 207, 160),
        (3, 128, 220),
    ]
    assert opencv_hsv(np.array([rgb], np.uint8)).tolist() == [[list(w) for w in want]]


FILTER = AugmentConfig(hsv_filter=True)


def test_hsv_filter_keeps_stained_tissue():
    assert hsv_tile_ok(he_tile(224), FILTER)


@pytest.mark.parametrize(
    "colour",
    [(245, 245, 245), (255, 255, 255), (0, 0, 0), (40, 40, 50), (40, 140, 60)],
    ids=["glass", "white", "black", "black-ink", "green-ink"],
)
def test_hsv_filter_rejects_background_and_marks(colour):
    tile = np.full((224, 224, 3), colour, np.uint8)
    assert not hsv_tile_ok(tile, FILTER)
    assert hsv_tile_ok(tile, AugmentConfig())  # filter off: every tile passes


def test_hsv_filter_needs_more_than_the_minimum_tissue_fraction():
    tile = he_tile(100)
    assert hsv_tile_ok(tile, FILTER)
    tile[:40] = 250  # 60% tissue: not more than 0.6
    assert not hsv_tile_ok(tile, FILTER)
    assert hsv_tile_ok(tile, FILTER.model_copy(update={"hsv_min_fraction": 0.5}))
