"""An engine joined with a task head: the module that is trained, checkpointed and served."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pathray.config import PathrayConfig


class TaskModel(nn.Module):
    """Engine + task head: uint8 tiles in, task outputs out."""

    def __init__(self, engine: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.engine = engine
        self.head = head

    def forward(self, images_uint8: torch.Tensor) -> Any:
        x = self.engine.normalize(images_uint8)
        pooled, dense = self.engine(x)
        return self.head(pooled, dense, tuple(x.shape[-2:]))


def build_model(cfg: PathrayConfig) -> tuple[TaskModel, Any]:
    """The engine and task the config names, joined into one module."""
    from pathray.models.engines import build_engine
    from pathray.models.tasks import build_task

    engine = build_engine(cfg.engine)
    task = build_task(cfg.task)
    return TaskModel(engine, task.build_head(engine.embed_dim, engine.dense_channels)), task
