"""Scores of a trained checkpoint on the manifest's test split, beside a constant predictor's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pathray.config import PathrayConfig

EVAL_EPOCH = 1_000_000  # a coordinate stream no training epoch ever draws


def load_trained(cfg: PathrayConfig, checkpoint: Any) -> tuple[torch.nn.Module, Any]:
    """Model and task of a run, with the checkpoint's weights, in eval mode."""
    from pathray.training.loop import build_model

    model, task = build_model(cfg)
    with checkpoint.as_directory() as d:
        saved = torch.load(Path(d) / "checkpoint.pt", map_location="cpu", weights_only=False)
    model.load_state_dict(saved["model"])
    return model.eval(), task


def evaluate_checkpoint(cfg: PathrayConfig, checkpoint: Any, manifest: Any) -> dict[str, float]:
    """Task metrics on ``eval_tiles_per_slide`` random tissue tiles of each test slide (no augmentation)."""
    from pathray.datasets.stream import build_tile_dataset, collate_tiles

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
        for batch in ds.iter_torch_batches(batch_size=cfg.train.batch_size, collate_fn=collate_tiles):
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
