"""TorchTrainer wiring: the config -> ScalingConfig, RunConfig, datasets; then evaluation and outputs.

pathray train configs/gleason-foundation.yaml                      # local Ray, 1 worker
pathray train configs/gleason-cnn.yaml --set scale.workers=2       # DDP over 2 workers
RAY_ADDRESS=http://head:8265 pathray submit configs/...            # a cluster (see cluster/)
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pathray.storage import (
    Location,
    ObjectNotFoundError,
    StorageConfig,
    absolute,
    arrow_filesystem,
    call,
    is_remote,
    join_uri,
    parse_uri,
    stat,
)
from pathray.training.config import ProjectConfig
from pathray.training.learners import WorkerJob


@dataclass
class TrainResult:
    """Where a run's outputs are and what it scored."""

    run_dir: str
    checkpoint: str | None
    metrics: dict[str, Any]
    paths: dict[str, str] = field(default_factory=dict)


def run_name(cfg: ProjectConfig) -> str:
    return cfg.run.name or f"{cfg.engine.name}-{cfg.task.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def checkpoint_uri(checkpoint: Any, storage_path: str) -> str:
    """A Ray checkpoint's location as a URI (Ray gives ``bucket/key`` paths on object storage)."""
    path = str(checkpoint.path)
    if is_remote(storage_path) and "://" not in path:
        return f"{urlparse(storage_path).scheme}://{path}"
    return path


def newest_checkpoint_file(run_dir: str, name: str, storage: StorageConfig | None = None) -> Location | None:
    """File ``name`` of the newest ``checkpoint_*`` folder of a run directory (local or object
    storage), or None when the run has none."""
    location = parse_uri(run_dir)
    try:
        pattern = f"{location.path.rstrip('/')}/checkpoint_*/{name}"
        found = sorted(call(location, storage, "glob", pattern))
    except ObjectNotFoundError:
        return None
    return Location(location.uri, location.protocol, found[-1]) if found else None


def latest_state(run_dir: str, storage: StorageConfig | None = None) -> dict[str, Any]:
    """``state.json`` of the newest checkpoint in a run directory (local or object storage)."""
    newest = newest_checkpoint_file(run_dir, "state.json", storage)
    return json.loads(call(newest, storage, "cat_file", newest.path)) if newest is not None else {}


def init_checkpoint(uri: str, storage: StorageConfig | None = None) -> dict[str, Any]:
    """The learner state of the run (its newest checkpoint) or checkpoint folder at ``uri``, read
    from any store as tensors and plain values (never unpickling code): what ``train.init_from``
    starts a run from. The optimizer and history stay behind.

    Raises:
        FileNotFoundError: ``uri`` holds no pathray checkpoint.
    """
    import io

    import torch

    from pathray.training.evaluate import CHECKPOINT_FILE

    newest = newest_checkpoint_file(uri, CHECKPOINT_FILE, storage)  # a run folder
    if newest is None:  # or one checkpoint folder
        newest = parse_uri(join_uri(uri, CHECKPOINT_FILE))
        try:
            stat(newest, storage)
        except ObjectNotFoundError:
            raise FileNotFoundError(
                f"train.init_from: {uri} holds no run checkpoint ({CHECKPOINT_FILE})"
            ) from None
    saved = torch.load(
        io.BytesIO(call(newest, storage, "cat_file", newest.path)), map_location="cpu", weights_only=True
    )
    return {k: saved[k] for k in ("model", "teacher_model", "task") if k in saved}


def epochs_needed(cfg: ProjectConfig, slides: int) -> int:
    """Epochs of coordinates one pass must hold for the whole run (a little margin for skipped tiles)."""
    per_epoch = max(1, slides * cfg.data.stream.sampler.tiles_per_slide)
    tiles = cfg.train.steps * cfg.train.batch_size * cfg.optim.grad_accum * cfg.scale.workers
    return max(1, math.ceil(1.1 * tiles / per_epoch))


# What the driver has set of Ray Data's console output (``ensure_ray``: progress bars off), which
# the process that builds the training stream must share.
CONSOLE_SETTINGS = ("enable_progress_bars", "print_on_execution_start")


