"""Slides on the SeaweedFS endpoint (127.0.0.1): same pixels as local, read by small byte ranges."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pathray.storage import StorageConfig
from pathray.wsi.backends.errors import SlideAccessError, SlideNotFoundError
from pathray.wsi.backends.open import open_slide

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    from pathray.wsi.synth import SynthConfig, write_synthetic_slide

    path = tmp_path_factory.mktemp("synth") / "s3slide.svs"
    write_synthetic_slide(path, seed=5, config=SynthConfig(size=6144))
    return path


@pytest.fixture(scope="module")
def remote_uri(object_store, synthetic) -> str:
    return object_store.upload_file(synthetic, object_store.url_for("wsi-tests/s3slide.svs"))


def test_same_pixels_as_local(remote_uri, s3_storage, synthetic):
    remote = open_slide(remote_uri, s3_storage, cache=False)
    local = open_slide(synthetic, cache=False)
    assert remote.info() | {"uri": None} == local.info() | {"uri": None}
    for level in range(remote.level_count):
        ds = remote.level_downsamples[level]
        x, y = int(1500 / ds) * int(ds), int(2100 / ds) * int(ds)
        assert np.array_equal(remote.read_region(x, y, level, 300), local.read_region(x, y, level, 300))
    assert np.array_equal(remote.read(2000, 2000, 224, 0.5), local.read(2000, 2000, 224, 0.5))
    assert np.array_equal(remote.read(2000, 2000, 224, 0.7), local.read(2000, 2000, 224, 0.7))
    coords = [(1000 + 97 * i, 3000 - 53 * i) for i in range(16)]
    assert all(
        np.array_equal(a, b)
        for a, b in zip(remote.read_batch(coords, 224, 0.5), local.read_batch(coords, 224, 0.5), strict=True)
    )
    assert np.array_equal(remote.thumbnail(max_size=256), local.thumbnail(max_size=256))


def test_a_tile_read_fetches_only_its_tiles(remote_uri, s3_storage, synthetic):
    size = synthetic.stat().st_size
    # merge only touching ranges; header reads ahead by 64 KiB (this 8 MB slide has 4 IFDs far apart)
    exact = s3_storage.model_copy(update={"coalesce_gap": 0, "block_size": 65536})
    slide = open_slide(remote_uri, exact, cache=False, tile_cache=0)
    after_open = slide.bytes_read  # bytes fetched from the store, read-ahead included
    assert after_open < 0.05 * size, "opening parses headers; it must not download the slide"
    level = 1
    lv = slide._tiled[level]
    x0, y0 = 3 * lv.tile_w + 10, 4 * lv.tile_h + 10  # a 224 px region inside 4 tiles of level 1
    expected = sum(lv.bytecounts[i] for i in slide._tile_indices(lv, x0, y0, 224, 224))
    slide.read_region(x0 * 2, y0 * 2, level, 224)
    fetched = slide.bytes_read - after_open
    assert fetched == expected, "exactly the byte ranges of the touched tiles"
    assert fetched < 0.01 * size
    # with the default merging of nearby ranges, a read still fetches a small part of the slide
    merged = open_slide(remote_uri, s3_storage, cache=False, tile_cache=0)
    opened = merged.bytes_read
    merged.read_region(x0 * 2, y0 * 2, level, 224)
    assert expected <= merged.bytes_read - opened <= expected + 2 * s3_storage.coalesce_gap


def test_missing_key_and_bucket(object_store, s3_storage):
    with pytest.raises(SlideNotFoundError, match="no slide at s3://"):
        open_slide(object_store.url_for("wsi-tests/absent.svs"), s3_storage, cache=False)
    with pytest.raises(SlideNotFoundError):
        open_slide("s3://no-such-bucket-pathray/a.svs", s3_storage, cache=False)


def test_bucket_without_access(object_store, synthetic):
    object_store.ensure_bucket("pathray-private")
    uri = object_store.upload_file(synthetic, "s3://pathray-private/secret.svs")
    limited = object_store.storage_config("limited")
    with pytest.raises(SlideAccessError) as info:
        open_slide(uri, limited, cache=False)
    assert uri in str(info.value) and "access" in str(info.value).lower()


def test_anonymous_is_refused(object_store, remote_uri):
    anon = StorageConfig(endpoint_url=object_store.endpoint_url, anon=True)
    with pytest.raises(SlideAccessError):
        open_slide(remote_uri, anon, cache=False)


def test_openslide_only_format_goes_through_a_local_copy(object_store, s3_storage, testdata, tmp_path):
    object_store.upload_dir(testdata / "dicom/boxes", object_store.url_for("wsi-tests/dicom/boxes"))
    storage = s3_storage.model_copy(update={"cache_dir": str(tmp_path / "cache")})
    slide = open_slide(object_store.url_for("wsi-tests/dicom/boxes/boxes_0.dcm"), storage, cache=False)
    assert slide.backend == "openslide" and slide.vendor == "dicom"
    assert slide.dimensions == (16, 16) and slide.mpp == pytest.approx(0.499)
    copies = sorted(p.name for p in (tmp_path / "cache").rglob("*.dcm"))
    assert copies == ["boxes_0.dcm", "boxes_1.dcm"], "a DICOM slide is its whole folder"
    local = open_slide(testdata / "dicom/boxes/boxes_0.dcm", cache=False)
    assert np.array_equal(slide.read_region(0, 0, 0, 16), local.read_region(0, 0, 0, 16))


def test_presigned_and_filesystem_paths_read_the_same(remote_uri, s3_storage, synthetic):
    plain = s3_storage.model_copy(update={"presigned_reads": False})
    a = open_slide(remote_uri, s3_storage, cache=False, tile_cache=0)
    b = open_slide(remote_uri, plain, cache=False, tile_cache=0)
    coords = [(500 + 301 * i, 4000 - 211 * i) for i in range(12)]
    for x, y in zip(a.read_batch(coords, 256, 0.5), b.read_batch(coords, 256, 0.5), strict=True):
        assert np.array_equal(x, y)
    assert a._ranges._presigned is not None and b._ranges._presigned is None


def test_presigned_reads_report_access_and_missing(object_store, synthetic):
    from pathray.storage import parse_uri
    from pathray.wsi.backends import ByteCounter
    from pathray.wsi.backends.ranges import RangeReader

    object_store.ensure_bucket("pathray-private")
    uri = object_store.upload_file(synthetic, "s3://pathray-private/ranges.svs")
    limited = RangeReader(parse_uri(uri), object_store.storage_config("limited"), ByteCounter())
    with pytest.raises(SlideAccessError, match="HTTP 403"):
        limited.read_ranges([0], [16])
    admin = object_store.storage_config()
    assert RangeReader(parse_uri(uri), admin, ByteCounter()).read_ranges([0, 8], [4, 4]) == [
        synthetic.read_bytes()[0:4],
        synthetic.read_bytes()[8:12],
    ]
    missing = RangeReader(parse_uri(object_store.url_for("wsi-tests/gone.svs")), admin, ByteCounter())
    with pytest.raises(SlideNotFoundError, match="404"):
        missing.read_ranges([0], [16])
