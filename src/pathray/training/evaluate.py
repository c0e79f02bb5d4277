"""Scores of a trained checkpoint on the manifest's test split, beside a constant predictor's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pathray.config import PathrayConfig

EVAL_EPOCH = 1_000_000  # a coordinate stream no training epoch ever draws


def load_trained(cfg: PathrayConfig, checkpoint: Any) -> tuple[torch.nn.Module, Any]:
    """Model and task of a run, with the checkpoint's weights, in eval mode."""
    from pathray.models.task_model import build_model

    model, task = build_model(cfg)
    with checkpoint.as_directory() as d:
        saved = torch.load(Path(d) / "checkpoint.pt", map_location="cpu", weights_only=False)
    model.load_state_dict(saved["model"])
    return model.eval(), task


def evaluate_checkpoint(cfg: PathrayConfig, checkpoint: Any, manifest: Any) -> dict[str, float]:
    """Task metrics on ``eval_tiles_per_slide`` random tissue tiles of each test slide (no augmentation)."""
    from pathray.datasets.stream import build_tile_dataset, tile_collate

    model, task = load_trained(cfg, checkpoint)
    stream = cfg.data.stream.model_copy(
        update={
            "augmentation": False,
            "sampler": cfg.data.stream.sampler.model_copy(
                update={"kind": "random_tissue", "tiles_per_slide": cfg.train.eval_tiles_per_slide}
            ),
        }
    )
    ds = build_tile_dataset(
        manifest, stream, cfg.storage, split=cfg.train.eval_split, epoch=EVAL_EPOCH, tissue=cfg.tissue
    )
    metric = task.metrics()
    targets: list[torch.Tensor] = []
    with torch.no_grad():
        for batch in ds.iter_torch_batches(batch_size=cfg.train.batch_size, collate_fn=tile_collate()):
            outputs = model(batch["image"])
            metric.update(outputs, batch)
            targets.append(batch["target"])
    scores = {f"test/{k}": float(v) for k, v in metric.compute().items()}
    if cfg.task.name in ("segmentation", "classification") and targets:
        scores.update(constant_baseline(task, targets, len(cfg.task.classes)))
    scores["test/tiles"] = float(sum(len(t) for t in targets))
    return scores


def constant_baseline(task: Any, targets: list[torch.Tensor], n_classes: int) -> dict[str, float]:
    """What always predicting the most frequent class scores on the same tiles."""
    counts = torch.bincount(torch.cat([t.reshape(-1).long() for t in targets]), minlength=n_classes)
    majority = int(counts.argmax())
    metric = task.metrics()
    for target in targets:
        shape = (len(target), n_classes, *target.shape[1:])
        logits = torch.full(shape, -10.0)
        logits[:, majority] = 10.0
        metric.update(logits, {"target": target})
    return {f"baseline/{k}": float(v) for k, v in metric.compute().items()}


def evaluate_ssl(cfg: PathrayConfig, checkpoint: Any, manifest: Any) -> dict[str, float]:
    """Label-free and probe scores of a DINO run's teacher on a fixed, unaugmented tile set.

    RankMe and ODCorr read the embeddings alone; the linear probe fits tile labels (the annotated
    class each class-balanced tile was drawn from) on train-split slides and scores the rest.
    """
    from pathray.datasets.stream import build_tile_dataset, tile_collate
    from pathray.models.engines import build_engine
    from pathray.models.metrics import linear_probe, odcorr, rankme

    engine = build_engine(cfg.engine)
    with checkpoint.as_directory() as d:
        engine.load_backbone_weights(str(Path(d) / "checkpoint.pt"))
    engine.eval()
    stream = cfg.data.stream.model_copy(
        update={
            "augmentation": False,
            "target": cfg.data.stream.target.model_copy(update={"task": "classification"}),
            "sampler": cfg.data.stream.sampler.model_copy(
                update={"kind": "class_balanced", "tiles_per_slide": cfg.train.eval_tiles_per_slide}
            ),
        }
    )
    ds = build_tile_dataset(manifest, stream, cfg.storage, split=None, epoch=EVAL_EPOCH, tissue=cfg.tissue)
    size = cfg.engine.img_size
    embeddings, labels, slide_ids = [], [], []
    with torch.no_grad():
        for batch in ds.iter_torch_batches(batch_size=cfg.train.batch_size, collate_fn=tile_collate()):
            images = batch["image"]
            if images.shape[1] != size:  # the probe sees tiles at the engine's input size
                x = images.permute(0, 3, 1, 2).float()
                images = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear")
                images = images.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
            pooled, _ = engine(engine.normalize(images))
            embeddings.append(pooled)
            labels.append(batch["target"])
            slide_ids.extend(batch["slide_id"])
    x, y = torch.cat(embeddings), torch.cat(labels)
    scores = {"test/rankme": rankme(x), "test/odcorr": odcorr(x), "test/tiles": float(len(x))}
    train_slides = set(manifest.loc[manifest["split"] == "train", "slide_id"].astype(str))
    in_train = torch.tensor([s in train_slides for s in slide_ids])
    if in_train.any() and (~in_train).any():
        probe = linear_probe(x[in_train], y[in_train], x[~in_train], y[~in_train])
        scores.update({f"test/probe_{k}": float(v) for k, v in probe.items()})
    return scores
