"""Scores of a trained checkpoint on held-out tiles, beside a constant predictor's where that applies."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pathray.datasets.config import StreamConfig
from pathray.models.config import EngineConfig
from pathray.models.tasks import ClassificationConfig, TaskSpec, build_task
from pathray.storage import StorageConfig
from pathray.wsi.patching import TissueConfig

EVAL_EPOCH = 1_000_000  # a coordinate stream no training epoch ever draws
CHECKPOINT_FILE = "checkpoint.pt"


@dataclass(frozen=True)
class EvalTiles:
    """Which tiles a run is scored on: a fixed, unaugmented draw from the slides of ``split``."""

    manifest: Any
    stream: StreamConfig
    storage: StorageConfig
    tissue: TissueConfig
    split: str | None
    tiles_per_slide: int
    batch_size: int
    mode: str = "wholeslide"
    bootstrap: int = 1000

    def slides(self) -> list[dict[str, Any]]:
        """Rows of the annotated slides of ``split``: what a whole-slide evaluation scores."""
        frame = self.manifest if self.split is None else self.manifest[self.manifest["split"] == self.split]
        rows = frame.to_dict("records")
        return [r for r in rows if isinstance(r.get("annotations_uri"), str) and r["annotations_uri"]]

    def batches(self, task: TaskSpec, sampler: str) -> Iterator[dict[str, Any]]:
        """Collated batches of ``tiles_per_slide`` tiles a slide drawn by ``sampler``, ``task``'s targets."""
        from pathray.datasets.stream import build_tile_dataset, tile_collate

        stream = self.stream.model_copy(
            update={
                "augmentation": False,
                "decode": "cpu",  # held-out batches are kept as pixels
                "sampler": self.stream.sampler.model_copy(
                    update={"kind": sampler, "tiles_per_slide": self.tiles_per_slide}
                ),
            }
        )
        ds = build_tile_dataset(
            self.manifest, stream, task, self.storage, split=self.split, epoch=EVAL_EPOCH, tissue=self.tissue
        )
        yield from ds.iter_torch_batches(batch_size=self.batch_size, collate_fn=tile_collate())


def load_checkpoint(directory: str | Path) -> dict[str, Any]:
    """A pathray checkpoint's contents: tensors and plain values only (loaded without unpickling code)."""
    return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def load_trained(
    engine: EngineConfig, task: TaskSpec, checkpoint_dir: str | Path
) -> tuple[torch.nn.Module, TaskSpec]:
    """The task model of a run with its checkpoint's weights, in eval mode."""
    from pathray.models.foundation import random_init_expected
    from pathray.models.task_model import build_model

    with random_init_expected():
        model, spec = build_model(engine.model_copy(update={"weights": None}), task)
    model.load_state_dict(load_checkpoint(checkpoint_dir)["model"])
    return model.eval(), spec


def evaluate_supervised(
    engine: EngineConfig, task: TaskSpec, checkpoint_dir: str | Path, tiles: EvalTiles
) -> dict[str, float]:
    """Task metrics of held-out slides: whole slides through the serving predictor (``tiles.mode``
    "wholeslide", with bootstrap intervals over slides), or random tissue tiles of each."""
    model, task = load_trained(engine, task, checkpoint_dir)
    if tiles.mode == "wholeslide":
        return evaluate_wholeslide(model, task, tiles)
    metric = task.metrics()
    targets: list[torch.Tensor] = []
    with torch.no_grad():
        for batch in tiles.batches(task, "random_tissue"):
            metric.update(model(batch["image"]), batch)
            targets.append(batch["target"])
    scores = {f"test/{k}": float(v) for k, v in metric.compute().items()}
    if task.class_targets and targets:
        scores.update(constant_baseline(task, targets))
    scores["test/tiles"] = float(sum(len(t) for t in targets))
    return scores


