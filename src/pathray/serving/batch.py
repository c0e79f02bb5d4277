"""Offline analysis of many slides on Ray Data: one row per slide, an actor pool of predictors.

    pathray analyze --manifest slides.parquet --model runs/gleason/model --out results/

Each actor loads the model package once and analyses whole slides with the Ray-free
``analyze_slide`` (its own reader threads), at the manifest's ``mpp`` where a row has one; a slide
that cannot be read becomes a ``failed`` row with the reason, and the others go on.
``summary.parquet`` and ``summary.csv`` hold one row per slide.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pathray.heap import keep_freed_memory
from pathray.inference.config import InferenceConfig
from pathray.storage import StorageConfig, join_uri, redact, write_bytes
from pathray.wsi.patching.tissue import TissueConfig

SUMMARY_FILES = ("summary.parquet", "summary.csv")


class SlideAnalyzer:
    """A Ray Data callable class: holds one ``Predictor``; analyses the slides of each batch."""

    def __init__(
        self,
        model_uri: str,
        out_uri: str,
        storage: dict[str, Any] | None = None,
        inference: dict[str, Any] | None = None,
        tissue: dict[str, Any] | None = None,
    ) -> None:
        from pathray.inference.predictor import Predictor

        self.storage = StorageConfig.model_validate(storage or {})
        self.tissue = TissueConfig.model_validate(tissue or {})
        config = InferenceConfig.model_validate(inference or {})
        if config.keep_freed_memory:  # the actor's process is there to analyse slides
            keep_freed_memory()
        self.predictor = Predictor.from_package(model_uri, self.storage, config)
        self.model_uri, self.out_uri = model_uri, out_uri

    def columns(self) -> dict[str, Any]:
        """Every row has every column (a failed row: NaN), so the table has one schema."""
        spec = self.predictor.spec
        cols: dict[str, Any] = {"tiles": np.nan, "tiles_failed": np.nan, "seconds": np.nan, "outputs": ""}
        if spec.has_map:
            cols.update({f"area_mm2/{c}": np.nan for c in spec.classes})
            cols.update({"gleason_primary": np.nan, "gleason_secondary": np.nan, "gleason_score": np.nan})
        else:
            cols.update({f"count/{c}": np.nan for c in spec.point_classes})
        return cols

    def analyze_one(self, slide_id: str, uri: str, mpp: float | None = None) -> dict[str, Any]:
        from pathray.inference.analyze import analyze_slide
        from pathray.inference.outputs import write_outputs
        from pathray.wsi.backends.open import open_slide

        row: dict[str, Any] = {
            "slide_id": slide_id,
            "uri": uri,
            "status": "ok",
            "reason": "",
            **self.columns(),
        }
        t0 = time.perf_counter()
        try:
            result = analyze_slide(uri, self.predictor, self.storage, self.tissue, mpp=mpp)
            dest = join_uri(self.out_uri, slide_id)
            write_outputs(result, dest, open_slide(uri, self.storage, mpp=mpp), self.storage)
        except Exception as exc:  # noqa: BLE001 - one bad slide is a row, not the end of the run
            row.update(status="failed", reason=redact(str(exc)) or type(exc).__name__)
            return row
        row.update(
            tiles=result.tiles,
            tiles_failed=len(result.failed_tiles),
            seconds=time.perf_counter() - t0,
            outputs=dest,
        )
        for name, area in result.areas_mm2.items():
            if f"area_mm2/{name}" in row:
                row[f"area_mm2/{name}"] = area
        for name, count in (result.counts or {}).items():
            row[f"count/{name}"] = count
        if result.gleason and result.gleason.get("score") is not None:
            g = result.gleason
            row.update(
                gleason_primary=g["primary"], gleason_secondary=g["secondary"], gleason_score=g["score"]
            )
        return row

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        from pathray.datasets.manifest import manifest_mpp

        mpps = batch["mpp"] if "mpp" in batch else [None] * len(batch["uri"])
        rows = [
            self.analyze_one(str(s), str(u), manifest_mpp(m))
            for s, u, m in zip(batch["slide_id"], batch["uri"], mpps, strict=True)
        ]
        return {key: [r[key] for r in rows] for key in rows[0]}


def slide_id_of(uri: str) -> str:
    """A slide's id when the manifest names none: its file name without the extension (and query)."""
    return Path(str(uri).split("?")[0]).stem


def manifest_slides(manifest: str, storage: StorageConfig | None = None) -> pd.DataFrame:
    """``slide_id, uri, mpp`` of a manifest (Parquet/CSV); ``slide_id`` defaults to the file name's
    stem, ``mpp`` (the level-0 µm/px override of slides whose files have none) to NaN."""
    from pathray.datasets.manifest import ManifestError, load_manifest, manifest_mpp

    frame = load_manifest(manifest, storage)
    if "uri" not in frame.columns:
        raise ManifestError(manifest, ["no 'uri' column"])
    if "slide_id" not in frame.columns:
        frame["slide_id"] = [slide_id_of(u) for u in frame["uri"]]
    out = frame[["slide_id", "uri"]].astype(str).reset_index(drop=True)
    mpps = frame["mpp"] if "mpp" in frame.columns else [None] * len(frame)
    out["mpp"] = [manifest_mpp(m) or np.nan for m in mpps]
    return out


def analyze_manifest(
    manifest: str,
    model_uri: str,
    out_uri: str,
    storage: StorageConfig | None = None,
    inference: InferenceConfig | None = None,
    tissue: TissueConfig | None = None,
    actors: int = 1,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
) -> pd.DataFrame:
    """Analyse every slide of ``manifest`` on Ray Data; write ``summary.parquet``/``.csv`` under ``out_uri``.

    Slides are spread over ``actors`` predictor actors, one slide per batch, so a long slide
    never holds others back behind it in one batch. Needs a running Ray (or starts a local one).
    """
    import ray

    slides = manifest_slides(manifest, storage)
    storage = storage or StorageConfig()
    kwargs = {
        "model_uri": model_uri,
        "out_uri": out_uri,
        "storage": storage.model_dump(),
        "inference": (inference or InferenceConfig()).model_dump(),
        "tissue": (tissue or TissueConfig()).model_dump(),
    }
    n = max(1, min(actors, len(slides)))
    ds = ray.data.from_items(slides.to_dict("records"), override_num_blocks=len(slides)).map_batches(
        SlideAnalyzer,
        fn_constructor_kwargs=kwargs,
        batch_size=1,
        concurrency=n,
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor,
        batch_format="numpy",
    )
    table = ds.to_pandas()
    order = {s: i for i, s in enumerate(slides["slide_id"])}
    table = table.sort_values("slide_id", key=lambda s: s.map(order)).reset_index(drop=True)
    write_summary(table, out_uri, storage)
    return table


def write_summary(table: pd.DataFrame, out_uri: str, storage: StorageConfig | None = None) -> dict[str, str]:
    """``summary.parquet`` and ``summary.csv`` under ``out_uri`` (a folder or a bucket prefix)."""
    import io

    parquet = io.BytesIO()
    table.to_parquet(parquet, index=False)
    csv = table.to_csv(index=False, float_format="%.6g").encode()
    blobs = {"summary.parquet": parquet.getvalue(), "summary.csv": csv}
    return {name: write_bytes(join_uri(out_uri, name), blobs[name], storage) for name in SUMMARY_FILES}
