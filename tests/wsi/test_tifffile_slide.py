"""The tifffile backend: the tiffslide backend's metadata and pixels, with neither tiffslide, zarr nor
imagecodecs installed (what a slim GPU worker has: benchmarks/wsi_inference.py --gpu)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pathray.wsi.backends.errors import SlideFormatError
from pathray.wsi.backends.open import open_slide

SLIDES = [
    "aperio/CMU-1-Small-Region.svs",  # Aperio JPEG, RGB components, shared JPEGTables, MPP in the description
    "aperio/tcga-cr-7395-01a-01-ts1.svs",  # Aperio JPEG 2000, two levels, no MPP
    "generic-tiff/yb10kx5k.zstd.tiff",  # zstd pyramid in SubIFDs
    "generic-tiff/boxes.tiff",  # deflate with a predictor
    "plain-tiff/kidney-48-5.tif",  # stripped, no tiles: read whole
]


def assert_same_slide(path: Path, **kwargs: object) -> None:
    ours = open_slide(path, backend="tifffile", cache=False, **kwargs)
    theirs = open_slide(path, backend="tiffslide", cache=False, **kwargs)
    assert ours.backend == "tifffile"
    assert (ours.vendor, ours.mpp) == (theirs.vendor, theirs.mpp)
    assert ours.level_dimensions == theirs.level_dimensions
    assert ours.level_downsamples == theirs.level_downsamples
    for level in range(ours.level_count):
        w, h = ours.level_dimensions[level]
        ds = ours.level_downsamples[level]
        for fx, fy, size in [(0.0, 0.0, (257, 130)), (0.37, 0.52, (300, 211)), (0.9, 0.9, (400, 400))]:
            x, y = int(fx * w * ds), int(fy * h * ds)  # the last box runs over the edge: glass outside
            np.testing.assert_array_equal(
                ours.read_region(x, y, level, size), theirs.read_region(x, y, level, size)
            )


@pytest.mark.parametrize("name", SLIDES)
def test_metadata_and_pixels_equal_the_tiffslide_backend(testdata, name):
    assert_same_slide(testdata / name, **({"mpp": 0.5} if "kidney" in name else {}))


def test_synthetic_slides_and_batches_equal_the_tiffslide_backend(tmp_path):
    from pathray.wsi.synth import SynthConfig, write_synthetic_slide

    path = write_synthetic_slide(tmp_path / "s.svs", seed=2, config=SynthConfig(size=2048, tile=256)).path
    assert_same_slide(path)
    ours, theirs = open_slide(path, backend="tifffile"), open_slide(path)
    coords = [(37 + 211 * i, 1700 - 173 * i) for i in range(8)]
    for mpp in (0.25, 0.5, 0.7):
        for a, b in zip(ours.read_batch(coords, 224, mpp), theirs.read_batch(coords, 224, mpp), strict=True):
            np.testing.assert_array_equal(a, b)


def test_ndpi_is_refused_by_name(testdata):
    ndpi = next((testdata / "hamamatsu-ndpi").glob("*.ndpi"))
    with pytest.raises(SlideFormatError, match="NDPI needs the tiffslide backend"):
        open_slide(ndpi, backend="tifffile", cache=False)


def test_reads_without_tiffslide_zarr_or_imagecodecs(testdata):
    """JPEG tiles decode through PIL when imagecodecs is missing: the same pixels."""
    path = testdata / "aperio" / "CMU-1-Small-Region.svs"
    code = (
        "import sys\n"
        "for name in ('tiffslide', 'zarr', 'imagecodecs', 'openslide', 'ray'): sys.modules[name] = None\n"
        "from pathray.wsi.backends.open import open_slide\n"
        f"slide = open_slide({str(path)!r}, backend='tifffile')\n"
        "sys.stdout.buffer.write(slide.read_region(300, 500, 0, (256, 192)).tobytes())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, timeout=120)
    want = open_slide(path, backend="tiffslide", cache=False).read_region(300, 500, 0, (256, 192))
    assert out.stdout == want.tobytes()


@pytest.mark.s3
def test_remote_slides_are_read_by_range(object_store, s3_storage, testdata):
    local = testdata / "aperio" / "CMU-1-Small-Region.svs"
    uri = object_store.upload_file(local, object_store.url_for("wsi-tests/tifffile-cmu.svs"))
    remote = open_slide(uri, s3_storage, backend="tifffile", cache=False)
    before = remote.bytes_read
    got = remote.read_region(500, 700, 0, (400, 300))
    assert 0 < remote.bytes_read - before < local.stat().st_size / 4  # a few tiles, not the file
    np.testing.assert_array_equal(got, open_slide(local, cache=False).read_region(500, 700, 0, (400, 300)))
