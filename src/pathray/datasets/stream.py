"""The online-patched tile stream: manifest -> coordinates -> tiles read where they lie -> augmented rows.

    task = build_task(SegmentationConfig())
    ds = build_tile_dataset(manifest, StreamConfig(), task, storage, split="train", epoch=0)
    for batch in ds.iter_torch_batches(batch_size=64):   # or ray.train.get_dataset_shard("train")
        images, targets = batch["image"], batch["target"]

Nothing is pre-extracted: each epoch samples new coordinates inside tissue, and reader actors
(each keeping an LRU of open slides) cut the tiles from local disk or object storage by byte
ranges, a batch per slide at a time. Execution streams with bounded memory; a slide that
cannot be read is logged once, counted, and left out while the stream goes on.

One Ray Data operator does the work: a reader samples a (slide, chunk, epoch) row's coordinates
and cuts its tiles in the same call, so no coordinate blocks cross the object store and no
sampling tasks start processes of their own beside the readers.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pathray.datasets.augment import AUGMENT_FIELDS, augment, draw_augment, hsv_tile_ok, multicrop
from pathray.datasets.config import StreamConfig
from pathray.datasets.manifest import manifest_mpp
from pathray.heap import keep_freed_memory
from pathray.models.tasks import TaskSpec
from pathray.registry import SAMPLERS
from pathray.storage import StorageConfig, StorageError, StorageUnavailableError, redact
from pathray.wsi.annotations import annotation_index
from pathray.wsi.backends import SlideError, open_slide
from pathray.wsi.patching import SlideRegions, TissueConfig, build_sampler, rng_for, tissue_mask

if TYPE_CHECKING:
    from pathray.datasets.faults import FaultLedger


def slide_rows(
    manifest: pd.DataFrame, split: str | None, config: StreamConfig | None = None, epochs: range = range(1)
) -> list[dict[str, Any]]:
    """Sampling work: a row per (epoch, chunk, slide) of ``split`` (None: all), epoch- then chunk-major.

    Each slide's tiles are drawn in chunks of ``read_batch``, and the rows go chunk 0 of every
    slide, then chunk 1 of every slide, ... so the stream interleaves slides while each reader
    batch still comes from one slide (one open handle, one round of range requests).
    """
    config = config or StreamConfig()
    frame = manifest if split is None else manifest[manifest["split"] == split]
    if SAMPLERS.get(config.sampler.kind).exhaustive:
        chunks = [0]
    else:
        per = max(1, config.read_batch)
        chunks = list(range(max(1, math.ceil(config.sampler.tiles_per_slide / per))))
    slides = []
    for row in frame.to_dict("records"):
        annotations = row.get("annotations_uri")
        slides.append(
            {
                "slide_id": str(row["slide_id"]),
                "uri": str(row["uri"]),
                "annotations_uri": str(annotations) if isinstance(annotations, str) else "",
                "mpp_override": manifest_mpp(row.get("mpp")) or 0.0,
            }
        )
    return [{**slide, "chunk": c, "epoch": e} for e in epochs for c in chunks for slide in slides]


def chunk_size(config: StreamConfig, chunk: int) -> int | None:
    """Tiles to draw for ``chunk`` of a slide (None: the exhaustive sampler's all)."""
    if SAMPLERS.get(config.sampler.kind).exhaustive:
        return None
    per = max(1, config.read_batch)
    return max(0, min(per, config.sampler.tiles_per_slide - chunk * per))


def report(faults: FaultLedger | None, uri: str, exc: Exception, tiles: int) -> None:
    """Count what a failure costs: storage that is down for now loses ``tiles`` tiles (skipped);
    anything else leaves the slide out (failed), reported once by name."""
    if faults is None:
        return
    if isinstance(exc, StorageUnavailableError):
        faults.tiles_skipped(uri, tiles, exc.cause)
    else:
        faults.slide_failed(uri, exc.cause if isinstance(exc, StorageError) else redact(str(exc)))


def sample_slide(
    row: dict[str, Any],
    config: StreamConfig,
    storage: StorageConfig,
    tissue: TissueConfig,
    worker: int,
    faults: FaultLedger | None,
) -> list[dict[str, Any]]:
    """Coordinates for one (slide, chunk, epoch) row; an unreadable slide yields none and is reported."""
    try:
        slide = open_slide(row["uri"], storage, mpp=row["mpp_override"] or None, tile_cache=config.tile_cache)
        slide.check()
        if slide.mpp is None:
            raise SlideError(row["uri"], "the slide has no usable mpp; set the manifest's mpp column")
        mask = tissue_mask(slide, tissue)
        regions = annotation_index(row["annotations_uri"], storage).regions
    except (StorageError, ValueError, OSError) as exc:
        report(faults, row["uri"], exc, chunk_size(config, row["chunk"]) or 0)
        return []
    w, h = slide.dimensions
    geometry = SlideRegions(row["slide_id"], w, h, slide.mpp, mask, regions)
    sampler = build_sampler(config.sampler)
    rng = rng_for(config.seed, row["epoch"], worker, f"{row['slide_id']}#{row['chunk']}")
    coords = sampler.sample(geometry, rng, n=chunk_size(config, row["chunk"]))
    return [{**row, **c.as_row()} for c in coords]


class TileReader:
    """Cuts a batch of tiles per slide at once; slides and annotations stay open in the process.

    What a tile becomes (an image and its target, or multi-crop views) is the task spec's say.
    """

    def __init__(
        self, config: StreamConfig, task: TaskSpec, storage: StorageConfig, faults: FaultLedger | None = None
    ) -> None:
        self.config = config
        self.task = task
        self.storage = storage
        self.faults = faults
        self.packed = config.decode == "device" and not task.views

    def _read(self, slide: Any, coords: list[tuple[int, int]], size: int, mpp: float) -> list[Any]:
        """Read a group, retrying; a group that keeps failing is read tile by tile, skipping failures.

        Storage that stays down past its deadline (the storage layer has retried by then) skips
        the rest of the group at once, counted, instead of waiting out a deadline per tile.
        Tiles are pixels, or with ``decode: device`` packed regions (``tiledecode.pack_region``).
        """
        if self.packed:
            from pathray.wsi.backends.compressed import CompressedTileReader

            compressed = CompressedTileReader.for_slide(slide)
            read_batch, read_one = compressed.packed_regions, None
        else:
            read_batch, read_one = slide.read_batch, slide.read
        for attempt in range(self.config.read_retries + 1):
            try:
                return list(read_batch(coords, size, mpp))
            except StorageUnavailableError as exc:
                return self._skip(slide.uri, coords, exc)
            except SlideError:
                if self.faults is not None and attempt < self.config.read_retries:
                    self.faults.retried()
        out: list[Any] = []
        for k, (x, y) in enumerate(coords):
            tile = None
            for _ in range(self.config.read_retries + 1):
                try:
                    tile = read_one(x, y, size, mpp) if read_one else read_batch([(x, y)], size, mpp)[0]
                    break
                except StorageUnavailableError as exc:
                    return out + self._skip(slide.uri, coords[k:], exc)
                except SlideError as exc:
                    cause = exc.cause
            if tile is None and self.faults is not None:
                self.faults.tiles_skipped(slide.uri, 1, cause)
            out.append(tile)
        return out

    def _skip(self, uri: str, coords: list[tuple[int, int]], exc: StorageError) -> list[Any]:
        if self.faults is not None:
            self.faults.tiles_skipped(uri, len(coords), exc.cause)
        return [None] * len(coords)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["x"])
        groups: dict[tuple[str, float, float, int], list[int]] = {}
        for i in range(n):
            key = (
                str(batch["uri"][i]),
                float(batch["mpp_override"][i]),
                float(batch["mpp"][i]),
                int(batch["size"][i]),
            )
            groups.setdefault(key, []).append(i)
        tiles: list[Any] = [None] * n
        slide_mpp: dict[str, float] = {}
        for (uri, override, mpp, size), idx in groups.items():
            try:
                slide = open_slide(uri, self.storage, mpp=override or None, tile_cache=self.config.tile_cache)
            except SlideError as exc:
                report(self.faults, uri, exc, len(idx))
                continue
            slide_mpp[uri] = slide.mpp or 0.0
            if not self._annotations(uri, str(batch["annotations_uri"][idx[0]]), len(idx)):
                continue
            coords = [(int(batch["x"][i]), int(batch["y"][i])) for i in idx]
            for i, tile in zip(idx, self._read(slide, coords, size, mpp), strict=True):
                tiles[i] = tile
        return self._rows(batch, tiles, slide_mpp)

    def _annotations(self, uri: str, annotations_uri: str, n: int) -> bool:
        """Load the slide's annotations (kept per process) before its tiles; False: leave them out."""
        if self.task.views:
            return True
        try:
            annotation_index(annotations_uri, self.storage)
        except (StorageError, ValueError, OSError) as exc:
            report(self.faults, uri, exc, n)
            return False
        return True

    def _rows(
        self, batch: dict[str, np.ndarray], tiles: list[Any], slide_mpp: dict[str, float]
    ) -> dict[str, np.ndarray]:
        """Rows of the tiles read: pixels (``image``) or packed regions (``packed``) with their
        augmentation drawn (``augment``), and the task's targets, already moved as the pixels will be."""
        cfg, task = self.config, self.task
        cols: dict[str, list[Any]] = {k: [] for k in ("slide_id", "x", "y", "mpp", "label", "epoch")}
        images: dict[str, list[np.ndarray]] = {}
        targets: list[Any] = []
        packed: list[bytes] = []
        draws: list[np.ndarray] = []
        for i, tile in enumerate(tiles):
            if tile is None or not (self.packed or hsv_tile_ok(tile, cfg.augment)):  # Midnight's filter
                continue
            uri = str(batch["uri"][i])
            x, y, mpp, size = (
                int(batch["x"][i]),
                int(batch["y"][i]),
                float(batch["mpp"][i]),
                int(batch["size"][i]),
            )
            slide_id = str(batch["slide_id"][i])
            rng = np.random.default_rng(
                [cfg.seed, int(batch["epoch"][i]), zlib.crc32(slide_id.encode()), x, y]
            )
            if task.views:
                for name, view in multicrop(tile, cfg.augment, rng).items():
                    images.setdefault(name, []).append(view)
            else:
                extent = size * mpp / slide_mpp[uri]
                index = annotation_index(str(batch["annotations_uri"][i]), self.storage)
                target = task.target(index, x, y, extent, size, str(batch["label"][i]))
                if self.packed:  # decoded, cut and augmented where the model runs (collate_tiles)
                    if cfg.augmentation:
                        draw = draw_augment(cfg.augment, rng, size)
                        target = task.follow(target, draw.spatial)
                        draws.append(draw.vector())
                    packed.append(tile)
                else:
                    if cfg.augmentation:
                        tile, spatial = augment(tile, cfg.augment, rng)
                        target = task.follow(target, spatial)
                    images.setdefault("image", []).append(tile)
                targets.append(target)
            for key, value in (
                ("slide_id", slide_id),
                ("x", x),
                ("y", y),
                ("mpp", mpp),
                ("label", batch["label"][i]),
                ("epoch", int(batch["epoch"][i])),
            ):
                cols[key].append(value)
        out: dict[str, np.ndarray] = {k: np.asarray(v) for k, v in cols.items()}
        if self.packed:
            out["packed"] = np.asarray(packed + [b""], dtype=object)[:-1]  # bytes kept whole, not as S-dtype
            if cfg.augmentation:
                out["augment"] = np.asarray(draws, np.float32).reshape(-1, AUGMENT_FIELDS)
        for name, views in images.items():
            out[name] = np.stack(views) if views else np.zeros((0, 1, 1, 3), np.uint8)
        if not task.views:
            out["target"] = np.asarray(targets) if targets else np.zeros((0,), np.int64)
        return out


