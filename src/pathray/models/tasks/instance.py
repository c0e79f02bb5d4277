"""Instance segmentation: every object (a nucleus, a gland) its own region."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image
from pydantic import Field

from pathray.models.tasks.base import Colour, Output, Spatial, TaskConfigBase, TaskSpec
from pathray.registry import TASKS
from pathray.wsi.annotations import AnnotationIndex, instance_target

if TYPE_CHECKING:
    from torch import Tensor, nn

    from pathray.models.instances import InstanceMetric


class InstanceConfig(TaskConfigBase):
    """Which polygons are the instances, and how close two centroids are to be one object."""

    name: Literal["instance"] = "instance"
    source: Literal["detections", "annotations"] = Field(
        "annotations", description="QuPath detection objects or annotation objects"
    )
    match_radius_um: float = Field(4.0, ge=0, description="centroids closer than this are one instance")


@TASKS.register("instance")
class InstanceTask(TaskSpec):
    """Foreground + normalised distance-to-boundary maps; BCE on the foreground, MSE on the distance.

    Targets are ``(size, size)`` int32 maps (0 background, 1..k an instance each). A whole slide is
    stitched as a foreground class map and one centroid point per instance.
    """

    config_type = InstanceConfig
    output = Output(class_map=True, points=True)
    score = "pq"  # panoptic quality: detection and segmentation quality of the nuclei in one
    config: InstanceConfig

    @property
    def classes(self) -> list[str]:
        return ["Background", "Foreground"]

    @property
    def point_classes(self) -> list[str]:
        return ["Instance"]

    def target(
        self, index: AnnotationIndex, x: int, y: int, extent: float, size: int, label: str = ""
    ) -> np.ndarray:
        return instance_target(index, x, y, extent, size, self.config.source)

    def follow(self, target: np.ndarray, spatial: Spatial) -> np.ndarray:
        return spatial.pixels(target)

    def draw(self, image: Image.Image, target: Any, colour: Colour) -> Image.Image:
        inst = np.asarray(target)
        edge = (inst != np.roll(inst, 1, 0)) | (inst != np.roll(inst, 1, 1))
        arr = np.asarray(image).copy()
        arr[edge & (inst > 0)] = (0, 255, 255)
        return Image.fromarray(arr)

    def build_head(self, embed_dim: int, dense_channels: int) -> nn.Module:
        from pathray.models.heads import ConvHead

        return ConvHead(dense_channels, 2, hidden=max(32, dense_channels))

    def loss(self, outputs: Tensor, batch: dict[str, Any], progress: float = 0.0) -> Tensor:
        import torch.nn.functional as F

        from pathray.models.instances import instance_targets

        fg, dist = (t.to(outputs.device) for t in instance_targets(batch["target"]))
        outputs = outputs.float()
        return F.binary_cross_entropy_with_logits(outputs[:, 0], fg) + F.mse_loss(
            outputs[:, 1].sigmoid(), dist
        )

    def metrics(self) -> InstanceMetric:
        from pathray.models.instances import InstanceMetric

        return InstanceMetric()

    def predict(self, outputs: Tensor, batch: dict[str, Any] | None = None) -> np.ndarray:
        """``(B, H, W)`` int32 instance maps (0 background, 1..k)."""
        from pathray.models.instances import instance_maps

        return instance_maps(outputs)

    def class_probs(self, outputs: Tensor) -> Tensor:
        import torch

        fg = outputs[:, :1].float().sigmoid()
        return torch.cat([1 - fg, fg], 1)

    def points(self, outputs: Tensor) -> list[np.ndarray]:
        from pathray.models.instances import instance_centroids

        probs = outputs[:, :2].float().sigmoid().cpu().numpy()
        return [instance_centroids(p[0], p[1]) for p in probs]
