"""Training sections (Ray-free) and the project config a training run takes.

A project names its engine and task once; the rest follows from them when the project is
validated: the engine's registered defaults (tile size and mpp, lr, batch, steps) fill in what the
project did not set, a foundation preset's tile size and mpp over them (``engine.preset``), and the
ViT's input size is the tile size the model sees.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from pathray.datasets.config import DataConfig
from pathray.models.config import EngineConfig, TaskConfig
from pathray.models.tasks import SegmentationConfig, TaskSpec, build_task
from pathray.registry import RegistryError
from pathray.section import Section, deep_merge
from pathray.storage import StorageConfig
from pathray.training.tracking import TrackingConfig
from pathray.wsi.patching import TissueConfig


class OptimConfig(Section):
    """AdamW with warmup + cosine decay, layer-wise LR decay for ViTs."""

    lr: float = 1e-4
    weight_decay: float = 0.05
    layer_decay: float = Field(0.75, description="ViT block i gets lr * decay**(depth - i); 1.0: off")
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    min_lr_ratio: float = Field(0.01, description="cosine floor as a fraction of lr")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    clip_grad: float | None = 1.0
    weight_decay_end: float | None = Field(
        None, ge=0, description="weight decay at the end, on a cosine from weight_decay (DINOv2: 0.04 -> 0.2)"
    )
    lr_batch_scaling: Literal["none", "sqrt"] = Field(
        "none", description="sqrt: lr * sqrt(global batch / 1024), as DINOv2 scales it"
    )
    patch_embed_lr_mult: float = Field(
        1.0, gt=0, le=1, description="lr multiplier of a ViT's patch embedding (DINOv2: 0.2)"
    )


class ScaleConfig(Section):
    """How many workers and what each gets (Ray Train ScalingConfig)."""

    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    resources_per_worker: dict[str, float] | None = Field(
        None, description="extra custom resources per worker"
    )
    placement_strategy: str = Field("PACK", description="PACK, SPREAD or STRICT_SPREAD (one worker per node)")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp, or fsdp (FSDP2: ViT blocks / CNN stages sharded) for too large models"
    )
    precision: str = Field("bf16", description="autocast dtype on GPU: bf16 or fp32")


class RunSection(Section):
    """Where a run lives and how it survives failures."""

    name: str | None = Field(None, description="run name (default: project-engine-task-timestamp)")
    storage_path: str = Field("runs", description="local folder or s3:// prefix for checkpoints and outputs")
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    max_failures: int = Field(1, description="worker-group restarts from the latest checkpoint")
    log_every: int = 10


class TrainConfig(Section):
    """The length of training and what is evaluated after it."""

    steps: int = 1000
    batch_size: int = Field(32, description="tiles per worker per micro-batch")
    shuffle_buffer: int = Field(256, description="tiles mixed locally before batching (blocks are per slide)")
    eval_split: str | None = Field("test", description="manifest split evaluated after training; null: none")
    eval_tiles_per_slide: int = Field(32, description="eval_mode tiles (and SSL probes): tiles per slide")
    eval_mode: Literal["wholeslide", "tiles"] = Field(
        "wholeslide",
        description="wholeslide: the serving predictor over every annotated region of every test slide, "
        "with bootstrap intervals; tiles: random tissue tiles per slide (quick)",
    )
    eval_bootstrap: int = Field(1000, ge=0, description="bootstrap resamples of the test slides")
    val_split: str | None = Field(
        "val",
        description="manifest split scored at every checkpoint (fixed, unaugmented tiles): the checkpoint "
        "with the best score is the one kept, exported and tested; null, or no such slides: the last",
    )
    val_tiles_per_slide: int = Field(32, ge=1, description="tiles per val slide scored at each checkpoint")
    eval_every: int | None = Field(
        None,
        ge=1,
        description="steps between val scores (SSL: RankMe, ODCorr, kNN and linear probes on fixed held-out "
        "tiles), besides every checkpoint; null: at checkpoints only",
    )
    early_stop_patience: int | None = Field(
        None, ge=1, description="stop after this many val scores in a row without a better one; null: never"
    )
    init_from: str | None = Field(
        None,
        description="start from a previous run (its folder or one checkpoint_* folder, local or object "
        "storage): its model, teacher, heads and centring state, position embeddings resampled to this "
        "run's input size; the optimizer, schedules and step start anew (DINOv2's high-resolution phase)",
    )
    seed: int = 0
    fail_at_step: int | None = Field(None, description="testing aid: SIGKILL one worker once at this step")
    fail_rank: int = 1
    weights_digest: bool = Field(False, description="each rank writes a digest of its weights at checkpoints")


class ProjectConfig(Section):
    """What a training run reads: slides and how they stream, engine, task, optimiser, scale, run."""

    storage: StorageConfig = Field(default_factory=StorageConfig)
    tissue: TissueConfig = Field(default_factory=TissueConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    task: TaskConfig = Field(default_factory=SegmentationConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    scale: ScaleConfig = Field(default_factory=ScaleConfig)
    run: RunSection = Field(default_factory=RunSection)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="before")
    @classmethod
    def _engine_defaults(cls, data: Any) -> Any:
        """Switching ``engine.name`` switches its defaults, and ``engine.preset`` its tile size and mpp;
        what the project sets itself wins."""
        if not isinstance(data, dict):
            return data
        from pathray.models.engines import engine_defaults

        engine = data.get("engine")
        if isinstance(engine, EngineConfig):
            name, preset = engine.name, engine.preset
        elif isinstance(engine, dict):
            name, preset = engine.get("name", "foundation"), engine.get("preset")
        else:
            name, preset = "foundation", None
        try:
            defaults = engine_defaults(name, preset)
        except RegistryError as exc:
            label = "engine.preset" if preset is not None and "preset" in str(exc) else "engine.name"
            raise ValueError(f"{label}: {exc}") from None
        except ValueError as exc:
            raise ValueError(f"engine.preset: {exc}") from None
        return deep_merge(defaults, data)

    @model_validator(mode="after")
    def _input_size(self) -> ProjectConfig:
        """The ViT's input size is the tile the model sees: a tile, or a global crop for tasks with views."""
        if self.engine.img_size is None:
            stream = self.data.stream
            size = stream.augment.global_size if self.task_spec().views else stream.sampler.size
            # not an assignment: validate_assignment would run this validator again
            object.__setattr__(self, "engine", self.engine.model_copy(update={"img_size": size}))
        return self

    def task_spec(self) -> TaskSpec:
        """The project's task spec, built from its task section."""
        return build_task(self.task)