def python_value(value: Any) -> Any:
    """A numpy scalar as its Python value (batches hold strings as ``str`` or ``np.str_``)."""
    return value.item() if isinstance(value, np.generic) else value


class ChunkReader:
    """The reader actor: for each (slide, chunk, epoch) row, samples its coordinates and cuts its tiles.

    The same two steps a plain loop would take (``sample_slide`` then ``TileReader``), in one
    process: a slide's handle, mask and annotations, opened to sample, serve its reads too.
    """

    def __init__(
        self,
        config: StreamConfig,
        task: TaskSpec,
        storage: StorageConfig,
        tissue: TissueConfig,
        worker: int = 0,
        faults: FaultLedger | None = None,
        own_process: bool = False,
    ) -> None:
        """``own_process``: the reader is what its process is for (a Ray Data actor, a benchmark's
        worker), so it may set the process's allocator as ``config.reader_keeps_memory`` says."""
        if own_process and config.reader_keeps_memory:
            keep_freed_memory()
        self.config, self.storage, self.tissue = config, storage, tissue
        self.worker, self.faults = worker, faults
        self.tiles = TileReader(config, task, storage, faults)

    def read(self, row: dict[str, Any]) -> dict[str, np.ndarray] | None:
        """The tiles of one ``slide_rows`` row; None when its slide could not be read or every read
        was skipped (the ledger has counted them)."""
        coords = sample_slide(row, self.config, self.storage, self.tissue, self.worker, self.faults)
        if not coords:
            return None
        out = self.tiles({key: np.asarray([c[key] for c in coords]) for key in coords[0]})
        return out if len(out["x"]) else None

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """One output batch per row, out as soon as it is cut."""
        for i in range(len(batch["uri"])):
            out = self.read({key: python_value(values[i]) for key, values in batch.items()})
            if out is not None:
                yield out


