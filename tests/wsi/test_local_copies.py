"""Local copies of OpenSlide-only slides from the SeaweedFS endpoint: one series, atomic, LRU-bounded."""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from pathray.storage import ObjectNotFoundError, StorageConfig, parse_uri
from pathray.wsi.backends import open_slide
from pathray.wsi.backends.openslide import local_copy

pytestmark = [pytest.mark.s3]

BOXES = ("boxes_0.dcm", "boxes_1.dcm")  # one DICOM slide: level 0 and its thumbnail, one series


def private_cache(s3_storage: StorageConfig, folder: Path, budget: int = 2**30) -> StorageConfig:
    return s3_storage.model_copy(update={"cache_dir": str(folder), "cache_max_bytes": budget})


def cache_total(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name != ".lock")


def upload_boxes(object_store, testdata: Path, prefix: str) -> str:
    """The DICOM pair under ``prefix``; the URI of its level-0 file."""
    for name in BOXES:
        object_store.upload_file(testdata / "dicom/boxes" / name, object_store.url_for(f"{prefix}/{name}"))
    return object_store.url_for(f"{prefix}/boxes_0.dcm")


def test_a_dicom_slide_copies_only_its_own_series(object_store, s3_storage, testdata, tmp_path):
    import pydicom
    from pydicom.uid import generate_uid

    # boxes_1 with a header longer than one 64 KiB read: its series is found by reading more
    long_head = pydicom.dcmread(testdata / "dicom/boxes/boxes_1.dcm")
    long_head.private_block(0x0011, "PATHRAY TEST", create=True).add_new(0x00, "OB", b"\0" * 100_000)
    long_head.save_as(tmp_path / "boxes_1.dcm")
    # the same thumbnail in another series, and a file that is not DICOM at all
    other = pydicom.dcmread(testdata / "dicom/boxes/boxes_1.dcm")
    other.SeriesInstanceUID, other.SOPInstanceUID = generate_uid(), generate_uid()
    other.save_as(tmp_path / "other_series.dcm")
    (tmp_path / "notes.txt").write_text("scanned twice\n")
    prefix = "copies/series"
    object_store.upload_file(
        testdata / "dicom/boxes/boxes_0.dcm", object_store.url_for(f"{prefix}/boxes_0.dcm")
    )
    for name in ("boxes_1.dcm", "other_series.dcm", "notes.txt"):
        object_store.upload_file(tmp_path / name, object_store.url_for(f"{prefix}/{name}"))

    storage = private_cache(s3_storage, tmp_path / "cache")
    slide = open_slide(object_store.url_for(f"{prefix}/boxes_0.dcm"), storage, backend="auto", cache=False)
    assert slide.backend == "openslide" and slide.vendor == "dicom"
    assert slide.dimensions == (16, 16) and slide.mpp == pytest.approx(0.499)
    assert slide.associated_images() == ["thumbnail"], "the series' thumbnail came along"
    copies = sorted(p.name for p in (tmp_path / "cache").glob("*/*"))
    assert copies == ["boxes_0.dcm", "boxes_1.dcm"], "the requested series and nothing else"
    local = open_slide(testdata / "dicom/boxes/boxes_0.dcm", cache=False)
    assert np.array_equal(slide.read_region(0, 0, 0, 16), local.read_region(0, 0, 0, 16))


def test_the_cache_keeps_to_its_budget_least_recently_used_first(
    object_store, s3_storage, testdata, tmp_path
):
    entry = sum((testdata / "dicom/boxes" / name).stat().st_size for name in BOXES)
    budget = int(2.5 * entry)
    storage = private_cache(s3_storage, tmp_path / "cache", budget)
    uris = {k: upload_boxes(object_store, testdata, f"copies/lru-{k}") for k in "abcd"}
    paths: dict[str, Path] = {}

    def copy(name: str) -> None:
        paths[name] = Path(local_copy(parse_uri(uris[name]), storage))
        assert paths[name].is_file() and (paths[name].parent / "boxes_1.dcm").is_file()
        assert cache_total(tmp_path / "cache") <= budget

    def kept() -> set[str]:
        return {name for name, path in paths.items() if path.exists()}

    copy("a")
    copy("b")
    assert kept() == {"a", "b"}
    inode = paths["a"].stat().st_ino
    copy("a")  # a hit: the same file, now the most recently used
    assert paths["a"].stat().st_ino == inode
    copy("c")
    assert kept() == {"a", "c"}, "b was the least recently used"
    copy("d")
    assert kept() == {"c", "d"}
    slide = open_slide(uris["d"], storage, backend="openslide", cache=False)
    assert slide.dimensions == (16, 16)


