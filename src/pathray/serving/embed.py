"""Embed a cohort on Ray Data: tissue grid -> CPU reader actors -> model actors -> one Parquet per slide.

    pathray embed slides.parquet --model uni --weights /models/uni/pytorch_model.bin --out s3://b/emb/
    report = embed_slides("slides.parquet", "vit_small_patch16_224", "emb/", tile_size=64)  # random init

The driver builds the model once on its CPU (for its weights digest) and skips every slide whose
file is already there from the same model (``is_complete``), so a crashed or repeated run resumes
and leaves finished files untouched. Ray Data then runs: the tissue grid of each slide (tasks: one
row per tile, in grid order, with its tissue fraction) -> reader actors (CPU: a batch of
coordinates grouped by slide, ranged reads through the slide cache) -> model actors (on a GPU when
they have one, bf16) -> the driver, which gathers each slide's rows and writes its file whole once
all its tiles arrived. A slide that cannot be opened or planned, or loses more than
``max_failed_share`` of its tiles, is reported by name and not written (the next run tries it
again); the run goes on. Undecodable tiles of a written slide are left out and counted.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from pathray.inference.embeddings import (
    EmbeddingSource,
    SlideEmbeddings,
    is_complete,
    slide_embeddings_uri,
    write_slide_embeddings,
)
from pathray.storage import StorageConfig, redact
from pathray.wsi.patching.tissue import TissueConfig

MANIFEST_SUFFIXES = (".parquet", ".csv")
TILE_COLUMNS = ("slide_id", "uri", "slide_mpp", "index", "n_tiles", "x", "y", "tissue", "error")
"""The columns of a tile row from the grid to the driver (the reader adds ``image`` and ``ok``)."""


def _reason(exc: BaseException) -> str:
    return redact(str(exc)) or type(exc).__name__


def plan_slide_tiles(
    slide_id: str,
    uri: str,
    slide_mpp: float | None,
    tile_size: int,
    tile_mpp: float,
    overlap: float,
    min_tissue: float,
    storage: StorageConfig,
    tissue: TissueConfig,
) -> dict[str, np.ndarray]:
    """The tiles of one slide's tissue grid (the grid ``pathray analyze`` uses) as columns.

    A slide that cannot be opened or planned is one row with ``index`` -1 and the reason in
    ``error``; a slide without tissue one row with ``index`` -1 and no error (its file is empty).
    """
    from pathray.inference.config import InferenceConfig
    from pathray.inference.grid import plan_grid
    from pathray.inference.spec import ModelSpec
    from pathray.models.tasks import build_task
    from pathray.wsi.backends.open import open_slide
    from pathray.wsi.patching.tissue import tissue_mask

    error, xs, ys, fractions = "", np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    try:
        slide = open_slide(uri, storage, mpp=slide_mpp)
        slide.check()
        mask = tissue_mask(slide, tissue)
        spec = ModelSpec(build_task({"name": "embedding"}), tile_size, tile_mpp)
        config = InferenceConfig(overlap=overlap, min_tissue=min_tissue, clip_to_tissue=False)
        plan = plan_grid(slide, spec, config, tissue, mask=mask)
        xs, ys = plan.xs, plan.ys
        fractions = mask.fractions(xs, ys, plan.extent, plan.extent).astype(np.float32)
    except Exception as exc:  # noqa: BLE001 - one bad slide is a row, not the end of the run
        error = _reason(exc)
    n = len(xs)
    rows = max(1, n)
    return {
        "slide_id": np.array([slide_id] * rows, dtype=object),
        "uri": np.array([uri] * rows, dtype=object),
        "slide_mpp": np.full(rows, np.nan if slide_mpp is None else slide_mpp, np.float64),
        "index": np.arange(n, dtype=np.int64) if n else np.array([-1], np.int64),
        "n_tiles": np.full(rows, n, np.int64),
        "x": xs if n else np.zeros(1, np.int64),
        "y": ys if n else np.zeros(1, np.int64),
        "tissue": fractions if n else np.zeros(1, np.float32),
        "error": np.array([error] * rows, dtype=object),
    }


def plan_tiles(batch: dict[str, np.ndarray], **kwargs: Any) -> dict[str, np.ndarray]:
    """Ray Data: slides (``slide_id, uri, mpp``) -> the tile rows of their tissue grids."""
    from pathray.datasets.manifest import manifest_mpp

    storage = StorageConfig.model_validate(kwargs.pop("storage"))
    tissue = TissueConfig.model_validate(kwargs.pop("tissue"))
    parts = [
        plan_slide_tiles(str(s), str(u), manifest_mpp(m), storage=storage, tissue=tissue, **kwargs)
        for s, u, m in zip(batch["slide_id"], batch["uri"], batch["mpp"], strict=True)
    ]
    return {k: np.concatenate([p[k] for p in parts]) for k in TILE_COLUMNS}


def slide_groups(batch: dict[str, np.ndarray]) -> dict[tuple[str, float | None], list[int]]:
    """The rows of a batch that are tiles (not a slide's failure row), by (slide URI, slide mpp)."""
    from pathray.datasets.manifest import manifest_mpp

    groups: dict[tuple[str, float | None], list[int]] = defaultdict(list)
    for i in np.flatnonzero(np.asarray(batch["index"]) >= 0):
        groups[(str(batch["uri"][i]), manifest_mpp(batch["slide_mpp"][i]))].append(int(i))
    return groups


def read_rows(
    batch: dict[str, np.ndarray],
    reader_for: Callable[[str, float | None], Callable[[list[tuple[int, int]]], Any]],
    put: Callable[[int, Any], None],
) -> tuple[np.ndarray, np.ndarray]:
    """Read the batch's tiles slide by slide: ``reader_for(uri, slide_mpp)`` gives a function of
    coordinates -> tiles, each read tile goes to ``put(row, tile)``. A bad tile costs itself only
    (``read_tolerant``); a slide that cannot be read fails its rows. Returns ``(ok, error)``."""
    from pathray.inference.reader import read_tolerant

    ok = np.zeros(len(batch["index"]), bool)
    error = np.array([str(e) for e in batch["error"]], dtype=object)
    for (uri, slide_mpp), rows in slide_groups(batch).items():
        coords = [(int(batch["x"][i]), int(batch["y"][i])) for i in rows]
        try:
            tiles, failed, singles = read_tolerant(reader_for(uri, slide_mpp), coords)
        except Exception as exc:  # noqa: BLE001 - storage down or the slide gone: these tiles fail
            error[rows] = _reason(exc)
            continue
        causes = dict(failed)
        for k, i in enumerate(rows):
            tile = tiles[k] if tiles is not None else singles[k]
            if tile is None:
                error[i] = causes.get(k, "not read")
            else:
                put(i, tile)
                ok[i] = True
    return ok, error


class TileReadActor:
    """Ray Data callable class (CPU): tile rows -> the same rows with their uint8 ``image``.

    Rows are grouped by slide; each slide is opened through the process's slide cache (an LRU of
    open handles) and its tiles read in one ``read_batch`` (ranged reads). A tile that cannot be
    read gets ``ok`` False and the cause in ``error``: the model skips it, the driver counts it.
    """

    def __init__(self, storage: dict[str, Any], tile_size: int, tile_mpp: float) -> None:
        self.storage = StorageConfig.model_validate(storage)
        self.tile_size, self.tile_mpp = tile_size, tile_mpp

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pathray.wsi.backends.open import open_slide

        size = self.tile_size
        images = np.zeros((len(batch["index"]), size, size, 3), np.uint8)

        def reader_for(uri: str, slide_mpp: float | None) -> Callable[[list[tuple[int, int]]], Any]:
            slide = open_slide(uri, self.storage, mpp=slide_mpp)
            return lambda coords: slide.read_batch(coords, size, self.tile_mpp)

        def put(i: int, tile: Any) -> None:
            images[i] = np.asarray(tile)

        ok, error = read_rows(batch, reader_for, put)
        return {**{k: np.asarray(batch[k]) for k in TILE_COLUMNS}, "error": error, "image": images, "ok": ok}


class EmbedActor:
    """Ray Data callable class: holds one ``TileEmbedder`` (GPU when the actor has one, bf16);
    tile rows with their images -> the rows with their ``embedding`` (float16), images dropped.

    Each batch also carries the seconds this actor waited for it since the last one ended and the
    seconds it computed, spread over its rows: their sums say how much the model waited for tiles.
    """

    def __init__(
        self,
        embedder: dict[str, Any],
        expected_sha256: str,
        tile_size: int | None = None,
        tile_mpp: float | None = None,
    ) -> None:
        from pathray.inference.embedder import load_embedder

        args = dict(embedder)
        args["storage"] = StorageConfig.model_validate(args.get("storage") or {})
        self.embedder = load_embedder(**args)
        found = self.embedder.source.weights_sha256
        if found != expected_sha256:
            raise RuntimeError(
                f"model {self.embedder.source.model!r} loaded with weights {found[:12]} on this worker, "
                f"{expected_sha256[:12]} on the driver: give every node the same weights file"
            )
        self.tile_size, self.tile_mpp, self.storage = tile_size, tile_mpp, args["storage"]
        self.last = time.perf_counter()

    def _read_here(self, batch: dict[str, np.ndarray]) -> tuple[Any, np.ndarray, np.ndarray]:
        """Rows without images: their compressed tiles fetched by byte ranges and decoded on this
        actor's device (nvJPEG on a GPU), cropped and resampled there; ``(images NHWC, ok, error)``."""
        import torch

        from pathray.wsi.backends.compressed import CompressedTileReader
        from pathray.wsi.backends.open import open_slide

        assert self.tile_size is not None and self.tile_mpp is not None
        size, mpp, device = self.tile_size, self.tile_mpp, self.embedder.device
        images = torch.zeros((len(batch["index"]), size, size, 3), dtype=torch.uint8, device=device)

        def reader_for(uri: str, slide_mpp: float | None) -> Callable[[list[tuple[int, int]]], Any]:
            tiles = CompressedTileReader.for_slide(open_slide(uri, self.storage, mpp=slide_mpp))
            return lambda coords: tiles.read_batch(coords, size, mpp, device=device)

        def put(i: int, tile: Any) -> None:
            images[i] = tile.permute(1, 2, 0)  # (3, S, S) as decoded -> (S, S, 3) as the model takes

        ok, error = read_rows(batch, reader_for, put)
        return images, ok, error

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        read_s = 0.0
        if "image" in batch:  # decoded by the CPU reader actors
            images, ok, error = batch["image"], np.asarray(batch["ok"], bool), np.asarray(batch["error"])
            chosen = np.ascontiguousarray(images[ok]) if ok.any() else None
        else:  # compressed bytes fetched and decoded here: time the model waits for its tiles
            images, ok, error = self._read_here(batch)
            read_s = time.perf_counter() - start
            chosen = images[np.flatnonzero(ok).tolist()] if ok.any() else None
        n = len(ok)
        out = np.zeros((n, self.embedder.embed_dim), np.float16)
        if chosen is not None:
            out[ok] = self.embedder.embed(chosen, int(ok.sum()))
        end = time.perf_counter()
        wait, self.last = start - self.last + read_s, end
        return {
            **{k: np.asarray(batch[k]) for k in TILE_COLUMNS},
            "error": error,
            "ok": ok,
            "embedding": out,
            "wait_s": np.full(n, wait / max(n, 1)),
            "model_s": np.full(n, (end - start - read_s) / max(n, 1)),
        }


@dataclass
class EmbedReport:
    """What a run did: one row per slide (``status``: written, skipped or failed), totals, timing."""

    slides: pd.DataFrame
    source: EmbeddingSource
    seconds: float = 0.0
    model_s: float = 0.0
    wait_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def count(self, status: str) -> int:
        return int((self.slides["status"] == status).sum()) if len(self.slides) else 0

    @property
    def tiles(self) -> int:
        return int(self.slides["tiles"].sum()) if len(self.slides) else 0

    @property
    def tiles_per_s(self) -> float:
        done = self.slides.loc[self.slides["status"] != "skipped", "tiles"].sum() if len(self.slides) else 0
        return float(done) / self.seconds if self.seconds > 0 else 0.0

    @property
    def model_wait_share(self) -> float:
        """Share of the model actors' time spent waiting for tiles (0: the model was the bottleneck)."""
        total = self.model_s + self.wait_s
        return self.wait_s / total if total > 0 else 0.0

    def summary(self) -> str:
        failed_tiles = int(self.slides["tiles_failed"].sum()) if len(self.slides) else 0
        rate = f"{self.tiles_per_s:.1f} tiles/s"
        if "startup_s" in self.extra and self.tiles:
            rate += (
                f" ({self.extra['steady_tiles_per_s']:.1f} after the first batch, "
                f"{self.extra['startup_s']:.1f} s in)"
            )
        return (
            f"slides: {self.count('written')} written, {self.count('skipped')} skipped (already done), "
            f"{self.count('failed')} failed; tiles: {self.tiles} embedded, {failed_tiles} unreadable; "
            f"{rate}; the model waited for tiles {100 * self.model_wait_share:.0f} % of its time"
        )


def input_slides(source: str | pd.DataFrame | Sequence[str], storage: StorageConfig | None) -> pd.DataFrame:
    """``slide_id, uri, mpp`` of a manifest (Parquet/CSV URI), a frame alike, or slide URIs."""
    from pathray.serving.batch import manifest_slides, slide_id_of

    if isinstance(source, pd.DataFrame):
        frame = source.copy()
    elif isinstance(source, str) and source.split("?")[0].lower().endswith(MANIFEST_SUFFIXES):
        return manifest_slides(source, storage)
    else:
        frame = pd.DataFrame({"uri": [source] if isinstance(source, str) else list(source)})
    if "slide_id" not in frame.columns:
        frame["slide_id"] = [slide_id_of(u) for u in frame["uri"]]
    if "mpp" not in frame.columns:
        frame["mpp"] = np.nan
    out = frame[["slide_id", "uri"]].astype(str).reset_index(drop=True)
    out["mpp"] = pd.to_numeric(frame["mpp"], errors="coerce").to_numpy()
    return out


def _complete(
    slides: pd.DataFrame, out_uri: str, source: EmbeddingSource, storage: StorageConfig
) -> list[bool]:
    """Which slides' files are already there from this model (footer reads, in threads)."""
    with ThreadPoolExecutor(16) as pool:
        return list(
            pool.map(
                lambda s: is_complete(slide_embeddings_uri(out_uri, s), source, storage), slides["slide_id"]
            )
        )


class _Gather:
    """The driver's side: a slide's rows until all its tiles arrived, then its file (in a thread)."""

    def __init__(
        self,
        out_uri: str,
        source: EmbeddingSource,
        storage: StorageConfig,
        tile_size: int,
        tile_mpp: float,
        max_failed_share: float,
    ) -> None:
        self.out_uri, self.source, self.storage = out_uri, source, storage
        self.tile_size, self.tile_mpp, self.max_failed_share = tile_size, tile_mpp, max_failed_share
        self.parts: dict[str, list[dict[str, np.ndarray]]] = defaultdict(list)
        self.seen: dict[str, int] = defaultdict(int)
        self.expected: dict[str, int] = {}
        self.rows: dict[str, dict[str, Any]] = {}
        self.writes: dict[str, Future[str]] = {}
        self.pool = ThreadPoolExecutor(4, thread_name_prefix="pathray-embed-write")
        self.model_s = self.wait_s = 0.0
        self.tiles_done = 0

    def add(self, batch: dict[str, np.ndarray]) -> None:
        self.model_s += float(np.sum(batch["model_s"]))
        self.wait_s += float(np.sum(batch["wait_s"]))
        ids = np.asarray(batch["slide_id"]).astype(str)
        for slide_id in np.unique(ids):
            rows = ids == slide_id
            part = {
                k: np.asarray(batch[k])[rows]
                for k in ("index", "x", "y", "tissue", "ok", "error", "embedding")
            }
            self.expected[slide_id] = int(np.asarray(batch["n_tiles"])[rows][0])
            self.parts[slide_id].append(part)
            self.seen[slide_id] += int(rows.sum())
            self.tiles_done += int((part["index"] >= 0).sum())
            if self.seen[slide_id] >= max(1, self.expected[slide_id]):
                self.finish(slide_id)

    def finish(self, slide_id: str) -> None:
        parts = self.parts.pop(slide_id)
        cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        n = self.expected[slide_id]
        row: dict[str, Any] = {"status": "written", "tiles": 0, "tiles_failed": 0, "reason": "", "out": ""}
        self.rows[slide_id] = row
        if n == 0 and cols["error"][0]:
            row.update(status="failed", reason=str(cols["error"][0]))
            return
        order = np.argsort(cols["index"], kind="stable")
        cols = {k: v[order] for k, v in cols.items()}
        keep = cols["ok"] & (cols["index"] >= 0)
        lost = int((~cols["ok"] & (cols["index"] >= 0)).sum())
        row.update(tiles=int(keep.sum()), tiles_failed=lost)
        if n and lost > self.max_failed_share * n:
            first = next(str(e) for e, good in zip(cols["error"], cols["ok"], strict=True) if not good)
            row.update(
                status="failed", tiles=0, reason=f"{lost} of {n} tiles could not be read (first: {first})"
            )
            return
        table = SlideEmbeddings(
            slide_id=slide_id,
            x=cols["x"][keep],
            y=cols["y"][keep],
            mpp=np.full(int(keep.sum()), self.tile_mpp, np.float32),
            size=np.full(int(keep.sum()), self.tile_size, np.int32),
            tissue=cols["tissue"][keep],
            embeddings=cols["embedding"][keep].reshape(int(keep.sum()), self.source.embed_dim),
            source=self.source,
        )
        uri = slide_embeddings_uri(self.out_uri, slide_id)
        row["out"] = uri
        self.writes[slide_id] = self.pool.submit(write_slide_embeddings, uri, table, self.storage)

    def close(self) -> dict[str, dict[str, Any]]:
        """Wait for the writes; a write that failed fails its slide."""
        for slide_id, future in self.writes.items():
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001 - reported by name, the others are written
                self.rows[slide_id].update(status="failed", tiles=0, reason=f"write failed: {_reason(exc)}")
        self.pool.shutdown()
        return self.rows


def cpu_shares(
    cpus: float, actors: int, cpus_per_actor: float, readers: int | None
) -> tuple[int, float, float]:
    """``(reader actors, CPUs of each reader, CPUs of each model actor)`` that fit in ``cpus`` beside
    one planning task (1 CPU: Ray Data runs the grid and its repartition as one task), so no stage
    waits forever for a CPU the actors hold. A 2-CPU machine: half a CPU for the model actor and for
    the reader each.

    Raises:
        ValueError: fewer than 2 CPUs.
    """
    room = cpus - 1.0
    if room < 1.0:
        raise ValueError(f"the cluster has {cpus:g} CPUs: embedding needs at least 2")
    model = cpus_per_actor if actors * cpus_per_actor < room else room / 2 / actors
    left = room - actors * model
    n = readers or max(1, min(16, int(left)))
    return n, min(1.0, left / n), model


def embed_slides(
    slides: str | pd.DataFrame | Sequence[str],
    model: str,
    out_uri: str,
    *,
    weights: str | None = None,
    storage: StorageConfig | None = None,
    tissue: TissueConfig | None = None,
    tile_size: int | None = None,
    mpp: float | None = None,
    overlap: float = 0.0,
    min_tissue: float = 0.05,
    batch_size: int = 64,
    actors: int = 1,
    gpus_per_actor: float | None = None,
    readers: int | None = None,
    read_batch: int = 32,
    cpus_per_actor: float = 1.0,
    model_kwargs: dict[str, Any] | None = None,
    max_failed_share: float = 0.05,
    decode: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> EmbedReport:
    """Embed every tissue tile of ``slides`` with ``model``: one Parquet file per slide under ``out_uri``.

    Args:
        slides: a manifest (Parquet/CSV URI with ``uri`` and optional ``slide_id``, ``mpp``), a frame
            alike, a slide URI or a list of them.
        model, weights, model_kwargs: what ``load_embedder`` takes (a preset, a model package, a
            timm name; a timm name without weights has random weights, for pipeline tests).
        tile_size, mpp: tiles other than the model's own (px, µm/px).
        overlap, min_tissue: the tissue grid (``pathray analyze``'s grid; default no overlap).
        batch_size: tiles per forward pass. actors: model actors. gpus_per_actor: GPUs of each
            (None: 1 when the cluster has GPUs, else 0). readers: CPU reader actors (None: the
            cluster's CPUs left over). read_batch: tiles per reader call.
        max_failed_share: a slide that loses more of its tiles than this fails (and is not written).
        decode: ``cpu``: CPU reader actors decode the tiles and ship pixels to the model actors;
            ``device``: the model actors fetch the tiles' compressed bytes (a few KB each) and
            decode them where the model runs (nvJPEG on a GPU; levels it cannot serve through the
            slide's own reader), so no pixels cross processes; ``auto``: ``device`` on GPUs.
        progress: ``progress(tiles_done, tiles_known)`` as embeddings arrive.

    Raises:
        EmbeddingFileError: ``out_uri`` holds another model's embeddings (use another folder).
        ValueError: two slides share a ``slide_id`` (they would share a file).

    Needs a running Ray; nothing starts when every slide is done already.
    """
    import ray

    from pathray.inference.embedder import load_embedder

    storage = storage or StorageConfig()
    frame = input_slides(slides, storage)
    doubles = sorted(set(frame.loc[frame["slide_id"].duplicated(), "slide_id"]))
    if doubles:
        raise ValueError(f"slide_id {doubles[:5]} named more than once: each slide is one file")
    args: dict[str, Any] = {
        "model": model,
        "weights": weights,
        "storage": storage.model_dump(),
        "tile_size": tile_size,
        "mpp": mpp,
        "model_kwargs": model_kwargs,
    }
    probe = load_embedder(**{**args, "storage": storage}, device="cpu", precision="fp32")
    source, tile, tile_mpp = probe.source, probe.tile_size, probe.mpp
    del probe
    done = _complete(frame, out_uri, source, storage)
    report_rows = [
        {"slide_id": s, "uri": u, "status": "skipped", "tiles": 0, "tiles_failed": 0, "reason": "", "out": ""}
        for s, u in zip(frame["slide_id"], frame["uri"], strict=True)
    ]
    for row, complete in zip(report_rows, done, strict=True):
        if complete:
            row["out"] = slide_embeddings_uri(out_uri, row["slide_id"])
    todo = frame[[not d for d in done]]
    report = EmbedReport(pd.DataFrame(report_rows), source)
    if todo.empty:
        return report
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    n_actors = max(1, actors)
    readers, reader_cpus, model_cpus = cpu_shares(
        float(ray.cluster_resources().get("CPU", 1)), n_actors, cpus_per_actor, readers
    )
    args["device"] = "cuda" if gpus_per_actor > 0 else "cpu"
    if decode not in ("auto", "cpu", "device"):
        raise ValueError(f"decode must be auto, cpu or device, not {decode!r}")
    on_device = decode == "device" or (decode == "auto" and gpus_per_actor > 0)
    plan_kwargs = {
        "tile_size": tile,
        "tile_mpp": tile_mpp,
        "overlap": overlap,
        "min_tissue": min_tissue,
        "storage": storage.model_dump(),
        "tissue": (tissue or TissueConfig()).model_dump(),
    }
    records = todo.to_dict("records")
    ds = (
        ray.data.from_items(records, override_num_blocks=len(records))
        .map_batches(plan_tiles, fn_kwargs=plan_kwargs, batch_size=1, num_cpus=1, batch_format="numpy")
        # a slide's grid in blocks of one read each: its reads spread over every reader actor
        .repartition(target_num_rows_per_block=read_batch)
    )
    embed_kwargs: dict[str, Any] = {"embedder": args, "expected_sha256": source.weights_sha256}
    if on_device:  # the model actors read their own tiles, compressed
        embed_kwargs |= {"tile_size": tile, "tile_mpp": tile_mpp}
    else:
        ds = ds.map_batches(
            TileReadActor,
            fn_constructor_kwargs={"storage": storage.model_dump(), "tile_size": tile, "tile_mpp": tile_mpp},
            batch_size=read_batch,
            compute=ray.data.ActorPoolStrategy(size=readers),
            num_cpus=reader_cpus,
            batch_format="numpy",
        )
    ds = ds.map_batches(
        EmbedActor,
        fn_constructor_kwargs=embed_kwargs,
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=n_actors),
        num_cpus=model_cpus,
        num_gpus=gpus_per_actor,
        batch_format="numpy",
    )
    gather = _Gather(out_uri, source, storage, tile, tile_mpp, max_failed_share)
    start = time.perf_counter()
    first: tuple[float, int] | None = None  # (when, tiles) of the first batch: start-up ends there
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        gather.add(batch)
        first = first or (time.perf_counter(), gather.tiles_done)
        if progress:
            progress(gather.tiles_done, sum(gather.expected.values()))
    rows = gather.close()
    end = time.perf_counter()
    report.seconds = end - start
    report.model_s, report.wait_s = gather.model_s, gather.wait_s
    for row in report_rows:
        row.update(rows.get(row["slide_id"], {}))
    missing = set(todo["slide_id"]) - set(rows)
    for row in report_rows:
        if row["slide_id"] in missing:
            row.update(status="failed", reason="no tiles came back")
    report.slides = pd.DataFrame(report_rows)
    report.extra = {
        "readers": readers,
        "reader_cpus": reader_cpus,
        "actors": n_actors,
        "model_cpus": model_cpus,
        "gpus_per_actor": gpus_per_actor,
        "decode": "device" if on_device else "cpu",
    }
    if first is not None:
        report.extra["startup_s"] = first[0] - start
        report.extra["steady_tiles_per_s"] = (gather.tiles_done - first[1]) / max(end - first[0], 1e-9)
    return report