def build_tile_dataset(
    manifest: pd.DataFrame,
    config: StreamConfig,
    task: TaskSpec,
    storage: StorageConfig | None = None,
    *,
    split: str | None = "train",
    epoch: int = 0,
    epochs: int = 1,
    worker: int = 0,
    faults: FaultLedger | None = None,
    tissue: TissueConfig | None = None,
) -> Any:
    """A streaming ``ray.data.Dataset`` of augmented tiles cut on the fly from the manifest's slides.

    Rows: ``image`` (uint8 HWC) and ``target`` (the task's; for tasks with ``views``, the views
    ``global_i``/``local_i`` instead), ``slide_id``, ``x``, ``y`` (level-0 top-left), ``mpp``,
    ``label`` and ``epoch``. Needs a running Ray.

    Args:
        manifest: one row per slide (``slide_id, uri, split, annotations_uri``, optional ``mpp``).
        config: sampling, augmentation and reader settings.
        task: what each tile becomes (its target, or views).
        storage: endpoint and credentials for object storage.
        split: which split to stream (None: every slide).
        epoch, worker: with ``config.seed``, select the coordinate stream (never the same twice).
        epochs: how many epochs, from ``epoch`` on, one pass over the dataset delivers (a training
            run streams all of its epochs in one pass, each with its own coordinates).
        faults: a ``FaultLedger`` to count slides left out and tiles skipped.
        tissue: how tissue masks are made (the project's ``tissue:`` section).
    """
    import ray

    if config.decode == "device" and task.views:
        raise ValueError(
            "data.stream.decode: device is for tasks with one image a tile; multi-crop views are cut "
            "by the readers: use decode: cpu (or auto)"
        )
    storage = storage or StorageConfig()
    rows = slide_rows(manifest, split, config, range(epoch, epoch + max(1, epochs)))
    if not rows:
        raise ValueError(f"the manifest has no slides in split {split!r}")
    readers = max(1, config.readers)
    slides = ray.data.from_items(rows, override_num_blocks=len(rows))  # a reader call per row
    return slides.map_batches(
        ChunkReader,
        fn_constructor_kwargs={
            "config": config,
            "task": task,
            "storage": storage,
            "tissue": tissue or TissueConfig(),
            "worker": worker,
            "faults": faults,
            "own_process": True,
        },
        batch_size=1,  # one (slide, chunk) row per call: its tiles are one output block
        batch_format="numpy",
        # Every reader starts at once (none is waited for) instead of one first and the rest when
        # the pool's autoscaler sees a queue; each has a call queued behind the one it runs.
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=readers, initial_size=readers),
        num_cpus=config.reader_cpus,
    )


