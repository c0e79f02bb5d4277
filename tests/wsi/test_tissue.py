"""Tissue masks: Otsu on saturation, scale-aware fractions, caching per slide version."""

from __future__ import annotations

import numpy as np
import pytest

from pathray.wsi.backends.open import open_slide
from pathray.wsi.patching.tissue import TissueConfig, TissueMask, otsu_threshold, segment_tissue, tissue_mask


def test_otsu_splits_two_populations():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.1, 0.02, 5000), rng.normal(0.6, 0.05, 5000)]).clip(0, 1)
    t = otsu_threshold(values)
    assert 0.15 < t < 0.45  # anywhere in the empty gap maximises the between-class variance
    assert ((values > t) == (np.arange(10000) >= 5000)).all()


def test_segment_tissue_finds_a_pink_disc_on_glass():
    img = np.full((200, 300, 3), 242, np.uint8)
    yy, xx = np.mgrid[:200, :300]
    disc = (yy - 100) ** 2 + (xx - 150) ** 2 < 60**2
    img[disc] = (220, 140, 190)
    img[5:8, 5:8] = (120, 60, 140)  # a speck of dust: too small to be tissue
    mask = segment_tissue(img, mpp=8.0, config=TissueConfig())
    assert mask[disc].mean() > 0.97
    assert mask[~disc].mean() < 0.01


def test_fraction_is_in_level0_pixels_and_weights_partial_pixels():
    m = np.zeros((10, 10), bool)
    m[:, :5] = True  # left half is tissue
    mask = TissueMask(m, downsample=16.0, mpp=4.0)
    assert mask.fraction(0, 0, 160, 160) == pytest.approx(0.5)
    assert mask.fraction(0, 0, 80, 160) == pytest.approx(1.0)
    assert mask.fraction(80, 0, 80, 160) == pytest.approx(0.0)
    assert mask.fraction(72, 0, 16, 16) == pytest.approx(0.5)  # straddles the edge by half
    assert mask.fraction(4, 4, 8, 8) == pytest.approx(1.0)  # inside one mask pixel
    assert mask.fraction(-160, 0, 320, 160) == pytest.approx(0.25)  # half outside the slide: glass
    assert mask.fraction(10_000, 0, 16, 16) == 0.0
    # a large, unaligned box: interior by the summed-area table, fractional edges by hand
    assert mask.fraction(8, 8, 96, 144) == pytest.approx((80 - 8) / 96)


@pytest.mark.parametrize("seed", range(4))
def test_fractions_of_many_boxes_equal_fraction_of_each(seed):
    """The grid's vectorised fractions are the scalar ones, bit for bit: unaligned, partly outside,
    smaller than a mask pixel, and off the slide."""
    rng = np.random.default_rng(seed)
    for _ in range(25):
        mask = TissueMask(
            rng.random(rng.integers(1, 50, 2)) < rng.random(), float(rng.choice([1, 3.5, 16])), None
        )
        h, w = mask.shape
        xs = rng.integers(-300, int(w * mask.downsample) + 50, 200)
        ys = rng.integers(-300, int(h * mask.downsample) + 50, 200)
        bw, bh = rng.uniform(0.5, 400, 2)
        want = [mask.fraction(int(x), int(y), bw, bh) for x, y in zip(xs, ys, strict=True)]
        assert np.array_equal(mask.fractions(xs, ys, bw, bh), want)
    m = np.zeros((10, 10), bool)
    m[:, :5] = True
    half = TissueMask(m, downsample=16.0, mpp=4.0)
    assert half.fractions(np.array([0, 72, 8, 10_000]), np.array([0, 0, 8, 0]), 96, 144).tolist() == [
        pytest.approx(80 / 96),
        pytest.approx(8 / 96),
        pytest.approx((80 - 8) / 96),
        0.0,
    ]


def test_real_slide_mask_has_its_scale(testdata):
    slide = open_slide(testdata / "aperio/CMU-1-Small-Region.svs", cache=False)
    mask = tissue_mask(slide)
    assert 8.0 <= mask.mpp <= 16.0
    assert mask.downsample == pytest.approx(mask.mpp / 0.499, rel=0.01)
    w, h = slide.dimensions
    assert 0.2 < mask.fraction(0, 0, w, h) < 0.6  # a strip of skin on glass
    # the glass at the top-right corner and the left edge is not tissue; the dense lower middle is
    assert mask.fraction(w - 300, 0, 300, 300) < 0.05
    assert mask.fraction(0, 1500, 300, 300) < 0.05
    assert mask.fraction(900, 2100, 300, 300) > 0.9
    assert tissue_mask(slide) is mask  # cached


def test_mask_without_mpp_uses_max_size(testdata):
    slide = open_slide(testdata / "aperio/tcga-cr-7395-01a-01-ts1.svs", cache=False)
    mask = tissue_mask(slide, TissueConfig(max_size=512))
    assert mask.mpp is None
    assert max(mask.shape) == 512
    assert 0.4 < mask.tissue_fraction_total < 0.9


def test_masks_are_cached_on_disk_per_slide_version(testdata, tmp_path):
    import shutil

    from pathray.wsi.patching.tissue import TissueMaskCache

    path = tmp_path / "cmu.svs"
    shutil.copyfile(testdata / "aperio/CMU-1-Small-Region.svs", path)
    cache = TissueMaskCache(directory=tmp_path / "masks")
    first = cache.get(open_slide(path, cache=False))
    files = list((tmp_path / "masks").glob("*.npz"))
    assert len(files) == 1
    # a new process (a fresh cache object) reads the file instead of computing again
    again = TissueMaskCache(directory=tmp_path / "masks").get(open_slide(path, cache=False))
    assert (
        np.array_equal(again.mask, first.mask)
        and again.downsample == first.downsample
        and again.mpp == first.mpp
    )
    # a changed object (new size/mtime) gets a new mask
    with open(path, "ab") as fh:
        fh.write(b"\0" * 16)
    TissueMaskCache(directory=tmp_path / "masks").get(open_slide(path, cache=False))
    assert len(list((tmp_path / "masks").glob("*.npz"))) == 2