class TrainDataset:
    """The training stream, as Ray Train builds it: in its controller, at every (re)start of the
    worker group, so a restarted run continues with the coordinates of the epoch its checkpoint
    was in, not from epoch 0.

    The controller's Ray Data context is Ray's default, not the driver's: the driver's console
    settings (``CONSOLE_SETTINGS``, taken when this is made) go with it, or Ray Data's progress
    bars would run through ``pathray train``'s own lines.
    """

    def __init__(
        self, cfg: ProjectConfig, manifest: Any, stream: Any, task: Any, run_dir: str, epochs: int
    ) -> None:
        from ray.data import DataContext

        self.cfg, self.manifest, self.stream, self.task = cfg, manifest, stream, task
        self.run_dir, self.epochs = run_dir, epochs
        context = DataContext.get_current()
        self.console = {key: getattr(context, key) for key in CONSOLE_SETTINGS}

    def __call__(self) -> Any:
        from ray.data import DataContext

        from pathray.datasets.stream import build_tile_dataset

        context = DataContext.get_current()
        for key, value in self.console.items():
            setattr(context, key, value)
        cfg = self.cfg
        start = int(latest_state(self.run_dir, cfg.storage).get("epoch", 0))
        return build_tile_dataset(
            self.manifest,
            self.stream,
            self.task,
            cfg.storage,
            split=cfg.data.split,
            epoch=start,
            epochs=max(1, self.epochs - start),
            tissue=cfg.tissue,
        )


