"""Segmentation: a class per pixel (e.g. Gleason grading: Background, Benign, G3, G4, G5)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image
from pydantic import Field

from pathray.models.tasks.base import Colour, Output, Spatial, TaskConfigBase, TaskSpec
from pathray.registry import TASKS
from pathray.wsi.annotations import GLEASON_CLASSES, AnnotationIndex, segmentation_target

if TYPE_CHECKING:
    from torch import Tensor, nn

    from pathray.models.heads import ConfusionMetric


class SegmentationConfig(TaskConfigBase):
    """Class order is the output channel order; class 0 is what nothing annotated covers."""

    name: Literal["segmentation"] = "segmentation"
    classes: list[str] = Field(default_factory=lambda: [c.name for c in GLEASON_CLASSES], min_length=2)
    dice_weight: float = Field(1.0, ge=0, description="loss = CE + dice_weight * soft Dice")


def blend_classes(image: Image.Image, mask: np.ndarray, classes: list[str], colour: Colour) -> Image.Image:
    """Class colours blended over the pixels of every class but the first (Background)."""
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(classes)] = [colour(name, i) for i, name in enumerate(classes)]
    tinted = Image.fromarray(lut[mask])
    out = image.copy()
    out.paste(tinted, (0, 0), Image.fromarray(((mask > 0) * 110).astype(np.uint8)))
    return out


@TASKS.register("segmentation")
class SegmentationTask(TaskSpec):
    """A 1x1 conv read-out of the dense map, cross-entropy + soft Dice.

    Metrics: ``f1/<class>`` over all pixels (per class this is also its Dice), ``macro_f1`` over
    the classes present in targets or predictions *without Background* (the tissue classes are
    what is graded; Background dominates the pixels and would flatter the mean), ``dice`` (any
    annotated class against Background), ``accuracy``, ``balanced_accuracy``.
    """

    config_type = SegmentationConfig
    output = Output(class_map=True)
    class_targets = True
    config: SegmentationConfig

    def target(
        self, index: AnnotationIndex, x: int, y: int, extent: float, size: int, label: str = ""
    ) -> np.ndarray:
        return segmentation_target(index, x, y, extent, size, self.config.classes)

    def follow(self, target: np.ndarray, spatial: Spatial) -> np.ndarray:
        return spatial.pixels(target)

    def draw(self, image: Image.Image, target: Any, colour: Colour) -> Image.Image:
        return blend_classes(image, np.asarray(target), self.config.classes, colour)

    def build_head(self, embed_dim: int, dense_channels: int) -> nn.Module:
        from pathray.models.heads import ConvHead

        return ConvHead(dense_channels, len(self.config.classes))

    def loss(self, outputs: Tensor, batch: dict[str, Any], progress: float = 0.0) -> Tensor:
        import torch.nn.functional as F

        from pathray.models.heads import soft_dice_loss

        target = batch["target"].to(outputs.device).long()
        ce = F.cross_entropy(outputs.float(), target)
        if not self.config.dice_weight:
            return ce
        return ce + self.config.dice_weight * soft_dice_loss(outputs, target)

    def metrics(self) -> ConfusionMetric:
        from pathray.models.heads import ConfusionMetric

        return ConfusionMetric(self.config.classes, exclude=(0,), dice=True)

    def predict(self, outputs: Tensor, batch: dict[str, Any] | None = None) -> np.ndarray:
        """``(B, H, W)`` uint8 class map."""
        import torch

        return outputs.argmax(1).to(torch.uint8).cpu().numpy()

    def class_probs(self, outputs: Tensor) -> Tensor:
        return outputs.float().softmax(1)
