"""Slide-level (MIL) learning on tile embeddings with Ray Train: k folds, grouped by case, stratified.

pathray embed ... --out s3://bucket/emb/uni                   # one Parquet of tile embeddings per slide
pathray train configs/mil-abmil.yaml                          # ABMIL, 5 folds in one CPU worker
pathray train configs/mil-abmil.yaml --set scale.workers=5    # the folds on 5 workers side by side
pathray train configs/mil-meanpool.yaml                       # the mean-pool + linear baseline

The driver reads the manifest (``data.manifest``: ``slide_id``, the label column, optionally the case
column), assigns folds and checks that every slide has its embeddings; each Ray Train worker reads
the embeddings from the store itself and trains its folds (fold ``i`` on rank ``i % workers``),
scoring each on its held-out slides against the constant (majority-class) predictor, and writes
per held-out slide an attention heatmap (PNG) and a QuPath GeoJSON overlay. The run directory gets
``folds/fold_<i>.json`` (scores, predictions), ``folds/fold_<i>.safetensors`` (the model),
``heatmaps/``, ``metrics.json`` (mean ± std over folds), ``predictions.csv`` and ``config.yaml``.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field

from pathray.section import Section
from pathray.storage import StorageConfig, join_uri, parse_uri, read_bytes, write_bytes, write_text
from pathray.training.mil_outputs import grid_step, heatmap_geojson, heatmap_png, summarise, summary_lines

if TYPE_CHECKING:
    import pandas as pd

    from pathray.inference.embeddings import SlideEmbeddings
    from pathray.models.mil import MILModel
    from pathray.training.config import RunSection, ScaleConfig


class MILConfig(Section):
    """A slide-level model trained on a folder of tile embeddings (``pathray embed``'s output)."""

    embeddings: str = Field(..., description="folder or s3:// prefix holding <slide_id>.parquet per slide")
    model: str = Field("abmil", description="registered MIL model: abmil (gated attention) or meanpool")
    hidden: int = Field(128, ge=1, description="width of the tile features the attention pools")
    dropout: float = Field(0.25, ge=0, lt=1)
    label_column: str = Field("label", description="manifest column with the slide's class")
    case_column: str | None = Field("case_id", description="manifest column grouping slides by case")
    classes: list[str] | None = Field(None, description="class order (logits); default: sorted labels")
    folds: int = Field(5, ge=2, description="k of k-fold cross-validation")
    seed: int = 0
    epochs: int = Field(30, ge=1)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(1, ge=1, description="bags per optimizer step (padded and masked)")
    max_tiles: int | None = Field(
        4096, ge=1, description="training: a random subset of at most this many tiles per bag and step"
    )
    heatmaps: bool = Field(True, description="attention PNG + GeoJSON per held-out slide")


@dataclass
class MILJob:
    """What each worker receives: the slides, their labels and folds, where to read and write.

    ``storage`` travels without credentials (they are process-local): workers read them from
    their environment.
    """

    mil: MILConfig
    storage: StorageConfig
    run_dir: str
    slides: list[str]
    labels: list[int]
    folds: list[int]
    classes: list[str]

    def embeddings_uri(self, slide_id: str) -> str:
        from pathray.inference.embeddings import slide_embeddings_uri

        return slide_embeddings_uri(self.mil.embeddings, slide_id)


@dataclass
class MILResult:
    """Where the run's outputs are, its summary (mean ± std over folds) and its per-fold scores."""

    run_dir: str
    summary: dict[str, dict[str, float]]
    folds: list[dict[str, Any]]
    lines: list[str]
    paths: dict[str, str] = field(default_factory=dict)


def mil_job(
    mil: MILConfig, frame: pd.DataFrame, storage: StorageConfig, run_dir: str, source: str = "manifest"
) -> MILJob:
    """Labelled slides of ``frame`` with their folds; raises ``ManifestError`` naming what is wrong
    (no label column, a label outside ``classes``, a slide without embeddings, too few slides)."""
    from pathray.datasets.manifest import ManifestError
    from pathray.datasets.splits import fold_manifest
    from pathray.storage import ObjectNotFoundError, stat

    problems = [f"no {c!r} column" for c in ("slide_id", mil.label_column) if c not in frame.columns]
    if problems:
        raise ManifestError(source, problems)
    frame = frame[frame[mil.label_column].notna() & (frame[mil.label_column].astype(str) != "")]
    frame = frame.assign(**{mil.label_column: frame[mil.label_column].astype(str)})
    classes = list(mil.classes or sorted(set(frame[mil.label_column])))
    unknown = sorted(set(frame[mil.label_column]) - set(classes))
    if unknown:
        raise ManifestError(source, [f"labels {unknown} are not in mil.classes {classes}"])
    if len(frame) < mil.folds:
        raise ManifestError(source, [f"{len(frame)} labelled slides cannot fill {mil.folds} folds"])
    group = mil.case_column if mil.case_column in frame.columns else None
    frame = fold_manifest(frame, mil.folds, mil.seed, group=group, stratify=mil.label_column)
    slides = [str(s) for s in frame["slide_id"]]
    job = MILJob(
        mil,
        storage,
        run_dir,
        slides,
        [classes.index(v) for v in frame[mil.label_column]],
        [int(f) for f in frame["fold"]],
        classes,
    )

    def missing(slide: str) -> bool:
        try:
            stat(parse_uri(job.embeddings_uri(slide)), storage)
        except ObjectNotFoundError:
            return True
        return False

    with ThreadPoolExecutor(8) as pool:
        absent = [s for s, gone in zip(slides, pool.map(missing, slides), strict=True) if gone]
    if absent:
        shown = ", ".join(absent[:5]) + (f" and {len(absent) - 5} more" if len(absent) > 5 else "")
        raise ManifestError(
            source, [f"no embeddings under {mil.embeddings} for {shown} (run `pathray embed`)"]
        )
    return job


def read_bags(job: MILJob) -> list[SlideEmbeddings]:
    """Every slide's embeddings (threads: on object storage the reads overlap), all of one model."""
    from pathray.inference.embeddings import EmbeddingFileError, read_slide_embeddings

    with ThreadPoolExecutor(8) as pool:
        bags = list(pool.map(lambda s: read_slide_embeddings(job.embeddings_uri(s), job.storage), job.slides))
    first = bags[0].source
    for slide, bag in zip(job.slides, bags, strict=True):
        if not bag.source.same_model(first):
            raise EmbeddingFileError(
                job.embeddings_uri(slide),
                f"from model {bag.source.model!r}, not {first.model!r} like the rest",
            )
        if not len(bag):
            raise EmbeddingFileError(job.embeddings_uri(slide), "no tiles")
    return bags


def fit_fold(
    mil: MILConfig, bags: list[np.ndarray], labels: np.ndarray, n_classes: int, seed: int, device: Any = "cpu"
) -> MILModel:
    """A MIL model trained on ``bags`` (float16 ``(N_i, D)``) and their integer ``labels``.

    AdamW, cross-entropy weighted by inverse class frequency (the folds are scored by balanced
    accuracy), inputs standardised with the training tiles' statistics.
    """
    import torch

    from pathray.models.mil import build_mil_model, pad_bags

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    dim = bags[0].shape[1]
    model = build_mil_model(mil.model, dim, n_classes, hidden=mil.hidden, dropout=mil.dropout)
    total, sq, n = np.zeros(dim), np.zeros(dim), 0
    for bag in bags:
        b = bag.astype(np.float64)
        total, sq, n = total + b.sum(0), sq + (b * b).sum(0), n + len(b)
    mean = total / n
    model.set_input_stats(
        torch.tensor(mean).float(), torch.tensor(np.sqrt(np.maximum(sq / n - mean**2, 0))).float()
    )
    model.to(device).train()
    counts = np.bincount(labels, minlength=n_classes)
    weights = torch.tensor(
        len(labels) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32, device=device
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=mil.lr, weight_decay=mil.weight_decay)
    target = torch.as_tensor(labels, dtype=torch.long, device=device)
    for _ in range(mil.epochs):
        order = rng.permutation(len(bags))
        for start in range(0, len(order), mil.batch_size):
            idx = order[start : start + mil.batch_size]
            chosen = []
            for i in idx:
                bag = bags[i]
                if mil.max_tiles is not None and len(bag) > mil.max_tiles:
                    bag = bag[np.sort(rng.choice(len(bag), mil.max_tiles, replace=False))]
                chosen.append(torch.from_numpy(bag.astype(np.float32)).to(device))
            x, mask = pad_bags(chosen)
            loss = torch.nn.functional.cross_entropy(model(x, mask).logits, target[idx], weight=weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


def predict(model: MILModel, bag: np.ndarray, device: Any = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities ``(C,)`` and tile attention ``(N,)`` of one whole slide."""
    import torch

    with torch.no_grad():
        out = model(torch.from_numpy(bag.astype(np.float32)).to(device)[None])
    return out.logits.softmax(-1)[0].cpu().numpy(), out.attention[0].cpu().numpy()


def run_fold(job: MILJob, bags: list[SlideEmbeddings], fold: int, device: Any = "cpu") -> dict[str, Any]:
    """Train on the other folds, score fold ``fold`` against the majority class of the training
    slides, write its model, heatmaps and ``folds/fold_<fold>.json``; returns that record."""
    from safetensors.torch import save

    from pathray.models.metrics import slide_scores

    labels, folds, n_classes = np.array(job.labels), np.array(job.folds), len(job.classes)
    train, test = np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
    started = time.monotonic()
    model = fit_fold(
        job.mil, [bags[i].embeddings for i in train], labels[train], n_classes, job.mil.seed + fold, device
    )
    probs, predictions = [], []
    for i in test:
        p, attention = predict(model, bags[i].embeddings, device)
        probs.append(p)
        slide = job.slides[i]
        record = {
            "slide_id": slide,
            "fold": fold,
            "label": job.classes[labels[i]],
            "prediction": job.classes[int(p.argmax())],
            **{f"prob/{c}": float(v) for c, v in zip(job.classes, p, strict=True)},
        }
        predictions.append(record)
        if job.mil.heatmaps:
            write_heatmaps(job, bags[i], attention, record)
    prior = np.bincount(labels[train], minlength=n_classes) / len(train)
    scores = slide_scores(labels[test], np.stack(probs))
    baseline = slide_scores(labels[test], np.tile(prior, (len(test), 1)))  # the majority class, always
    result = {
        "fold": fold,
        "train_slides": len(train),
        "test_slides": len(test),
        "seconds": round(time.monotonic() - started, 2),
        **scores,
        **{f"baseline/{k}": v for k, v in baseline.items()},
        "predictions": predictions,
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_bytes(join_uri(job.run_dir, "folds", f"fold_{fold}.safetensors"), save(state), job.storage)
    write_text(join_uri(job.run_dir, "folds", f"fold_{fold}.json"), json.dumps(result, indent=2), job.storage)
    return result


def write_heatmaps(job: MILJob, bag: SlideEmbeddings, attention: np.ndarray, record: dict[str, Any]) -> None:
    """``heatmaps/<slide_id>.png`` and ``heatmaps/<slide_id>.geojson`` of one held-out slide."""
    step = grid_step(bag.x, bag.y, int(bag.size[0]) if len(bag) else 1)
    base = join_uri(job.run_dir, "heatmaps", record["slide_id"])
    write_bytes(f"{base}.png", heatmap_png(bag.x, bag.y, attention, step), job.storage)
    doc = heatmap_geojson(bag.x, bag.y, attention, step, {"model": job.mil.model, **record})
    write_text(f"{base}.geojson", json.dumps(doc, separators=(",", ":")), job.storage)


def mil_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: read every slide's embeddings, train this rank's folds, report each.

    Every rank reports once per round (fold ``round * workers + rank``), with or without a fold,
    so the ranks' reports line up.
    """
    import ray.train
    import ray.train.torch

    job: MILJob = config["job"]
    context = ray.train.get_context()
    rank, workers = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    bags = read_bags(job)
    for round_ in range(-(-job.mil.folds // workers)):
        fold = round_ * workers + rank
        metrics: dict[str, Any] = {"round": round_}
        if fold < job.mil.folds:
            result = run_fold(job, bags, fold, device)
            metrics.update({k: v for k, v in result.items() if k != "predictions"})
            print(  # a line per fold in the driver's log while the run goes on
                f"fold {fold}: balanced accuracy {result['balanced_accuracy']:.3f} "
                f"(constant {result['baseline/balanced_accuracy']:.3f}), "
                f"{result['test_slides']} slides held out, {result['seconds']:.1f} s",
                flush=True,
            )
        ray.train.report(metrics)


def plan_mil(mil: MILConfig, manifest: str | pd.DataFrame, storage: StorageConfig, run: RunSection) -> MILJob:
    """The run's job, checked on the driver before Ray is needed: the manifest read, folds assigned,
    every slide's embeddings found, the run directory named.

    ``manifest``: a URI (``data.manifest``) or a frame.
    """
    from pathray.datasets.manifest import load_manifest
    from pathray.storage import absolute

    if isinstance(manifest, str):
        source, frame = manifest, load_manifest(manifest, storage)
    else:
        source, frame = "manifest", manifest
    name = run.name or f"mil-{mil.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    mil = mil.model_copy(update={"embeddings": absolute(mil.embeddings)})  # workers run elsewhere
    return mil_job(mil, frame, storage, join_uri(absolute(run.storage_path), name), source)


def run_mil(
    job: MILJob, scale: ScaleConfig, run: RunSection, resolved: dict[str, Any] | None = None
) -> MILResult:
    """Cross-validate ``job.mil.model`` with Ray Train (needs Ray up); the summary written and returned.

    ``resolved``: the config saved as the run's ``config.yaml`` (credentials are never part of a
    section's dump).
    """
    import ray.train
    import yaml
    from ray.train.torch import TorchTrainer

    from pathray.storage import arrow_filesystem

    mil, storage, run_dir = job.mil, job.storage, job.run_dir
    storage_path, name = run_dir.rstrip("/").rsplit("/", 1)
    ray_storage_path, ray_filesystem = arrow_filesystem(storage_path, storage)
    workers = max(1, min(scale.workers, mil.folds))
    trainer = TorchTrainer(
        mil_worker,
        train_loop_config={"job": job},
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers,
            use_gpu=scale.use_gpu,
            resources_per_worker={"CPU": scale.cpus_per_worker, **(scale.resources_per_worker or {})},
            placement_strategy=scale.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=ray_storage_path,
            storage_filesystem=ray_filesystem,
            failure_config=ray.train.FailureConfig(max_failures=run.max_failures),
        ),
    )
    trainer.fit()
    folds = [
        json.loads(read_bytes(join_uri(run_dir, "folds", f"fold_{k}.json"), storage))
        for k in range(mil.folds)
    ]
    summary = summarise(folds)
    lines = summary_lines(summary, mil.model, mil.folds)
    metrics = {
        "model": mil.model,
        "classes": job.classes,
        "folds": mil.folds,
        "slides": len(job.slides),
        "summary": summary,
        "per_fold": [{k: v for k, v in f.items() if k != "predictions"} for f in folds],
    }
    rows = [p for f in folds for p in f["predictions"]]
    columns = ["slide_id", "fold", "label", "prediction", *[f"prob/{c}" for c in job.classes]]
    csv = "".join(",".join(str(r[c]) for c in columns) + "\n" for r in rows)
    paths = {
        "metrics": write_text(join_uri(run_dir, "metrics.json"), json.dumps(metrics, indent=2), storage),
        "predictions": write_text(
            join_uri(run_dir, "predictions.csv"), ",".join(columns) + "\n" + csv, storage
        ),
        "summary": write_text(join_uri(run_dir, "summary.txt"), "\n".join(lines) + "\n", storage),
    }
    if resolved is not None:
        paths["config"] = write_text(
            join_uri(run_dir, "config.yaml"), yaml.safe_dump(resolved, sort_keys=False), storage
        )
    if mil.heatmaps:
        paths["heatmaps"] = join_uri(run_dir, "heatmaps")
    return MILResult(run_dir, summary, folds, lines, paths)
