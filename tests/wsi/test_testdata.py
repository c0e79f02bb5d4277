"""Every file in shared/testdata/slides opens (or fails) as its SOURCES.md says."""

from __future__ import annotations

import pytest

from pathray.wsi.backends.errors import SlideError, SlideFormatError, SlideReadError
from pathray.wsi.backends.open import open_slide

# path, backend, vendor, dimensions, level_count, mpp (None: absent or meaningless), associated images
READABLE = [
    (
        "aperio/CMU-1-Small-Region.svs",
        "tiffslide",
        "aperio",
        (2220, 2967),
        1,
        0.499,
        {"label", "macro", "thumbnail"},
    ),
    ("aperio/tcga-cr-7395-01a-01-ts1.svs", "tiffslide", "aperio", (4443, 3567), 2, None, {"thumbnail"}),
    ("aperio/small.svs", "tiffslide", "aperio", (16, 16), 1, 0.499, {"thumbnail"}),
    ("aperio/unicode-name/😐.svs", "tiffslide", "aperio", (16, 16), 1, 0.499, {"thumbnail"}),
    ("generic-tiff/boxes.tiff", "tiffslide", "generic-tiff", (300, 250), 4, None, set()),
    ("generic-tiff/yb10kx5k.zstd.tiff", "tiffslide", "generic-tiff", (10000, 5000), 5, None, set()),
    ("generic-tiff/small_la.tiff", "tiffslide", "generic-tiff", (2, 1), 1, None, set()),
    (
        "hamamatsu-ndpi/test3-DAPI-2-(387).ndpi",
        "tiffslide",
        "hamamatsu",
        (3968, 4864),
        4,
        0.2282,
        {"macro", "map"},
    ),
    ("dicom/boxes/boxes_0.dcm", "openslide", "dicom", (16, 16), 1, 0.499, {"thumbnail"}),
    ("dicom/boxes/boxes_1.dcm", "openslide", "dicom", (16, 16), 1, 0.499, {"thumbnail"}),
    ("plain-tiff/kidney-48-5.tif", "tiffslide", "generic-tiff", (1493, 901), 1, None, set()),
    ("plain-tiff/grey10kx5k.tif", "tiffslide", "generic-tiff", (10000, 5000), 1, None, set()),
]

# path, error type, words the message must contain
FAILING = [
    ("broken/unopenable.tiff", SlideReadError, "52479"),
    ("broken/unreadable.svs", SlideReadError, "Bogus marker length"),
    ("broken/broken.svs", SlideFormatError, "not a TIFF"),
    ("broken/notanimage.txt", SlideFormatError, "first bytes 0x54686973"),
    ("broken/zero_gi.tif", SlideFormatError, "ZeroDivisionError"),
    ("broken/boxes.png", SlideFormatError, "0x89504e47"),
    ("broken/dicom-wg26-bpaec-partial/10_0", SlideFormatError, "PlanarConfiguration"),
    ("broken/dicom-wg26-bpaec-partial/11_0", SlideFormatError, "PlanarConfiguration"),
    ("broken/dicom-wg26-bpaec-partial/12_0", SlideFormatError, "PlanarConfiguration"),
    ("other-formats/4D-series.ome.tiff", SlideFormatError, "series.ndim"),
    ("other-formats/olympus-vsi/vsi-ets-test-jpg2k.vsi", SlideFormatError, "VSI is not supported"),
    ("other-formats/olympus-vsi/_vsi-ets-test-jpg2k_/stack1/frame_t_0.ets", SlideFormatError, "ETS"),
]


@pytest.mark.parametrize(("rel", "backend", "vendor", "dims", "levels", "mpp", "assoc"), READABLE)
def test_readable_slides_match_sources(testdata, rel, backend, vendor, dims, levels, mpp, assoc):
    slide = open_slide(testdata / rel, cache=False)
    assert slide.backend == backend
    assert slide.vendor == vendor
    assert slide.dimensions == dims
    assert slide.level_count == levels
    assert slide.level_downsamples[0] == 1.0
    if mpp is None:
        assert slide.mpp is None
    else:
        assert slide.mpp == pytest.approx(mpp, abs=1e-3)
    assert set(slide.associated_images()) == assoc
    slide.check()
    lw, lh = slide.level_dimensions[-1]
    region = slide.read_region(0, 0, slide.level_count - 1, (min(lw, 64), min(lh, 64)))
    assert region.shape == (min(lh, 64), min(lw, 64), 3)
    assert region.dtype.name == "uint8"
    slide.close()


@pytest.mark.parametrize(("rel", "error", "words"), FAILING)
def test_broken_files_fail_clearly(testdata, rel, error, words):
    path = testdata / rel
    with pytest.raises(SlideError) as info:
        slide = open_slide(path, cache=False)
        slide.check()
    exc = info.value
    assert isinstance(exc, error), f"{type(exc).__name__}: {exc}"
    assert exc.uri == str(path)
    assert str(path) in str(exc)
    assert words in str(exc)


def test_mpp_override_wins(testdata):
    slide = open_slide(testdata / "aperio/tcga-cr-7395-01a-01-ts1.svs", mpp=0.5, cache=False)
    assert slide.mpp == 0.5
    assert slide.level_mpps == pytest.approx((0.5, 0.5 * slide.level_downsamples[1]))
    # 1 µm/px lies between level 0 (0.5) and level 1 (~1.0002): level 1 is read as is
    assert slide.read(1000, 1000, 64, mpp=1.0).shape == (64, 64, 3)


def test_read_by_mpp_needs_an_mpp(testdata):
    slide = open_slide(testdata / "aperio/tcga-cr-7395-01a-01-ts1.svs", cache=False)
    with pytest.raises(SlideReadError, match="no usable mpp"):
        slide.read(0, 0, 32, mpp=0.5)


def test_tiffslide_and_openslide_agree_on_pixels(testdata):
    path = testdata / "aperio/CMU-1-Small-Region.svs"
    a = open_slide(path, backend="tiffslide", cache=False).read_region(700, 900, 0, (300, 200))
    b = open_slide(path, backend="openslide", cache=False).read_region(700, 900, 0, (300, 200))
    assert a.shape == b.shape == (200, 300, 3)
    # both decode the same JPEG tiles; libjpeg variants differ by a grey level at most on average
    assert abs(a.astype(int) - b.astype(int)).mean() < 2.0


def test_regions_outside_the_slide_read_as_glass(testdata):
    slide = open_slide(testdata / "aperio/small.svs", cache=False)
    region = slide.read_region(8, 8, 0, 32)
    assert (region[8:, :] == 255).all() and (region[:, 8:] == 255).all()


def test_grey_and_alpha_become_rgb(testdata):
    grey = open_slide(testdata / "plain-tiff/grey10kx5k.tif", cache=False).read_region(5000, 2500, 0, 16)
    assert grey.shape == (16, 16, 3)
    assert (grey[..., 0] == grey[..., 1]).all()
    la = open_slide(testdata / "generic-tiff/small_la.tiff", cache=False).read_region(0, 0, 0, (2, 1))
    assert la.shape == (1, 2, 3)


def test_thumbnail_of_a_huge_single_level_image_is_small(testdata):
    slide = open_slide(testdata / "plain-tiff/grey10kx5k.tif", cache=False)
    thumb = slide.thumbnail(max_size=500)
    assert thumb.shape == (250, 500, 3)
