"""The tile stream on a real local Ray: rows, targets, S3 = local, faults counted, epochs differ."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pathray.datasets.config import StreamConfig
from pathray.datasets.manifest import synthetic_manifest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TILES = 12


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    from pathray.wsi.synth import SynthConfig, write_synthetic_slides

    out = tmp_path_factory.mktemp("stream-slides")
    return write_synthetic_slides(out, n=4, seed=0, config=SynthConfig(size=4096))


@pytest.fixture(scope="module")
def manifest(slides) -> pd.DataFrame:
    frame = synthetic_manifest(slides)
    frame["split"] = "train"
    return frame


def stream(manifest, storage=None, faults=None, epoch=0, epochs=1, task=None, **overrides) -> list[dict]:
    from pathray.datasets.stream import build_tile_dataset
    from pathray.models.tasks import build_task

    settings = {
        "sampler": {"kind": "class_balanced", "tiles_per_slide": TILES},
        "augmentation": False,
        "readers": 1,
    }
    settings.update(overrides)
    spec = build_task(task or {"name": "segmentation"})
    ds = build_tile_dataset(
        manifest, StreamConfig(**settings), spec, storage, faults=faults, epoch=epoch, epochs=epochs
    )
    rows = []
    for batch in ds.iter_batches(batch_size=8, batch_format="numpy"):
        keys = list(batch)
        rows.extend({k: batch[k][i] for k in keys} for i in range(len(batch["x"])))
    return sorted(rows, key=lambda r: (str(r["slide_id"]), int(r["x"]), int(r["y"])))


def test_rows_carry_tiles_and_aligned_targets(ray_local, manifest):
    rows = stream(manifest)
    assert len(rows) == len(manifest) * TILES
    row = rows[0]
    assert row["image"].shape == (224, 224, 3) and row["image"].dtype == np.uint8
    assert row["target"].shape == (224, 224) and row["target"].dtype == np.uint8
    assert set(row) == {"image", "target", "slide_id", "x", "y", "mpp", "label", "epoch"}
    classes = ["Background", "Benign", "G3", "G4", "G5"]
    labelled = [r for r in rows if r["label"] != "Background"]
    assert {r["label"] for r in labelled} >= {"Benign", "G3", "G4", "G5"}
    for r in labelled:  # the tile is centred on a point of its class polygon
        centre = r["target"][110:114, 110:114]
        assert (centre == classes.index(r["label"])).any(), r["label"]
    darkness = {
        c: np.mean([255 - r["image"].mean() for r in labelled if r["label"] == c]) for c in ("Benign", "G5")
    }
    assert darkness["G5"] > darkness["Benign"] + 10, darkness


def test_slides_in_the_bucket_stream_the_same_tiles(ray_local, manifest, slides, object_store, s3_storage):
    for s in slides:
        object_store.upload_file(s.path, object_store.url_for(f"stream/{s.path.name}"))
        object_store.upload_file(
            s.annotations_path, object_store.url_for(f"stream/{s.annotations_path.name}")
        )
    remote = synthetic_manifest(slides, uri_prefix=f"s3://{object_store.bucket}/stream")
    remote["split"] = "train"
    local_rows = stream(manifest, augmentation=True)
    s3_rows = stream(remote, s3_storage, augmentation=True)
    assert [(r["slide_id"], r["x"], r["y"]) for r in s3_rows] == [
        (r["slide_id"], r["x"], r["y"]) for r in local_rows
    ]
    for a, b in zip(s3_rows, local_rows, strict=True):
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["target"], b["target"])


def test_an_endpoint_restarted_mid_stream_costs_counted_tiles_not_the_run(
    ray_local, slides, object_store, s3_storage, assert_no_secrets
):
    """SeaweedFS is killed after the first batch and restarted (same port, credentials, data): reads
    during the outage give up at their 2 s deadline and are counted as skipped, the rest arrive."""
    import threading
    import time

    from pathray.datasets.faults import FaultLedger

    for s in slides:  # the bucket test above may not have run
        object_store.upload_file(s.path, object_store.url_for(f"stream/{s.path.name}"))
        object_store.upload_file(
            s.annotations_path, object_store.url_for(f"stream/{s.annotations_path.name}")
        )
    remote = synthetic_manifest(slides, uri_prefix=f"s3://{object_store.bucket}/stream")
    remote["split"] = "train"
    fast = s3_storage.model_copy(
        update={"connect_timeout_s": 0.5, "read_timeout_s": 1.0, "retry_backoff_s": 0.2, "deadline_s": 2.0}
    )
    epochs, faults, outage = 16, FaultLedger(), threading.Event()

    def kill_and_restart() -> None:
        object_store.kill()
        time.sleep(3.0)  # longer than the deadline: reads in flight now give up
        object_store.restart()
        outage.set()

    rows: list = []
    try:
        ds = build(
            remote, fast, faults, epochs=epochs, sampler={"kind": "random_tissue", "tiles_per_slide": 8}
        )
        for batch in ds.iter_batches(batch_size=8, batch_format="numpy"):
            if not rows:
                threading.Thread(target=kill_and_restart, daemon=True).start()
            rows.extend(batch["slide_id"])
    finally:
        outage.wait(60)
        if not object_store.running:
            object_store.restart()
    summary = faults.summary()
    assert outage.is_set()
    assert summary["failed_slides"] == {}, summary  # an outage is not a broken slide
    assert summary["skipped_tiles"] > 0, "the outage hit no read: the stream ended before it"
    assert len(rows) + summary["skipped_tiles"] == len(remote) * 8 * epochs, summary
    assert len(rows) > len(remote) * 8 * epochs / 2
    assert_no_secrets(str(summary), ray_logs=True)  # the failed-slide report and the readers' logs


def build(manifest, storage, faults, epochs: int, **overrides):
    from pathray.datasets.stream import build_tile_dataset
    from pathray.models.tasks import build_task

    settings = {"augmentation": False, "readers": 1, **overrides}
    spec = build_task({"name": "segmentation"})
    return build_tile_dataset(manifest, StreamConfig(**settings), spec, storage, faults=faults, epochs=epochs)


def corrupt_every_other_tile(path: Path, level: int) -> None:
    """Overwrite the start of every other JPEG tile of ``level``: those reads fail to decode."""
    from tiffslide import TiffSlide

    page = TiffSlide(path).ts_tifffile.series[0].levels[level].keyframe
    offsets = list(page.dataoffsets)
    with open(path, "r+b") as fh:
        for off in offsets[::2]:
            fh.seek(off)
            fh.write(b"\x00" * 64)


def test_broken_slides_and_tiles_are_counted_and_the_stream_goes_on(
    ray_local, manifest, slides, testdata, tmp_path
):
    from pathray.datasets.faults import FaultLedger

    damaged = tmp_path / "damaged.svs"
    damaged.write_bytes(slides[0].path.read_bytes())
    corrupt_every_other_tile(damaged, level=1)  # 0.5 µm/px is level 1
    broken = ["broken/broken.svs", "broken/unreadable.svs", "broken/notanimage.txt", "broken/zero_gi.tif"]
    extra = [{"slide_id": Path(b).stem, "uri": str(testdata / b)} for b in broken]
    extra.append({"slide_id": "missing", "uri": str(tmp_path / "missing.svs")})
    extra.append(
        {"slide_id": "damaged", "uri": str(damaged), "annotations_uri": str(slides[0].annotations_path)}
    )
    mixed = pd.concat([manifest, pd.DataFrame(extra)], ignore_index=True)
    mixed["split"] = "train"
    faults = FaultLedger()
    rows = stream(mixed, faults=faults, sampler={"kind": "random_tissue", "tiles_per_slide": TILES})
    summary = faults.summary()
    assert set(summary["failed_slides"]) == {str(testdata / b) for b in broken} | {
        str(tmp_path / "missing.svs")
    }
    assert "Bogus marker length" in summary["failed_slides"][str(testdata / "broken/unreadable.svs")]
    assert summary["skipped_tiles"] > 0 and set(summary["tile_errors"]) == {str(damaged)}
    damaged_rows = sum(r["slide_id"] == "damaged" for r in rows)
    assert damaged_rows + summary["skipped_tiles"] == TILES
    assert len(rows) == len(manifest) * TILES + damaged_rows
    assert summary["retried_reads"] > 0


def test_epochs_differ_and_a_seed_repeats(ray_local, manifest):
    def coords(epoch: int) -> set:
        rows = stream(manifest, epoch=epoch, sampler={"kind": "random_tissue", "tiles_per_slide": 6})
        return {(str(r["slide_id"]), int(r["x"]), int(r["y"])) for r in rows}

    first = coords(0)
    assert coords(0) == first
    assert len(coords(1) & first) <= 2
    # one pass can span several epochs, each with its own coordinates
    rows = stream(manifest, epochs=2, sampler={"kind": "random_tissue", "tiles_per_slide": 6})
    by_epoch = {
        e: {(str(r["slide_id"]), int(r["x"]), int(r["y"])) for r in rows if r["epoch"] == e} for e in (0, 1)
    }
    assert by_epoch[0] == first and by_epoch[1] == coords(1)


def test_ssl_views_reach_torch(ray_local, manifest):
    import torch

    from pathray.datasets.stream import build_tile_dataset, tile_collate
    from pathray.models.tasks import build_task

    cfg = StreamConfig(
        sampler={"kind": "random_tissue", "tiles_per_slide": 4},
        augment={"global_size": 64, "local_size": 32, "local_crops": 2},
        readers=1,
    )
    ds = build_tile_dataset(manifest, cfg, build_task({"name": "ssl"}))
    batches = list(ds.iter_torch_batches(batch_size=8, collate_fn=tile_collate()))
    total = sum(len(b["x"]) for b in batches)
    assert total == len(manifest) * 4
    b = batches[0]
    assert isinstance(b["global_0"], torch.Tensor) and b["global_0"].dtype == torch.uint8
    assert tuple(b["global_1"].shape[1:]) == (64, 64, 3) and tuple(b["local_1"].shape[1:]) == (32, 32, 3)
    assert "target" not in b and "image" not in b
    assert isinstance(b["slide_id"], list) and b["slide_id"][0].startswith("slide_")
    assert b["x"].dtype == torch.int64


def test_the_stream_cuts_what_its_reader_cuts_in_a_plain_loop(ray_local, manifest):
    """Two readers at once, sampling and cutting in one call: the same tiles, pixels and targets
    as ``ChunkReader.read`` over the same rows in this process (what benchmarks/stream.py compares)."""
    from pathray.datasets.stream import ChunkReader, slide_rows
    from pathray.models.tasks import build_task
    from pathray.storage import StorageConfig
    from pathray.wsi.patching import TissueConfig

    settings = {"sampler": {"kind": "random_tissue", "tiles_per_slide": TILES}, "read_batch": 5}
    rows = stream(manifest, augmentation=True, readers=2, **settings)
    config = StreamConfig(augmentation=True, readers=2, **settings)
    reader = ChunkReader(config, build_task({"name": "segmentation"}), StorageConfig(), TissueConfig())
    plain = []
    for row in slide_rows(manifest, "train", config):
        out = reader.read(row)
        plain.extend({k: out[k][i] for k in out} for i in range(len(out["x"])))
    plain.sort(key=lambda r: (str(r["slide_id"]), int(r["x"]), int(r["y"])))
    assert len(rows) == len(plain) == len(manifest) * TILES
    for a, b in zip(rows, plain, strict=True):
        assert (a["slide_id"], a["x"], a["y"], a["epoch"]) == (b["slide_id"], b["x"], b["y"], b["epoch"])
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["target"], b["target"])


def test_how_many_readers_changes_nothing_streamed(ray_local, manifest):
    """One reader or three, each sampling and cutting its rows: the same tiles of the same epochs."""
    settings = {"sampler": {"kind": "random_tissue", "tiles_per_slide": 6}, "read_batch": 2, "epochs": 2}

    def coords(readers: int) -> list[tuple]:
        rows = stream(manifest, readers=readers, **settings)
        return [(str(r["slide_id"]), int(r["epoch"]), int(r["x"]), int(r["y"])) for r in rows]

    one = coords(1)
    assert coords(3) == one
    assert len(one) == len(manifest) * 6 * 2


def test_a_stream_of_unreadable_slides_ends_empty_and_names_them(ray_local, testdata):
    from pathray.datasets.faults import FaultLedger

    broken = ["broken/broken.svs", "broken/notanimage.txt"]
    frame = pd.DataFrame(
        [{"slide_id": Path(b).stem, "uri": str(testdata / b), "split": "train"} for b in broken]
    )
    faults = FaultLedger()
    rows = stream(frame, faults=faults, sampler={"kind": "random_tissue", "tiles_per_slide": TILES})
    assert rows == []
    assert set(faults.summary()["failed_slides"]) == {str(testdata / b) for b in broken}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_packed_tiles_decoded_where_the_model_runs_equal_the_readers_pixels(
    ray_local, manifest, slides, object_store, s3_storage, where
):
    """``decode: device``: readers ship compressed tiles and augmentation draws; the collate step
    decodes, cuts, resamples and augments them (here on CPU, on a GPU worker there) into the
    tiles and targets the readers' own pixels give (decoder and resampler tolerance: within 3
    grey levels, 0.3 on average; the targets exactly)."""
    import torch

    from pathray.datasets.stream import collate_tiles

    frame, storage = manifest, None
    if where == "s3":
        for s in slides:
            for path in (s.path, s.annotations_path):
                object_store.upload_file(path, object_store.url_for(f"packed/{path.name}"))
        frame = synthetic_manifest(slides, uri_prefix=f"s3://{object_store.bucket}/packed").assign(
            split="train"
        )
        storage = s3_storage
    settings = {"augmentation": True, "augment": {"hed_sigma": 0.05, "brightness": 0.1, "contrast": 0.1}}
    settings["sampler"] = {
        "kind": "class_balanced",
        "tiles_per_slide": TILES,
        "mpps": [0.5, 0.7],
    }  # 0.7: resampled
    cpu = stream(frame, storage, decode="cpu", **settings)
    packed = stream(frame, storage, decode="device", **settings)
    assert "image" not in packed[0]  # the tiles' bytes as stored: well under their pixels
    assert sum(len(r["packed"]) for r in packed) < 0.5 * sum(r["image"].nbytes for r in cpu)
    assert [(r["slide_id"], r["x"], r["y"]) for r in packed] == [(r["slide_id"], r["x"], r["y"]) for r in cpu]
    batch = {
        k: np.stack([r[k] for r in packed]) if k != "packed" else np.asarray([r[k] for r in packed], object)
        for k in packed[0]
    }
    got = collate_tiles(batch)
    assert isinstance(got["image"], torch.Tensor) and tuple(got["image"].shape) == (len(cpu), 224, 224, 3)
    want = np.stack([r["image"] for r in cpu])
    diff = np.abs(got["image"].numpy().astype(int) - want.astype(int))
    assert diff.max() <= 3 and diff.mean() <= 0.3, (diff.max(), diff.mean())
    assert np.array_equal(got["target"].numpy(), np.stack([r["target"] for r in cpu]))
    assert len({tuple(v[:3]) for v in batch["augment"]}) > 3  # flips and turns drawn, targets moved with them


def test_packed_tiles_refuse_what_needs_pixels_on_the_reader(ray_local, manifest):
    with pytest.raises(ValueError, match="hsv_filter"):
        StreamConfig(decode="device", augment={"hsv_filter": True})
    with pytest.raises(ValueError, match="multi-crop views"):
        stream(manifest, decode="device", task={"name": "ssl"})
