"""Detection: cells as points with a class (e.g. Stromal, Epithelial, Tumor nuclei)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image, ImageDraw
from pydantic import Field

from pathray.models.tasks.base import Colour, Output, Spatial, TaskConfigBase, TaskSpec
from pathray.registry import TASKS
from pathray.wsi.annotations import NUCLEUS_CLASSES, AnnotationIndex, detection_target

if TYPE_CHECKING:
    from torch import Tensor, nn

    from pathray.models.points import DetectionMetric


class DetectionConfig(TaskConfigBase):
    """Point classes (one heatmap channel each, no background channel) and how points are scored."""

    name: Literal["detection"] = "detection"
    classes: list[str] = Field(default_factory=lambda: [c.name for c in NUCLEUS_CLASSES], min_length=1)
    sigma_um: float = Field(2.0, gt=0, description="gaussian heatmap sigma, µm")
    match_radius_um: float = Field(4.0, ge=0, description="true and predicted points match within, µm")
    peak_threshold: float = Field(0.3, gt=0, lt=1, description="least heatmap value of a predicted point")
    max_points: int = Field(512, ge=1, description="points kept per tile (padded with -1)")


@TASKS.register("detection")
class DetectionTask(TaskSpec):
    """A centre heatmap per point class, CenterNet's focal loss, F1 within ``match_radius_um``.

    Targets are ``(max_points, 3)`` rows ``(x, y, class)`` in tile px (unused rows -1); a whole
    slide is stitched as points, each kept once across overlapping tiles.
    """

    config_type = DetectionConfig
    output = Output(points=True)
    config: DetectionConfig

    @property
    def point_classes(self) -> list[str]:
        return list(self.config.classes)

    def target(
        self, index: AnnotationIndex, x: int, y: int, extent: float, size: int, label: str = ""
    ) -> np.ndarray:
        return detection_target(index, x, y, extent, size, self.config.classes, self.config.max_points)

    def follow(self, target: np.ndarray, spatial: Spatial) -> np.ndarray:
        return spatial.points(target)

    def draw(self, image: Image.Image, target: Any, colour: Colour) -> Image.Image:
        out = image.copy()
        draw = ImageDraw.Draw(out)
        r = max(2, out.width // 48)
        for x, y, c in np.asarray(target):
            k = int(c)
            if k < 0:
                continue
            name = self.config.classes[k] if k < len(self.config.classes) else str(k)
            draw.ellipse([x - r, y - r, x + r, y + r], outline=colour(name, k), width=max(1, r // 2))
        return out

    def build_head(self, embed_dim: int, dense_channels: int) -> nn.Module:
        from torch import nn

        from pathray.models.heads import ConvHead

        head = ConvHead(dense_channels, len(self.config.classes), hidden=max(32, dense_channels))
        last = head.net[-1]
        assert isinstance(last, nn.Conv2d) and last.bias is not None
        nn.init.constant_(last.bias, -math.log((1 - 0.1) / 0.1))  # start at p=0.1: stable focal loss
        return head

    def heatmaps(self, batch: dict[str, Any], hw: tuple[int, int], device: Any = None) -> Tensor:
        """The target heatmaps ``(B, classes, H, W)`` of a batch's points."""
        from pathray.models.points import render_heatmaps

        points = batch["target"].to(device)
        mpp = batch["mpp"].cpu()  # read per tile as a python float: keep it off the GPU
        return render_heatmaps(points, mpp, len(self.config.classes), hw, self.config.sigma_um)

    def loss(self, outputs: Tensor, batch: dict[str, Any], progress: float = 0.0) -> Tensor:
        from pathray.models.points import focal_loss

        return focal_loss(outputs, self.heatmaps(batch, tuple(outputs.shape[-2:]), outputs.device))

    def metrics(self) -> DetectionMetric:
        from pathray.models.points import DetectionMetric

        c = self.config
        return DetectionMetric(c.classes, c.match_radius_um, c.peak_threshold)

    def predict(self, outputs: Tensor, batch: dict[str, Any] | None = None) -> list[np.ndarray]:
        """Per tile a ``(n, 4)`` float32 array of ``(x, y, class, score)`` in tile pixels."""
        return self.points(outputs)

    def points(self, outputs: Tensor) -> list[np.ndarray]:
        from pathray.models.points import decode_points

        return decode_points(outputs.float().sigmoid(), self.config.peak_threshold)
