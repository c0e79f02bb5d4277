"""Task specs by name: each is the one home of a task's targets, augmentation of targets, head, loss,
metrics and outputs (see ``base``). Importing this package registers the built-in ones."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pathray.models.tasks.base import Output, Spatial, TaskConfigBase, TaskSpec
from pathray.models.tasks.classification import ClassificationConfig, ClassificationTask
from pathray.models.tasks.detection import DetectionConfig, DetectionTask
from pathray.models.tasks.embedding import EmbeddingConfig, EmbeddingTask
from pathray.models.tasks.instance import InstanceConfig, InstanceTask
from pathray.models.tasks.segmentation import SegmentationConfig, SegmentationTask
from pathray.models.tasks.ssl import SslConfig, SslTask
from pathray.registry import TASKS

__all__ = [
    "ClassificationConfig",
    "ClassificationTask",
    "DetectionConfig",
    "DetectionTask",
    "EmbeddingConfig",
    "EmbeddingTask",
    "InstanceConfig",
    "InstanceTask",
    "Output",
    "SegmentationConfig",
    "SegmentationTask",
    "Spatial",
    "SslConfig",
    "SslTask",
    "TaskConfigBase",
    "TaskSpec",
    "build_task",
    "task_config",
]


def task_config(value: TaskConfigBase | Mapping[str, Any] | None = None, **fields: Any) -> TaskConfigBase:
    """The config of the task ``name`` names, validated by that task's own config type.

    Raises:
        RegistryError: an unknown task name (the message lists the known ones).
        pydantic.ValidationError: a field the task does not have, or a bad value.
    """
    if isinstance(value, TaskConfigBase) and not fields:
        return value
    data = {**(value.model_dump() if isinstance(value, TaskConfigBase) else dict(value or {})), **fields}
    data.setdefault("name", "segmentation")
    return TASKS.get(str(data["name"])).config_type.model_validate(data)


def build_task(config: TaskConfigBase | Mapping[str, Any]) -> TaskSpec:
    """The spec of the task ``config`` names (a task config, or a mapping with ``name``)."""
    config = task_config(config)
    return TASKS.get(config.name)(config)
