"""Compare frozen foundation models as eva does: linear and kNN probes on annotated tiles, N seeds.

    pathray eval data/manifest.parquet --model uni --weights uni=/models/uni --model runs/dino/model \\
        --out eval/ --seeds 3 --tiles-per-class 128

    comparison = compare_models(manifest, ["uni", "runs/dino/model"], EvalConfig(seeds=3))
    write_comparison(comparison, "eval/")   # comparison.csv/.md/.png, results.json (comparison.py)
    print(comparison.markdown())

Each seed draws its own class-balanced tiles inside the GeoJSON annotations of the manifest's
slides (the label is the class a tile was drawn from; "Background" is tissue outside every
annotation), so the spread over seeds covers both which tiles were seen and the probe's
initialisation. Every model sees the same tile centres, cut at its own tile size and mpp (or the
``tile``/``mpp`` given for all). Probes fit on the train split's tiles and score the test split
(val when there is no test split): a linear layer trained with cross-entropy, and a k-NN (k=20,
cosine). Scores are accuracy, balanced accuracy and macro F1, reported as mean ± std over seeds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from pathray.inference.comparison import PROBES, Comparison
from pathray.storage import StorageConfig
from pathray.wsi.annotations import annotation_index, classification_target
from pathray.wsi.backends import SlideError
from pathray.wsi.backends.open import open_slide
from pathray.wsi.patching import (
    SamplerConfig,
    SlideRegions,
    TissueConfig,
    build_sampler,
    rng_for,
    tissue_mask,
)

log = logging.getLogger(__name__)

BACKGROUND = "Background"
REFERENCE_GEOMETRY = (224, 0.5)
"""Tile size (px) and mpp that tile centres are drawn with when no ``tile``/``mpp`` is given."""
OVERSAMPLE = 2
"""Centres drawn per slide over what is kept: a class drawn a little short on one slide still fills up."""


class ProbeError(ValueError):
    """A comparison that cannot run: no annotations, no train or test slides, an unknown model."""


@dataclass(frozen=True)
class EvalConfig:
    """How a comparison samples and probes.

    Attributes:
        seeds: repeats (seeds 0..seeds-1), each with its own tiles and probe initialisation.
        tiles_per_class: tiles of each class per split and seed (fewer where annotations are scarce).
        tile, mpp: cut every model's tiles at this size and resolution; None: each model's own.
        background: "Background" (unannotated tissue) is a class of its own.
        k: neighbours of the kNN probe.
        device: ``auto``, ``cpu`` or ``cuda``; batch_size: tiles per forward pass.
    """

    seeds: int = 3
    tiles_per_class: int = 64
    tile: int | None = None
    mpp: float | None = None
    background: bool = True
    k: int = 20
    device: str = "auto"
    batch_size: int = 64


@dataclass
class TileSample:
    """One seed's tiles: level-0 centres, class index, slide and split of each."""

    classes: list[str]
    slide_ids: np.ndarray
    centres: np.ndarray
    labels: np.ndarray
    train: np.ndarray

    def counts(self) -> dict[str, int]:
        return {"train": int(self.train.sum()), "eval": int((~self.train).sum())}


def annotated_slides(manifest: pd.DataFrame) -> tuple[list[dict[str, Any]], str]:
    """The annotated train and evaluation slides, and the evaluation split (test, else val)."""
    if "annotations_uri" not in manifest.columns:
        raise ProbeError(
            "the manifest has no annotations_uri column: probes need slides with GeoJSON annotations, "
            "whose classes label the tiles"
        )
    frame = manifest[manifest["annotations_uri"].map(lambda v: isinstance(v, str) and bool(v.strip()))]
    if frame.empty:
        raise ProbeError("no slide of the manifest has an annotations_uri: probes need labelled tiles")
    splits = set(frame["split"].astype(str))
    eval_split = "test" if "test" in splits else "val" if "val" in splits else None
    if "train" not in splits or eval_split is None:
        raise ProbeError(
            f"probes need annotated slides in the train split and in test or val; annotated slides are "
            f"in {sorted(splits)}"
        )
    frame = frame[frame["split"].isin(["train", eval_split])].sort_values("slide_id")
    rows = [
        {
            "slide_id": str(r["slide_id"]),
            "uri": str(r["uri"]),
            "annotations_uri": str(r["annotations_uri"]),
            "train": r["split"] == "train",
            "mpp": _mpp(r.get("mpp")),
        }
        for r in frame.to_dict("records")
    ]
    return rows, eval_split


def _mpp(value: Any) -> float | None:
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        return None
    return mpp if np.isfinite(mpp) and mpp > 0 else None


def probe_classes(slides: list[dict[str, Any]], background: bool, storage: StorageConfig | None) -> list[str]:
    """The label order: "Background" (when it counts), then the annotated region classes, sorted."""
    names = set()
    for row in slides:
        names |= annotation_index(row["annotations_uri"], storage).region_classes()
    classes = ([BACKGROUND] if background else []) + sorted(names - {BACKGROUND})
    if len(classes) < 2:
        raise ProbeError(
            f"the annotations name {len(classes)} class(es) ({classes}): probes need two or more"
        )
    return classes


