"""TorchTrainer wiring: the config -> ScalingConfig, RunConfig, datasets; then evaluation and outputs.

pathray train configs/gleason-foundation.yaml                      # local Ray, 1 worker
pathray train configs/gleason-cnn.yaml --set scale.workers=2       # DDP over 2 workers
RAY_ADDRESS=http://head:8265 pathray submit configs/...            # a cluster (see cluster/)
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pathray.config import PathrayConfig
from pathray.training.rundir import absolute, arrow_storage, checkpoint_uri, join_uri
from pathray.wsi.storage import StorageConfig, filesystem, parse_uri


@dataclass
class TrainResult:
    """Where a run's outputs are and what it scored."""

    run_dir: str
    checkpoint: str | None
    metrics: dict[str, Any]
    paths: dict[str, str] = field(default_factory=dict)


def run_name(cfg: PathrayConfig) -> str:
    return cfg.run.name or f"{cfg.engine.name}-{cfg.task.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def latest_state(run_dir: str, storage: StorageConfig | None = None) -> dict[str, Any]:
    """``state.json`` of the newest checkpoint in a run directory (local or object storage)."""
    location = parse_uri(run_dir)
    fs, path = filesystem(location, storage), location.path
    try:
        found = sorted(p for p in fs.glob(f"{path.rstrip('/')}/checkpoint_*/state.json"))
    except FileNotFoundError:
        return {}
    if not found:
        return {}
    with fs.open(found[-1], "r") as fh:
        return json.load(fh)


def epochs_needed(cfg: PathrayConfig, slides: int) -> int:
    """Epochs of coordinates one pass must hold for the whole run (a little margin for skipped tiles)."""
    per_epoch = max(1, slides * cfg.data.stream.sampler.tiles_per_slide)
    tiles = cfg.train.steps * cfg.train.batch_size * cfg.optim.grad_accum * cfg.scale.workers
    return max(1, math.ceil(1.1 * tiles / per_epoch))


def run_training(cfg: PathrayConfig, manifest: Any = None) -> TrainResult:
    """Train the project's engine on its task with Ray Train, evaluate on the test split, write outputs."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from pathray.cluster.ray_local import ensure_ray
    from pathray.datasets.manifest import load_manifest, training_subset, validate_manifest
    from pathray.datasets.stream import build_tile_dataset
    from pathray.training.loop import train_loop_per_worker

    ensure_ray()
    if manifest is None:
        if not cfg.data.manifest:
            raise ValueError("data.manifest is not set")
        manifest = load_manifest(cfg.data.manifest, cfg.storage)
        validate_manifest(manifest, cfg.data.manifest, cfg.storage, check_uris=cfg.data.check_uris)
    # Fewer annotated slides, same held-out ones: the nested subsets of the training split.
    manifest = training_subset(manifest, cfg.data.fraction, cfg.data.split or "train", cfg.train.seed)
    name = run_name(cfg)
    storage_path = absolute(cfg.run.storage_path)
    run = cfg.run.model_copy(update={"name": name, "storage_path": storage_path})
    cfg = cfg.model_copy(update={"run": run})
    run_dir = join_uri(storage_path, name)
    ray_storage_path, ray_filesystem = arrow_storage(storage_path, cfg.storage)
    train_slides = manifest if cfg.data.split is None else manifest[manifest["split"] == cfg.data.split]
    epochs = epochs_needed(cfg, len(train_slides))

    def train_dataset() -> Any:
        # Called at every (re)start of the worker group: a restarted run continues with the
        # coordinates of the epoch its checkpoint was in, not from epoch 0.
        start = int(latest_state(run_dir, cfg.storage).get("epoch", 0))
        return build_tile_dataset(
            manifest,
            cfg.data.stream,
            cfg.storage,
            split=cfg.data.split,
            epoch=start,
            epochs=max(1, epochs - start),
            tissue=cfg.tissue,
        )

    resources = {"CPU": cfg.scale.cpus_per_worker, **(cfg.scale.resources_per_worker or {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.model_dump(mode="json"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scale.workers,
            use_gpu=cfg.scale.use_gpu,
            resources_per_worker=resources,
            placement_strategy=cfg.scale.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=ray_storage_path,
            storage_filesystem=ray_filesystem,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
        ),
        datasets={"train": train_dataset},
    )
    result = trainer.fit()
    checkpoint = result.checkpoint
    history: list[dict[str, Any]] = []
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            if (Path(d) / "history.json").exists():
                history = json.loads((Path(d) / "history.json").read_text())
    metrics: dict[str, Any] = {"steps": cfg.train.steps, **{k: v for k, v in (result.metrics or {}).items()}}
    has_eval = cfg.train.eval_split is not None and (manifest["split"] == cfg.train.eval_split).any()
    evaluation: dict[str, float] = {}
    if checkpoint is not None and cfg.task.name == "ssl":
        from pathray.training.evaluate import evaluate_ssl

        evaluation = evaluate_ssl(cfg, checkpoint, manifest)
    elif checkpoint is not None and has_eval:
        from pathray.training.evaluate import evaluate_checkpoint

        evaluation = evaluate_checkpoint(cfg, checkpoint, manifest)
    if evaluation:
        metrics.update(evaluation)
        history.append({"step": cfg.train.steps, **{f"eval/{k}": v for k, v in evaluation.items()}})
    from pathray.training.outputs import write_run_outputs

    paths = {}
    if checkpoint is not None and cfg.task.name != "ssl":
        paths["model"] = export_model(cfg, checkpoint, join_uri(run_dir, "model"), metrics)
    paths.update(write_run_outputs(run_dir, cfg, history, metrics, cfg.storage))
    saved = checkpoint_uri(checkpoint, storage_path) if checkpoint is not None else None
    return TrainResult(run_dir, saved, metrics, paths)


def export_model(cfg: PathrayConfig, checkpoint: Any, uri: str, metrics: dict[str, Any]) -> str:
    """Write the final weights as a model package (``pathray.models.package``) a server can load."""
    import torch

    from pathray.models.package import save_model_package

    with checkpoint.as_directory() as d:
        saved = torch.load(Path(d) / "checkpoint.pt", map_location="cpu", weights_only=False)
    meta = {"run": cfg.run.name, "step": saved.get("step"), "metrics": metrics}
    return save_model_package(uri, cfg, saved["model"], meta, cfg.storage)
