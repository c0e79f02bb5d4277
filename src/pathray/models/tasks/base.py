"""What every task spec answers, and the per-task config each one validates.

A task spec is the one home of a task's knowledge; the stream, preview, training loop, evaluation,
predictor and model store ask it and never compare task names:

    spec = build_task(SegmentationConfig())
    target = spec.target(annotations, x, y, extent, size, label)   # numpy, in the tile's pixels
    target = spec.follow(target, spatial)                           # moved with the pixels
    head = spec.build_head(engine.embed_dim, engine.dense_channels)
    loss = spec.loss(head(pooled, dense, (H, W)), batch, progress)
    probs, points = spec.class_probs(outputs), spec.points(outputs)  # what a slide analysis stitches

Spec modules import no torch at module level (the stream's reader processes and the Serve ingress
use them); heads, losses and metrics are imported where they are built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from pathray.section import Section

if TYPE_CHECKING:
    from PIL import Image
    from torch import Tensor, nn

    from pathray.models.metrics import MetricAccumulator
    from pathray.wsi.annotations import AnnotationIndex

Colour = Callable[[str, int], tuple[int, int, int]]


class TaskConfigBase(Section):
    """Fields every task config has: the registry key of its spec."""

    name: str


@dataclass(frozen=True)
class Output:
    """What a whole-slide analysis stitches from a model: a class map, points, or both."""

    class_map: bool = False
    points: bool = False
    per_tile: bool = False  # one class per tile (a classifier): scored over tiles, not pixels


@dataclass(frozen=True)
class Spatial:
    """The flips and quarter turns one ``size`` px tile was given: targets with geometry follow the pixels."""

    size: int
    flip_x: bool = False
    flip_y: bool = False
    turns: int = 0  # np.rot90 turns, counter-clockwise

    def pixels(self, a: np.ndarray) -> np.ndarray:
        """An image or a per-pixel map, moved (rows, cols first; channels untouched)."""
        if self.flip_x:
            a = a[:, ::-1]
        if self.flip_y:
            a = a[::-1]
        if self.turns:
            a = np.rot90(a, self.turns)
        return np.ascontiguousarray(a)

    def points(self, points: np.ndarray) -> np.ndarray:
        """``(n, 3)`` rows ``(x, y, class)`` in tile px, moved; padding rows (class -1) stay."""
        size, out = self.size, points.copy()
        valid = out[:, 2] >= 0
        x, y = out[valid, 0].copy(), out[valid, 1].copy()
        if self.flip_x:
            x = size - x
        if self.flip_y:
            y = size - y
        for _ in range(self.turns):  # np.rot90 (counter-clockwise): (x, y) -> (y, size - x)
            x, y = y, size - x
        out[valid, 0], out[valid, 1] = x, y
        return out


class TaskSpec:
    """A task: targets, how they follow augmentation, head, loss, metrics, predictions and outputs.

    Class attributes describe the task to the code that runs it: ``learner`` names the training
    learner (``pathray.training.learners``), ``output`` what a slide analysis stitches, ``views``
    whether the stream delivers multi-crop views instead of ``(image, target)``, and
    ``class_targets`` whether targets are class indices (a constant predictor is then a baseline),
    and ``score`` which of its metrics (higher is better) chooses among a run's checkpoints.
    """

    config_type: ClassVar[type[TaskConfigBase]] = TaskConfigBase
    learner: ClassVar[str] = "supervised"
    output: ClassVar[Output] = Output()
    views: ClassVar[bool] = False
    class_targets: ClassVar[bool] = False
    score: ClassVar[str] = "macro_f1"

    def __init__(self, config: TaskConfigBase) -> None:
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    @property
    def name(self) -> str:
        return self.config.name

    # -- classes ----------------------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        """What the model's outputs name (channels or labels), in order; empty when nothing."""
        return list(getattr(self.config, "classes", []))

    @property
    def map_classes(self) -> list[str]:
        """Classes of the stitched class map (index = map value)."""
        return self.classes if self.output.class_map else []

    @property
    def point_classes(self) -> list[str]:
        """Classes of stitched points."""
        return []

    @property
    def point_radius_um(self) -> float:
        """Points closer than this are one object (duplicates across tile borders): the task's
        ``match_radius_um``, 4 µm (about a nucleus) where it has none."""
        return float(getattr(self.config, "match_radius_um", 4.0))

    # -- data -------------------------------------------------------------------------------------
    def target(
        self, index: AnnotationIndex, x: int, y: int, extent: float, size: int, label: str = ""
    ) -> Any:
        """The target of a ``size`` px tile covering level-0 ``(x, y, extent, extent)``; None: none."""
        return None

    def follow(self, target: Any, spatial: Spatial) -> Any:
        """``target`` after the tile's flips and turns (unchanged: targets without geometry)."""
        return target

    def draw(self, image: Image.Image, target: Any, colour: Colour) -> Image.Image:
        """The tile with its target drawn over it (preview); ``image`` is at the tile's own size."""
        return image

    # -- model ------------------------------------------------------------------------------------
    def build_head(self, embed_dim: int, dense_channels: int) -> nn.Module:
        raise NotImplementedError(f"task {self.name!r} has no head")

    def loss(self, outputs: Any, batch: dict[str, Any], progress: float = 0.0) -> Tensor:
        raise NotImplementedError(f"task {self.name!r} has no loss")

    def metrics(self) -> MetricAccumulator:
        raise NotImplementedError(f"task {self.name!r} has no metrics")

    def predict(self, outputs: Any, batch: dict[str, Any] | None = None) -> Any:
        raise NotImplementedError(f"task {self.name!r} has no predictions")

    def class_probs(self, outputs: Any) -> Tensor:
        """``(B, C, H, W)`` class probabilities over ``map_classes`` (``(B, C, 1, 1)``: one per tile)."""
        raise NotImplementedError(f"task {self.name!r} stitches no class map")

    def points(self, outputs: Any) -> list[np.ndarray]:
        """Per tile an ``(n, 4)`` float32 array ``(x, y, class, score)`` in tile px."""
        raise NotImplementedError(f"task {self.name!r} stitches no points")

    # -- state that is checkpointed beside the model (DINO's loss centre) -------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