def test_a_copy_larger_than_the_budget_is_kept_alone(object_store, s3_storage, testdata, tmp_path, caplog):
    storage = private_cache(s3_storage, tmp_path / "cache", budget=1000)
    first = Path(local_copy(parse_uri(upload_boxes(object_store, testdata, "copies/big-a")), storage))
    with caplog.at_level(logging.WARNING, logger="pathray.wsi.backends.copies"):
        second = Path(local_copy(parse_uri(upload_boxes(object_store, testdata, "copies/big-b")), storage))
    assert second.read_bytes() == (testdata / "dicom/boxes/boxes_0.dcm").read_bytes()
    assert not first.exists()
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name != ".lock"] == [second.parent.name]
    assert "exceeds the slide cache budget" in caplog.text and "copies/big-b" in caplog.text


def test_concurrent_copies_of_one_slide_are_atomic(object_store, s3_storage, testdata, tmp_path):
    source = testdata / "aperio/CMU-1-Small-Region.svs"
    uri = object_store.upload_file(source, object_store.url_for("copies/atomic/CMU-1-Small-Region.svs"))
    storage = private_cache(s3_storage, tmp_path / "cache")
    start = threading.Barrier(8)

    def copy(_: int) -> str:
        start.wait()
        return local_copy(parse_uri(uri), storage)

    with ThreadPoolExecutor(8) as pool:
        paths = set(pool.map(copy, range(8)))
    assert len(paths) == 1
    assert Path(paths.pop()).read_bytes() == source.read_bytes()
    assert [p.name for p in (tmp_path / "cache").iterdir() if ".partial" in p.name] == []
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 1


def test_abandoned_partial_copies_are_removed(object_store, s3_storage, testdata, tmp_path):
    cache = tmp_path / "cache"
    stale, fresh = cache / "0123.partial-99-dead", cache / "4567.partial-98-beef"
    for folder in (stale, fresh):
        folder.mkdir(parents=True)
        (folder / "boxes_0.dcm").write_bytes(b"half")
    two_hours_ago = time.time() - 7200
    for path in (stale / "boxes_0.dcm", stale):
        os.utime(path, (two_hours_ago, two_hours_ago))
    local_copy(
        parse_uri(upload_boxes(object_store, testdata, "copies/partial")), private_cache(s3_storage, cache)
    )
    assert not stale.exists() and fresh.exists(), "only the copy untouched for an hour is abandoned"


def test_mrxs_and_vms_bring_their_companions(object_store, s3_storage, tmp_path):
    files = {
        "mrxs/slide.mrxs": b"index",
        "mrxs/slide/Slidedat.ini": b"[GENERAL]",
        "mrxs/slide/Data0000.dat": b"tiles",
        "mrxs/unrelated.txt": b"-",
        "vms/a.vms": b"[Virtual Microscope Specimen]",
        "vms/a.jpg": b"jpeg",
        "vms/a.opt": b"optimisation",
    }
    for key, data in files.items():
        (tmp_path / "src").mkdir(exist_ok=True)
        local = tmp_path / "src" / key.replace("/", "_")
        local.write_bytes(data)
        object_store.upload_file(local, object_store.url_for(f"copies/{key}"))
    storage = private_cache(s3_storage, tmp_path / "cache")

    def copied(name: str) -> dict[str, bytes]:
        folder = Path(local_copy(parse_uri(object_store.url_for(f"copies/{name}")), storage)).parent
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    assert copied("mrxs/slide.mrxs") == {
        "slide.mrxs": b"index",
        "slide/Slidedat.ini": b"[GENERAL]",
        "slide/Data0000.dat": b"tiles",
    }
    assert copied("vms/a.vms") == {"a.vms": files["vms/a.vms"], "a.jpg": b"jpeg", "a.opt": b"optimisation"}


def test_a_missing_slide_is_a_storage_error_naming_it(object_store, s3_storage, tmp_path):
    uri = object_store.url_for("copies/absent/x.dcm")
    with pytest.raises(ObjectNotFoundError, match="copies/absent/x.dcm"):
        local_copy(parse_uri(uri), private_cache(s3_storage, tmp_path / "cache"))
