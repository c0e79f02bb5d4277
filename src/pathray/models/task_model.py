"""An engine joined with a task head: the module that is trained, checkpointed and served."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pathray.models.config import EngineConfig
from pathray.models.tasks import TaskConfigBase, TaskSpec, build_task


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


def build_model(
    engine: EngineConfig, task: TaskSpec | TaskConfigBase | Mapping[str, Any]
) -> tuple[TaskModel, TaskSpec]:
    """The engine and the task's head joined into one module, and the task's spec."""
    from pathray.models.engines import build_engine

    spec = task if isinstance(task, TaskSpec) else build_task(task)
    backbone = build_engine(engine)
    return TaskModel(backbone, spec.build_head(backbone.embed_dim, backbone.dense_channels)), spec