def sample_tiles(
    slides: list[dict[str, Any]],
    classes: list[str],
    seed: int,
    config: EvalConfig,
    storage: StorageConfig | None = None,
    tissue: TissueConfig | None = None,
) -> TileSample:
    """Class-balanced tile centres inside the annotations for ``seed``: at most ``tiles_per_class``
    of each class per split, drawn per slide with the training stream's sampler."""
    size, mpp = config.tile or REFERENCE_GEOMETRY[0], config.mpp or REFERENCE_GEOMETRY[1]
    ids, centres, labels, train = [], [], [], []
    for row in slides:
        slide = open_slide(row["uri"], storage, mpp=row["mpp"])
        if slide.mpp is None:
            raise SlideError(row["uri"], "the slide has no usable mpp; set the manifest's mpp column")
        index = annotation_index(row["annotations_uri"], storage)
        on_slide = len({name for name in index.region_classes() if name in classes})
        width, height = slide.dimensions
        geometry = SlideRegions(
            row["slide_id"], width, height, slide.mpp, tissue_mask(slide, tissue), index.regions
        )
        sampler = build_sampler(
            SamplerConfig(
                kind="class_balanced",
                size=size,
                mpps=[mpp],
                tiles_per_slide=OVERSAMPLE * config.tiles_per_class * (on_slide + config.background),
                background_fraction=1 / (on_slide + 1) if config.background else 0.0,
            )
        )
        extent = geometry.extent(size, mpp)
        for tile in sampler.sample(geometry, rng_for(seed, 0, 0, row["slide_id"])):
            if tile.label not in classes:
                continue
            ids.append(row["slide_id"])
            centres.append((tile.x + extent / 2, tile.y + extent / 2))
            labels.append(classification_target(index, tile.x, tile.y, extent, size, classes, tile.label))
            train.append(row["train"])
    sample = TileSample(
        classes,
        np.array(ids, dtype=object),
        np.array(centres, np.float64).reshape(-1, 2),
        np.array(labels, np.int64),
        np.array(train, bool),
    )
    return _cap(sample, config.tiles_per_class, np.random.default_rng([seed, 1]))


def _cap(sample: TileSample, per_class: int, rng: np.random.Generator) -> TileSample:
    keep = []
    for split in (True, False):
        for k in range(len(sample.classes)):
            found = np.flatnonzero((sample.train == split) & (sample.labels == k))
            keep.append(rng.choice(found, size=min(per_class, len(found)), replace=False))
    idx = np.sort(np.concatenate(keep)).astype(np.int64)
    return TileSample(
        sample.classes, sample.slide_ids[idx], sample.centres[idx], sample.labels[idx], sample.train[idx]
    )


def read_tiles(
    sample: TileSample,
    slides: list[dict[str, Any]],
    size: int,
    mpp: float,
    storage: StorageConfig | None = None,
) -> np.ndarray:
    """uint8 ``(N, size, size, 3)`` tiles centred on the sample's centres, a batch per slide."""
    out = np.zeros((len(sample.labels), size, size, 3), np.uint8)
    for row in slides:
        idx = np.flatnonzero(sample.slide_ids == row["slide_id"])
        if not len(idx):
            continue
        slide = open_slide(row["uri"], storage, mpp=row["mpp"])
        extent = max(1, round(size * mpp / slide.mpp))
        width, height = slide.dimensions
        coords = [
            (
                min(max(0, round(cx - extent / 2)), max(0, width - extent)),
                min(max(0, round(cy - extent / 2)), max(0, height - extent)),
            )
            for cx, cy in sample.centres[idx]
        ]
        for i, tile in zip(idx, slide.read_batch(coords, size, mpp), strict=True):
            out[i] = tile[..., :3]
    return out


def run_probes(
    embeddings: np.ndarray, sample: TileSample, seed: int, k: int = 20
) -> dict[str, dict[str, float]]:
    """Linear and kNN probe scores (and seconds) of one seed's embeddings: fit on train, score the rest."""
    import torch

    from pathray.models.metrics import knn_probe, logistic_probe

    x = torch.from_numpy(np.asarray(embeddings, np.float32))
    y = torch.from_numpy(sample.labels)
    fit = torch.from_numpy(sample.train)
    probes: dict[str, Callable[..., dict[str, float]]] = {
        "linear": lambda *a: logistic_probe(*a, seed=seed),
        "knn": lambda *a: knn_probe(*a, k=k),
    }
    out = {}
    for name, probe in probes.items():
        start = time.perf_counter()
        scores = probe(x[fit], y[fit], x[~fit], y[~fit])
        out[name] = {**scores, "seconds": time.perf_counter() - start}
    return out


