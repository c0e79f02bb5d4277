"""Training settings (Ray-free) and the engine-specific defaults a project switches with its engine."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OptimConfig(_Section):
    """AdamW with warmup + cosine decay, layer-wise LR decay for ViTs."""

    lr: float = 1e-4
    weight_decay: float = 0.05
    layer_decay: float = Field(0.75, description="ViT block i gets lr * decay**(depth - i); 1.0: off")
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    min_lr_ratio: float = Field(0.01, description="cosine floor as a fraction of lr")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    clip_grad: float | None = 1.0


class ScaleConfig(_Section):
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


class RunSection(_Section):
    """Where a run lives and how it survives failures."""

    name: str | None = Field(None, description="run name (default: project-engine-task-timestamp)")
    storage_path: str = Field("runs", description="local folder or s3:// prefix for checkpoints and outputs")
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    max_failures: int = Field(1, description="worker-group restarts from the latest checkpoint")
    log_every: int = 10


class TrainConfig(_Section):
    """The length of training and what is evaluated after it."""

    steps: int = 1000
    batch_size: int = Field(32, description="tiles per worker per micro-batch")
    shuffle_buffer: int = Field(256, description="tiles mixed locally before batching (blocks are per slide)")
    eval_split: str | None = Field("test", description="manifest split evaluated after training; null: none")
    eval_tiles_per_slide: int = 32
    seed: int = 0
    fail_at_step: int | None = Field(None, description="testing aid: SIGKILL one worker once at this step")
    fail_rank: int = 1
    weights_digest: bool = Field(False, description="each rank writes a digest of its weights at checkpoints")


# What switching `engine.name` brings with it. A project's own values always win.
ENGINE_DEFAULTS: dict[str, dict[str, Any]] = {
    "foundation": {
        "data": {"stream": {"sampler": {"size": 224, "mpps": [0.5]}}},
        "optim": {"lr": 1e-4, "layer_decay": 0.75, "warmup_steps": 100},
        "train": {"batch_size": 32, "steps": 3000},
    },
    "cnn": {
        "data": {"stream": {"sampler": {"size": 256, "mpps": [1.0]}}},
        "optim": {"lr": 1e-3, "layer_decay": 1.0, "warmup_steps": 500},
        "train": {"batch_size": 16, "steps": 15000},
    },
    "debug_vit": {
        "data": {"stream": {"sampler": {"size": 64, "mpps": [2.0]}}},
        "optim": {"lr": 3e-4, "layer_decay": 0.9, "warmup_steps": 5},
        "train": {"batch_size": 8, "steps": 20},
    },
    "debug_cnn": {
        "data": {"stream": {"sampler": {"size": 64, "mpps": [2.0]}}},
        "optim": {"lr": 3e-3, "layer_decay": 1.0, "warmup_steps": 5},
        "train": {"batch_size": 8, "steps": 20},
    },
}


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, section by section (``top`` wins on every key it sets)."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def engine_defaults(tree: dict[str, Any]) -> dict[str, Any]:
    """The defaults of the engine a config tree names (``engine.name``, default "foundation")."""
    engine = tree.get("engine") or {}
    name = engine.get("name", "foundation") if isinstance(engine, dict) else "foundation"
    return ENGINE_DEFAULTS.get(name, {})