def decode_on_device(config: StreamConfig, task: TaskSpec, use_gpu: bool) -> StreamConfig:
    """``config`` with ``decode: auto`` settled: device for GPU workers on a task with one image a
    tile (multi-crop views and the HSV filter need pixels on the readers), else cpu."""
    if config.decode != "auto":
        return config
    device = use_gpu and not task.views and not config.augment.hsv_filter
    return config.model_copy(update={"decode": "device" if device else "cpu"})


def tile_collate(device: Any = None) -> Any:
    """``iter_torch_batches(collate_fn=tile_collate())``: ``collate_tiles`` as the callable class
    Ray Data asks for (a plain function is deprecated there). ``device``: where packed tiles
    (``decode: device``) are decoded, cut and augmented."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class TileCollate(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
            return collate_tiles(batch, device)

    return TileCollate()


def collate_tiles(batch: dict[str, np.ndarray], device: Any = None) -> dict[str, Any]:
    """Numbers become tensors, ids stay strings (``tile_collate`` wraps it for Ray Data).

    Ray's default collation cannot turn ``slide_id`` and ``label`` into tensors; the training
    loop still wants them (per-slide metrics, debugging), so they come through as lists.
    Packed tiles (``decode: device``) become ``image`` on ``device`` (default CPU): one batched
    decode (nvJPEG on a GPU), the regions cut and resampled there, then the augmentation the
    reader drew; ``(N, H, W, 3)`` uint8 as the readers' pixels.
    """
    import torch

    out: dict[str, Any] = {}
    if "packed" in batch:
        batch = dict(batch)
        out["image"] = packed_images(batch.pop("packed"), batch.pop("augment", None), device or "cpu")
    for key, value in batch.items():
        if value.dtype.kind in "biuf":
            out[key] = torch.from_numpy(np.require(value, requirements=["C", "W"]))
        else:
            out[key] = [str(v) for v in value]
    return out


def packed_images(packed: Any, draws: np.ndarray | None, device: Any) -> Any:
    """Packed tiles (``decode: device``) -> ``(N, H, W, 3)`` uint8 on ``device``: decoded in one
    batch (nvJPEG on a GPU), cut and resampled there, then given the augmentation ``draws``."""
    from pathray.datasets.augment import augment_tiles
    from pathray.wsi.tiledecode import decode_regions

    images = decode_regions(list(packed), device)
    if draws is not None:
        images = augment_tiles(images, draws)
    return images.permute(0, 2, 3, 1)