def parse_weights(items: Sequence[str], models: Sequence[str]) -> dict[str, str]:
    """``MODEL=PATH`` pairs (split at the first ``=``) for models that are compared."""
    pairs = {}
    for item in items:
        name, eq, path = item.partition("=")
        if not eq or not name or not path:
            raise ProbeError(f"--weights wants MODEL=PATH, got {item!r}")
        if name not in models:
            raise ProbeError(
                f"--weights names {name!r}, which is not one of the models ({', '.join(models)})"
            )
        pairs[name] = path
    return pairs


def check_model(model: str) -> None:
    """Refuse a name that is neither a preset, a path or URI (a model package) nor a timm model,
    before any tile is read."""
    from pathray.models.presets import preset_names
    from pathray.models.timm_compat import import_timm

    if model in preset_names() or any(c in model for c in "/\\:") or import_timm().is_model(model):
        return
    raise ProbeError(
        f"unknown model {model!r}: not a foundation preset ({', '.join(preset_names())}), "
        "a model package folder or a timm model name"
    )


def load_model(model: str, weights: str | None, storage: StorageConfig | None, config: EvalConfig) -> Any:
    """The frozen embedder of ``model`` (``load_embedder``); an unknown name is a ``ProbeError``
    naming the presets."""
    from pathray.inference.embedder import load_embedder

    sizes = {k: v for k, v in {"tile_size": config.tile, "mpp": config.mpp}.items() if v is not None}
    try:
        return load_embedder(model, weights=weights, storage=storage, device=config.device, **sizes)
    except RuntimeError as exc:
        if "Unknown model" not in str(exc):
            raise
        check_model(model)
        raise


def compare_models(
    manifest: pd.DataFrame,
    models: Sequence[str],
    config: EvalConfig | None = None,
    weights: dict[str, str] | None = None,
    storage: StorageConfig | None = None,
    tissue: TissueConfig | None = None,
    load: Callable[[str, str | None, StorageConfig | None, EvalConfig], Any] = load_model,
    progress: Callable[[str], None] = log.info,
) -> Comparison:
    """Probe every model on the same seeded tiles; ``load(model, weights, storage, config)`` gives
    an embedder (``embed``, ``tile_size``, ``mpp``, ``source``). Tiles are read once per seed and
    geometry and kept in memory, so models of the same tile size and mpp share them."""
    config = config or EvalConfig()
    weights = weights or {}
    if not models or len(set(models)) != len(models):
        raise ProbeError(f"give one or more distinct models, not {list(models)}")
    if config.seeds < 1 or config.tiles_per_class < 1:
        raise ProbeError("seeds and tiles_per_class must be at least 1")
    if load is load_model:
        for model in models:
            check_model(model)
    slides, eval_split = annotated_slides(manifest)
    classes = probe_classes(slides, config.background, storage)
    samples = [sample_tiles(slides, classes, seed, config, storage, tissue) for seed in range(config.seeds)]
    for seed, sample in enumerate(samples):
        counts = sample.counts()
        if not counts["train"] or not counts["eval"]:
            raise ProbeError(f"seed {seed} found no tiles in the train or {eval_split} annotations: {counts}")
    tiles: dict[tuple[int, int, float], np.ndarray] = {}
    results: list[dict[str, Any]] = []
    for model in models:
        start = time.perf_counter()
        embedder = load(model, weights.get(model), storage, config)
        load_s = time.perf_counter() - start
        size, mpp = config.tile or embedder.tile_size, config.mpp or embedder.mpp
        runs = []
        for seed, sample in enumerate(samples):
            key = (seed, size, mpp)
            if key not in tiles:
                tiles[key] = read_tiles(sample, slides, size, mpp, storage)
            start = time.perf_counter()
            embeddings = embedder.embed(tiles[key], batch_size=config.batch_size)
            embed_s = time.perf_counter() - start
            scores = run_probes(embeddings, sample, seed, config.k)
            runs.append({"seed": seed, "tiles": sample.counts(), "embed_s": embed_s, **scores})
            summary = ", ".join(f"{p} {scores[p]['balanced_accuracy']:.3f}" for p in PROBES)
            progress(f"{model} seed {seed}: {len(embeddings)} tiles, balanced accuracy {summary}")
        source = embedder.source
        results.append(
            {
                "model": model,
                "source": asdict(source) if hasattr(source, "__dataclass_fields__") else dict(source),
                "embed_dim": int(embeddings.shape[1]),
                "tile_size": int(size),
                "mpp": float(mpp),
                "load_s": load_s,
                "seeds": runs,
            }
        )
        del embedder
    return Comparison(
        {
            "config": asdict(config),
            "classes": classes,
            "eval_split": eval_split,
            "slides": {
                "train": sum(r["train"] for r in slides),
                eval_split: sum(not r["train"] for r in slides),
            },
            "probes": {"linear": "logistic regression (AdamW, seeded)", "knn": f"k={config.k}, cosine"},
            "models": results,
        }
    )
