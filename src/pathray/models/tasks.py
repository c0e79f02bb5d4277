"""Tasks: what a model learns on top of an engine — a head, a loss, metrics and predictions.

    task = build_task(TaskConfig(name="segmentation"))
    head = task.build_head(engine.embed_dim, engine.dense_channels)
    pooled, dense = engine(x)                       # x: (B, 3, H, W) float, normalised
    outputs = head(pooled, dense, (H, W))
    loss = task.loss(outputs, batch, progress=step / total_steps)
    metric = task.metrics(); metric.update(outputs, batch); metric.compute()

Every task works with every engine: heads use only ``pooled (B, embed_dim)`` and
``dense (B, dense_channels, H/4, W/4)``. ``batch`` is the data stream's collated batch
(``image``, ``mpp``, ``target``). Self-supervised DINO (``ssl``) lives in ``pathray.models.dino``.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pathray.models.config import TaskConfig
from pathray.models.metrics import (
    CountAccumulator,
    MetricAccumulator,
    class_report,
    confusion_matrix,
    foreground_dice,
)
from pathray.registry import TASKS

# Modules whose import registers the tasks not defined here.
_BUILTIN_MODULES = ("pathray.models.detection", "pathray.models.instance", "pathray.models.dino")


class Task(Protocol):
    """The contract every task meets; see the module docstring for the call order."""

    config: TaskConfig

    def build_head(self, embed_dim: int, dense_channels: int) -> nn.Module: ...
    def loss(self, outputs: Any, batch: dict[str, Any], progress: float = 0.0) -> Tensor: ...
    def metrics(self) -> MetricAccumulator: ...
    def predict(self, outputs: Any, batch: dict[str, Any] | None = None) -> Any: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def build_task(config: TaskConfig) -> Task:
    """The task ``config.name`` names, built from its config (unknown names list the known ones)."""
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    return TASKS.get(config.name)(config)


class BaseTask:
    """Shared plumbing: the config, and no state to checkpoint (DINO's centre overrides this)."""

    def __init__(self, config: TaskConfig) -> None:
        self.config = config

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class ConvHead(nn.Module):
    """Per-pixel outputs from the dense features, upsampled bilinearly to the tile size.

    ``hidden=0``: one 1x1 conv (a linear read-out); else a 3x3 conv + ReLU before it, for
    outputs (heatmaps, distances) that need a little spatial context of their own.
    """

    def __init__(self, dense_channels: int, out_channels: int, hidden: int = 0) -> None:
        super().__init__()
        if hidden:
            self.net: nn.Module = nn.Sequential(
                nn.Conv2d(dense_channels, hidden, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(hidden, out_channels, 1),
            )
        else:
            self.net = nn.Conv2d(dense_channels, out_channels, 1)

    def forward(self, pooled: Tensor | None, dense: Tensor, out_hw: tuple[int, int]) -> Tensor:
        out = self.net(dense)
        if tuple(out.shape[-2:]) != tuple(out_hw):
            out = F.interpolate(out, size=tuple(out_hw), mode="bilinear", align_corners=False)
        return out


class LinearHead(nn.Module):
    """Class logits from the pooled embedding."""

    def __init__(self, embed_dim: int, out_features: int) -> None:
        super().__init__()
        self.fc = nn.Linear(embed_dim, out_features)

    def forward(self, pooled: Tensor, dense: Tensor | None = None, out_hw: Any = None) -> Tensor:
        return self.fc(pooled)


class ConfusionMetric(CountAccumulator):
    """A confusion matrix over argmax predictions (pixels or tiles) and the scores read from it."""

    def __init__(self, classes: list[str], exclude: tuple[int, ...] = (), dice: bool = False) -> None:
        n = len(classes)
        super().__init__(confusion=np.zeros((n, n)))
        self.classes, self.exclude, self.dice = classes, exclude, dice

    @torch.no_grad()
    def update(self, outputs: Tensor, batch: dict[str, Any]) -> None:
        target = batch["target"].to(outputs.device)
        self.add(confusion=confusion_matrix(target, outputs.argmax(1), len(self.classes)))

    def compute(self) -> dict[str, float]:
        cm = self.counts["confusion"]
        out = class_report(cm, self.classes, self.exclude)
        if self.dice:
            out["dice"] = foreground_dice(cm)
        return out


def soft_dice_loss(logits: Tensor, target: Tensor, eps: float = 1.0) -> Tensor:
    """``1 - mean_c Dice_c`` of the softmax against one-hot targets, summed over the batch."""
    probs = logits.float().softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    dice = (2 * inter + eps) / (probs.sum(dims) + onehot.sum(dims) + eps)
    return 1 - dice.mean()


@TASKS.register("segmentation")
class SegmentationTask(BaseTask):
    """Class per pixel: a 1x1 conv read-out, cross-entropy + soft Dice.

    Metrics: ``f1/<class>`` over all pixels (per class this is also its Dice), ``macro_f1``
    over the classes present in targets or predictions *without Background* (the tissue
    classes are what is graded; Background dominates the pixels and would flatter the mean),
    ``dice`` (any annotated class against Background), ``accuracy``, ``balanced_accuracy``.
    """

    def build_head(self, embed_dim: int, dense_channels: int) -> nn.Module:
        return ConvHead(dense_channels, len(self.config.classes))

    def loss(self, outputs: Tensor, batch: dict[str, Any], progress: float = 0.0) -> Tensor:
        target = batch["target"].to(outputs.device).long()
        ce = F.cross_entropy(outputs.float(), target)
        if not self.config.dice_weight:
            return ce
        return ce + self.config.dice_weight * soft_dice_loss(outputs, target)

    def metrics(self) -> ConfusionMetric:
        return ConfusionMetric(self.config.classes, exclude=(0,), dice=True)

    def predict(self, outputs: Tensor, batch: dict[str, Any] | None = None) -> np.ndarray:
        """``(B, H, W)`` uint8 class map."""
        return outputs.argmax(1).to(torch.uint8).cpu().numpy()


@TASKS.register("classification")
class ClassificationTask(BaseTask):
    """Class per tile: a linear layer on the pooled embedding, cross-entropy.

    Metrics: ``f1/<class>``, ``macro_f1`` (every class present in targets or predictions,
    Background included: here it is a tile label like any other), ``balanced_accuracy``.
    """

    def build_head(self, embed_dim: int, dense_channels: int) -> nn.Module:
        return LinearHead(embed_dim, len(self.config.classes))

    def loss(self, outputs: Tensor, batch: dict[str, Any], progress: float = 0.0) -> Tensor:
        return F.cross_entropy(outputs.float(), batch["target"].to(outputs.device).long())

    def metrics(self) -> ConfusionMetric:
        return ConfusionMetric(self.config.classes)

    def predict(self, outputs: Tensor, batch: dict[str, Any] | None = None) -> np.ndarray:
        """``(B,)`` int64 class index."""
        return outputs.argmax(1).cpu().numpy()
