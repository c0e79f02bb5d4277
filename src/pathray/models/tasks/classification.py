"""Tile classification: one class per tile, from the pooled embedding."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image, ImageDraw
from pydantic import Field

from pathray.models.tasks.base import Colour, Output, TaskConfigBase, TaskSpec
from pathray.registry import TASKS
from pathray.wsi.annotations import GLEASON_CLASSES, AnnotationIndex, classification_target

if TYPE_CHECKING:
    from torch import Tensor, nn

    from pathray.models.heads import ConfusionMetric


class ClassificationConfig(TaskConfigBase):
    """Class order is the logit order; a tile without annotation is class 0."""

    name: Literal["classification"] = "classification"
    classes: list[str] = Field(default_factory=lambda: [c.name for c in GLEASON_CLASSES], min_length=2)


@TASKS.register("classification")
class ClassificationTask(TaskSpec):
    """A linear layer on the pooled embedding, cross-entropy.

    Metrics: ``f1/<class>``, ``macro_f1`` (every class present in targets or predictions,
    Background included: here it is a tile label like any other), ``balanced_accuracy``. A whole
    slide is stitched as a class map with one class per tile.
    """

    config_type = ClassificationConfig
    output = Output(class_map=True, per_tile=True)
    class_targets = True
    config: ClassificationConfig

    def target(
        self, index: AnnotationIndex, x: int, y: int, extent: float, size: int, label: str = ""
    ) -> int:
        return classification_target(index, x, y, extent, size, self.config.classes, label)

    def draw(self, image: Image.Image, target: Any, colour: Colour) -> Image.Image:
        k = int(target)
        name = self.config.classes[k] if k < len(self.config.classes) else str(k)
        out = image.copy()
        draw = ImageDraw.Draw(out)
        width = max(2, out.width // 32)
        draw.rectangle([0, 0, out.width - 1, out.height - 1], outline=colour(name, k), width=width)
        draw.text((width + 1, out.height - 12 - width), name, fill=(0, 0, 0))
        return out

    def build_head(self, embed_dim: int, dense_channels: int) -> nn.Module:
        from pathray.models.heads import LinearHead

        return LinearHead(embed_dim, len(self.config.classes))

    def loss(self, outputs: Tensor, batch: dict[str, Any], progress: float = 0.0) -> Tensor:
        import torch.nn.functional as F

        return F.cross_entropy(outputs.float(), batch["target"].to(outputs.device).long())

    def metrics(self) -> ConfusionMetric:
        from pathray.models.heads import ConfusionMetric

        return ConfusionMetric(self.config.classes)

    def predict(self, outputs: Tensor, batch: dict[str, Any] | None = None) -> np.ndarray:
        """``(B,)`` int64 class index."""
        return outputs.argmax(1).cpu().numpy()

    def class_probs(self, outputs: Tensor) -> Tensor:
        return outputs.float().softmax(1)[:, :, None, None]