def run_training(
    cfg: ProjectConfig, manifest: Any = None, progress: Callable[[dict[str, Any]], None] | None = None
) -> TrainResult:
    """Train the project's engine on its task with Ray Train, evaluate it, write the run's outputs.

    Needs a running Ray (``pathray.cluster.ray_local.ensure_ray`` starts a local one). Storage
    credentials stay out of everything the run writes and of what its workers receive.
    ``progress(row)`` sees every report (step, loss, lr, tiles/s, data wait, ETA) while it trains.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from pathray.datasets.manifest import load_manifest, training_subset, validate_manifest
    from pathray.datasets.stream import decode_on_device
    from pathray.models.package import with_package_backbone
    from pathray.registry import LEARNERS
    from pathray.training.evaluate import EvalTiles
    from pathray.training.loop import Validation, train_loop_per_worker
    from pathray.training.outputs import write_run_outputs
    from pathray.training.progress import HistoryWatcher
    from pathray.training.tracking import check_tracking, track_run

    check_tracking(cfg.tracking)  # before training, not after it
    # workers run elsewhere; a model package as weights brings its backbone (an SSL run's teacher)
    cfg = cfg.model_copy(update={"engine": with_package_backbone(cfg.engine.with_local_weights())})
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
    task = cfg.task_spec()
    run_dir = join_uri(storage_path, name)
    ray_storage_path, ray_filesystem = arrow_filesystem(storage_path, cfg.storage)
    train_slides = manifest if cfg.data.split is None else manifest[manifest["split"] == cfg.data.split]
    epochs = epochs_needed(cfg, len(train_slides))
    stream = decode_on_device(cfg.data.stream, task, cfg.scale.use_gpu)

    train_dataset = TrainDataset(cfg, manifest, stream, task, run_dir, epochs)
    job = WorkerJob.from_project(cfg)
    learner = LEARNERS.get(task.learner)
    val_batches = val_tiles(cfg, manifest, *learner.val_tiles(task)) if learner.validates else None
    scored = val_batches is not None and learner.selects_checkpoint
    init = init_checkpoint(cfg.train.init_from, cfg.storage) if cfg.train.init_from else None
    resources = {"CPU": cfg.scale.cpus_per_worker, **(cfg.scale.resources_per_worker or {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "job": job,
            "val": ray.put(val_batches) if val_batches is not None else None,
            "init": ray.put(init) if init is not None else None,
        },
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
            # with val scores, the best checkpoints are kept (and the latest, which a restart needs)
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.run.keep_checkpoints,
                checkpoint_score_attribute=Validation.KEY if scored else None,
            ),
        ),
        datasets={"train": train_dataset},
    )
    if progress is None:
        result = trainer.fit()
    else:
        with HistoryWatcher(run_dir, cfg.storage, progress):
            result = trainer.fit()
    metrics: dict[str, Any] = {"steps": cfg.train.steps, **{k: v for k, v in (result.metrics or {}).items()}}
    history: list[dict[str, Any]] = []
    paths: dict[str, str] = {}
    if result.checkpoint is not None:  # the latest holds the whole history
        with result.checkpoint.as_directory() as d:
            if (Path(d) / "history.json").exists():
                history = json.loads((Path(d) / "history.json").read_text())
    checkpoint = best_checkpoint(result) if scored else result.checkpoint
    if checkpoint is not None:
        metrics["steps_trained"] = max((int(h["step"]) for h in history), default=cfg.train.steps)
        tiles = EvalTiles(
            manifest,
            cfg.data.stream,
            cfg.storage,
            cfg.tissue,
            cfg.train.eval_split,
            cfg.train.eval_tiles_per_slide,
            cfg.train.batch_size,
            cfg.train.eval_mode,
            cfg.train.eval_bootstrap,
        )
        with checkpoint.as_directory() as d:
            kept = json.loads((Path(d) / "state.json").read_text())["step"]
            if scored:
                metrics.update(chosen_step=kept, **{"val/best_score": _score_at(history, kept)})
            # the test split is scored once, here, by the kept checkpoint
            evaluation = learner.evaluate(cfg.engine, task, Path(d), tiles)
            if evaluation:
                metrics.update(evaluation)
                history.append({"step": kept, **{f"eval/{k}": v for k, v in evaluation.items()}})
            if learner.exports_package:
                exported = learner.packaged(cfg.engine, task, Path(d))
                paths["model"] = export_model(cfg, exported, Path(d), join_uri(run_dir, "model"), metrics)
    paths.update(write_run_outputs(run_dir, cfg, history, metrics))
    paths.update(track_run(cfg, history, metrics, paths))
    saved = checkpoint_uri(checkpoint, storage_path) if checkpoint is not None else None
    return TrainResult(run_dir, saved, metrics, paths)


def val_tiles(
    cfg: ProjectConfig, manifest: Any, task: Any, sampler: str = "random_tissue", ssl: bool = False
) -> list[dict[str, Any]] | None:
    """The val split's fixed, unaugmented tile batches (``task``'s targets, drawn by ``sampler``) a
    run scores at every checkpoint; None when there is nothing to score (no ``train.val_split``, no
    such annotated slides, or a run that trains on every split).

    A self-supervised run (``ssl``: its val targets are labels for its probes) is watched on the val
    split's annotated slides where there are some, else on every annotated slide: its held-out
    tiles are then fixed coordinates no training epoch draws."""
    from pathray.training.evaluate import EvalTiles

    split = cfg.train.val_split
    if not ssl and (split is None or cfg.data.split is None or split == cfg.data.split):
        return None
    if ssl and (split is None or not (manifest["split"] == split).any()):
        split = None
    tiles = EvalTiles(
        manifest,
        cfg.data.stream,
        cfg.storage,
        cfg.tissue,
        split,
        cfg.train.val_tiles_per_slide,
        cfg.train.batch_size,
        "tiles",
    )
    if not tiles.slides():
        return None
    return list(tiles.batches(task, sampler)) or None


def best_checkpoint(result: Any) -> Any:
    """The kept checkpoint with the best val score (the latest when none was scored)."""
    from pathray.training.loop import Validation

    kept = result.best_checkpoints or []
    scored = [(m[Validation.KEY], m["step"], c) for c, m in kept if Validation.KEY in m]
    if not scored:
        return result.checkpoint
    # ties go to the later step: the longer-trained model, as good on val
    return max(scored, key=lambda item: item[:2])[2]


def _score_at(history: list[dict[str, Any]], step: int) -> float:
    from pathray.training.loop import Validation

    rows = [h[Validation.KEY] for h in history if h.get("step") == step and Validation.KEY in h]
    return float(rows[-1]) if rows else float("nan")


def export_model(
    cfg: ProjectConfig, exported: tuple[Any, Any], checkpoint_dir: Path, uri: str, metrics: dict[str, Any]
) -> str:
    """Write the final weights as a model package (``pathray.models.package``) a server can load.

    ``exported`` is the learner's ``packaged``: the model rebuilt and loaded strictly, so a package
    always holds weights that fit, and the package's task config.
    """
    from pathray.models.package import package_model, save_model_package

    model, task = exported
    step = json.loads((checkpoint_dir / "state.json").read_text())["step"]
    sampler = cfg.data.stream.sampler
    meta = {"run": cfg.run.name, "step": step, "metrics": metrics}
    # multi-crop views: the model learned from global crops, at that size
    size = cfg.data.stream.augment.global_size if cfg.task_spec().views else sampler.size
    package = package_model(model, cfg.engine, task, size, sampler.mpps[0], meta)
    return save_model_package(uri, package, cfg.storage)