def evaluate_wholeslide(model: torch.nn.Module, task: TaskSpec, tiles: EvalTiles) -> dict[str, float]:
    """The trained model as it would serve, scored over every annotated region of the split's slides."""
    from pathray.inference.config import InferenceConfig
    from pathray.inference.evaluation import evaluate_slides
    from pathray.inference.predictor import Predictor
    from pathray.inference.spec import ModelSpec

    sampler = tiles.stream.sampler
    spec = ModelSpec(task, sampler.size, sampler.mpps[0], "evaluation")
    config = InferenceConfig(batch_size=tiles.batch_size, read_threads=2, chunk_tiles=64, overlap=0.0)
    predictor = Predictor(model, spec, config)
    return evaluate_slides(predictor, tiles.slides(), tiles.storage, tiles.tissue, tiles.bootstrap).metrics


def constant_baseline(task: TaskSpec, targets: list[torch.Tensor]) -> dict[str, float]:
    """What always predicting the most frequent class scores on the same tiles."""
    n_classes = len(task.classes)
    counts = torch.bincount(torch.cat([t.reshape(-1).long() for t in targets]), minlength=n_classes)
    majority = int(counts.argmax())
    metric = task.metrics()
    for target in targets:
        shape = (len(target), n_classes, *target.shape[1:])
        logits = torch.full(shape, -10.0)
        logits[:, majority] = 10.0
        metric.update(logits, {"target": target})
    return {f"baseline/{k}": float(v) for k, v in metric.compute().items()}


def evaluate_ssl(
    engine: EngineConfig, task: TaskSpec, checkpoint_dir: str | Path, tiles: EvalTiles
) -> dict[str, float]:
    """Label-free and probe scores of a DINO run's teacher on a fixed, unaugmented tile set.

    RankMe and ODCorr read the embeddings alone; the linear probe fits tile labels (the annotated
    class each class-balanced tile was drawn from) on train-split slides and scores the others.
    """
    from pathray.models.engines import build_engine
    from pathray.models.foundation import random_init_expected
    from pathray.models.metrics import linear_probe, odcorr, rankme

    with random_init_expected():
        backbone = build_engine(engine.model_copy(update={"weights": None}))
    backbone.load_backbone_weights(str(Path(checkpoint_dir) / CHECKPOINT_FILE))
    x, y, slide_ids = embed_batches(
        backbone, tiles.batches(build_task(ClassificationConfig()), "class_balanced")
    )
    scores = {"test/rankme": rankme(x), "test/odcorr": odcorr(x), "test/tiles": float(len(x))}
    manifest = tiles.manifest
    train_slides = set(manifest.loc[manifest["split"] == "train", "slide_id"].astype(str))
    in_train = torch.tensor([s in train_slides for s in slide_ids])
    scores["test/probe_train_tiles"] = float(in_train.sum())
    scores["test/probe_test_tiles"] = float((~in_train).sum())
    if in_train.any() and (~in_train).any():
        probe = linear_probe(x[in_train], y[in_train], x[~in_train], y[~in_train])
        scores.update({f"test/probe_{k}": float(v) for k, v in probe.items()})
    return scores


def embed_batches(
    engine: torch.nn.Module, batches: Iterable[dict[str, Any]], device: Any = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Pooled embeddings (float32, on CPU), targets and slide ids of labelled tile batches, the
    engine in eval mode (restored after), tiles resized to the engine's input size."""
    size = engine.data_config["input_size"][-1]
    embeddings, labels, slide_ids = [], [], []
    was_training = engine.training
    engine.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                images = batch["image"].to(device)
                if images.shape[1] != size:  # probes see tiles at the engine's input size
                    x = images.permute(0, 3, 1, 2).float()
                    images = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear")
                    images = images.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
                pooled, _ = engine(engine.normalize(images))
                embeddings.append(pooled.float().cpu())
                labels.append(batch["target"].cpu())
                slide_ids.extend(str(s) for s in batch["slide_id"])
    finally:
        engine.train(was_training)
    if not embeddings:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), []
    return torch.cat(embeddings), torch.cat(labels), slide_ids
