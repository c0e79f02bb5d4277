"""Samplers are pure and seeded: seed -> expected coordinates, and the rules every tile obeys."""

from __future__ import annotations

import numpy as np
import pytest

from pathray.registry import RegistryError
from pathray.wsi.annotations.geometry import Polygon
from pathray.wsi.patching.samplers import (
    ClassBalancedSampler,
    RandomTissueSampler,
    SamplerConfig,
    SlideRegions,
    TissueGridSampler,
    build_sampler,
    rng_for,
)
from pathray.wsi.patching.tissue import TissueMask


def square(x0: float, y0: float, x1: float, y1: float) -> Polygon:
    return Polygon(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float))


@pytest.fixture
def slide() -> SlideRegions:
    m = np.zeros((64, 64), bool)
    m[16:48, 8:40] = True  # tissue: x 512..2560, y 1024..3072 in level-0 px
    regions = [(square(1000, 1000, 2000, 2000), "G4"), (square(600, 1100, 900, 2900), "Benign")]
    return SlideRegions("s1", 4096, 4096, 0.25, TissueMask(m, downsample=64.0, mpp=16.0), regions)


def test_random_tissue_expected_coordinates(slide):
    cfg = SamplerConfig(tiles_per_slide=4, mpps=[0.25, 0.5], size=128)
    tiles = RandomTissueSampler(cfg).sample(slide, rng_for(0, 0, 0, "s1"))
    assert [(t.x, t.y, t.mpp) for t in tiles] == [
        (672, 2791, 0.5),
        (1279, 997, 0.5),
        (1854, 1781, 0.25),
        (1282, 1824, 0.5),
    ]


def test_class_balanced_expected_coordinates(slide):
    cfg = SamplerConfig(tiles_per_slide=6, mpps=[0.25, 0.5], size=128, background_fraction=0.34)
    tiles = ClassBalancedSampler(cfg).sample(slide, rng_for(0, 0, 0, "s1"))
    assert [(t.x, t.y, t.mpp, t.label) for t in tiles] == [
        (718, 1223, 0.25, "Benign"),
        (1582, 1235, 0.5, "G4"),
        (579, 2469, 0.25, "Benign"),
        (1072, 1302, 0.25, "G4"),
        (1761, 2873, 0.5, "Background"),
        (2249, 2298, 0.25, "Background"),
    ]


def test_same_seed_same_stream_other_epoch_or_worker_differs(slide):
    sampler = RandomTissueSampler(SamplerConfig(tiles_per_slide=50))
    a = sampler.sample(slide, rng_for(7, 0, 0, "s1"))
    assert a == sampler.sample(slide, rng_for(7, 0, 0, "s1"))
    others = [rng_for(7, 1, 0, "s1"), rng_for(7, 0, 1, "s1"), rng_for(8, 0, 0, "s1"), rng_for(7, 0, 0, "s2")]
    for rng in others:
        b = sampler.sample(slide, rng)
        assert len({(t.x, t.y) for t in a} & {(t.x, t.y) for t in b}) < 3


def test_every_random_tile_has_enough_tissue_and_the_mpp_mix_follows_weights(slide):
    cfg = SamplerConfig(tiles_per_slide=2000, mpps=[0.25, 1.0], mpp_weights=[3, 1], min_tissue=0.8)
    tiles = RandomTissueSampler(cfg).sample(slide, rng_for(1))
    assert len(tiles) == 2000
    for t in tiles:
        e = slide.extent(t.size, t.mpp)
        assert slide.mask.fraction(t.x, t.y, e, e) >= 0.8
        assert 0 <= t.x <= slide.width - e and 0 <= t.y <= slide.height - e
    share = np.mean([t.mpp == 0.25 for t in tiles])
    assert 0.70 < share < 0.80


def test_class_balanced_labels_match_their_polygons(slide):
    cfg = SamplerConfig(tiles_per_slide=400, size=64, mpps=[0.25], background_fraction=0.25)
    tiles = ClassBalancedSampler(cfg).sample(slide, rng_for(3))
    labels = [t.label for t in tiles]
    assert labels.count("Background") == 100
    assert abs(labels.count("G4") - labels.count("Benign")) < 60  # balanced, though areas differ 2:1
    polys = dict((name, p) for p, name in slide.regions)
    for t in tiles:
        centre = np.array([[t.x + 32, t.y + 32]], float)
        if t.label == "Background":
            assert not any(p.contains(centre)[0] for p in polys.values())
        else:  # centres are rounded to whole pixels: within a pixel of the drawn point
            near = centre + np.array([[dx, dy] for dx in (-1, 0, 1) for dy in (-1, 0, 1)])
            assert polys[t.label].contains(near).any()


def test_slide_without_annotations_gives_background_tiles(slide):
    bare = SlideRegions("s2", slide.width, slide.height, slide.mpp, slide.mask)
    tiles = ClassBalancedSampler(SamplerConfig(tiles_per_slide=10)).sample(bare, rng_for(0))
    assert len(tiles) == 10 and {t.label for t in tiles} == {"Background"}


def test_grid_covers_tissue_with_overlap(slide):
    cfg = SamplerConfig(kind="grid", size=256, mpps=[0.5], overlap=0.5, min_tissue=0.5)
    tiles = build_sampler(cfg).sample(slide, None)
    # 512 px tiles every 256 px over tissue at x 512..2560, y 1024..3072: per axis 7 tiles fully in
    # tissue and one half-in at each end; 9 x 9 minus the 4 corners that are only a quarter in.
    assert len(tiles) == 77
    assert sorted({t.x for t in tiles}) == list(range(256, 2305, 256))
    assert sorted({t.y for t in tiles}) == list(range(768, 2817, 256))
    assert (256, 768) not in {(t.x, t.y) for t in tiles}
    assert isinstance(build_sampler(cfg), TissueGridSampler)


def test_empty_tissue_gives_no_tiles(slide):
    empty = SlideRegions("e", 1024, 1024, 0.25, TissueMask(np.zeros((8, 8), bool), 128.0, 32.0))
    assert RandomTissueSampler(SamplerConfig()).sample(empty, rng_for(0)) == []
    assert TissueGridSampler(SamplerConfig(kind="grid")).sample(empty) == []


def test_config_errors():
    with pytest.raises(ValueError, match="mpp_weights has 1 entries for 2 mpps"):
        SamplerConfig(mpps=[0.25, 0.5], mpp_weights=[1])
    with pytest.raises(RegistryError, match="known: class_balanced, grid, random_tissue"):
        build_sampler(SamplerConfig(kind="spiral"))
