"""What a model predicts and from which tiles: read from a package's ``model.yaml``, no weights needed."""

from __future__ import annotations

from dataclasses import dataclass

from pathray.models.package import PackageConfig
from pathray.models.tasks import TaskSpec, build_task


@dataclass(frozen=True)
class ModelSpec:
    """A model's task spec and input tiles; the planner, stitcher and outputs read only this.

    ``classes`` are the class-map values (index = value), ``point_classes`` the classes of points.
    """

    task: TaskSpec
    tile_size: int
    tile_mpp: float
    name: str = ""

    @classmethod
    def from_package(cls, config: PackageConfig, name: str = "") -> ModelSpec:
        return cls(build_task(config.task), config.input.tile_size, config.input.mpp, name)

    @property
    def task_name(self) -> str:
        return self.task.name

    @property
    def has_map(self) -> bool:
        return self.task.output.class_map

    @property
    def has_points(self) -> bool:
        return self.task.output.points

    @property
    def classes(self) -> list[str]:
        return self.task.map_classes

    @property
    def point_classes(self) -> list[str]:
        return self.task.point_classes

    @property
    def match_radius_um(self) -> float:
        return self.task.point_radius_um
