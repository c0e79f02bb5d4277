"""Training targets cut from QuPath-style annotations, for the same box a tile is cut from."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pathray.lru import LruCache
from pathray.storage import StorageConfig, read_bytes
from pathray.wsi.annotations.geojson import Annotation, read_geojson
from pathray.wsi.annotations.geometry import Polygon, points_of, polygons_of, rasterize


@dataclass
class AnnotationIndex:
    """A slide's annotations, prepared once: class regions, classified points, instance polygons."""

    regions: list[tuple[Polygon, str]] = field(default_factory=list)
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    point_classes: list[str] = field(default_factory=list)
    detections: list[Polygon] = field(default_factory=list)

    @classmethod
    def from_annotations(cls, annotations: list[Annotation]) -> AnnotationIndex:
        index = cls()
        pts, names = [], []
        for ann in annotations:
            polys = polygons_of(ann.geometry)
            if ann.object_type == "detection":
                index.detections.extend(polys)
            else:
                index.regions.extend((p, ann.class_name) for p in polys)
            found = points_of(ann.geometry)
            if len(found):
                pts.append(found)
                names.extend([ann.class_name] * len(found))
        if pts:
            index.points = np.concatenate(pts)
        index.point_classes = names
        return index

    @classmethod
    def load(cls, uri: str | None, storage: StorageConfig | None = None) -> AnnotationIndex:
        """Read a GeoJSON file from any storage pathray reads slides from; None: no annotations."""
        if not uri:
            return cls()
        return cls.from_annotations(read_geojson(read_bytes(uri, storage)))

    def region_classes(self) -> set[str]:
        return {name for _, name in self.regions}


ANNOTATIONS: LruCache[tuple[str, str], AnnotationIndex] = LruCache(64)


def annotation_index(uri: str, storage: StorageConfig | None = None) -> AnnotationIndex:
    """A slide's parsed annotations, kept per process (every chunk and reader batch reuses them)."""
    storage = storage or StorageConfig()
    return ANNOTATIONS.get_or_make(
        (uri, storage.identity()), lambda: AnnotationIndex.load(uri or None, storage)
    )


def class_indices(names: list[str]) -> dict[str, int]:
    return {name: i for i, name in enumerate(names)}


def segmentation_target(
    index: AnnotationIndex, x: int, y: int, extent: float, size: int, classes: list[str]
) -> np.ndarray:
    """Class index per pixel of a ``size`` px tile covering level-0 ``(x, y, extent, extent)``.

    Unannotated pixels are class 0 (Background); regions of classes not in ``classes`` are ignored.
    """
    lookup = class_indices(classes)
    polys = [(p, lookup[name]) for p, name in index.regions if name in lookup]
    return rasterize(polys, x, y, extent / size, size, size)


def classification_target(
    index: AnnotationIndex, x: int, y: int, extent: float, size: int, classes: list[str], label: str = ""
) -> int:
    """One class per tile: the sampler's label when it has one, else the majority annotated class.

    Background wins only when no annotated class covers any of the tile.
    """
    lookup = class_indices(classes)
    if label and label in lookup:
        return lookup[label]
    mask = segmentation_target(index, x, y, extent, max(8, min(size, 32)), classes)
    counts = np.bincount(mask.ravel(), minlength=len(classes))
    if counts[1:].sum() == 0:
        return 0
    return int(np.argmax(counts[1:]) + 1)


def detection_target(
    index: AnnotationIndex, x: int, y: int, extent: float, size: int, classes: list[str], max_points: int
) -> np.ndarray:
    """``(max_points, 3)`` float32 rows ``(px, py, class)`` in tile pixels; unused rows are -1."""
    out = np.full((max_points, 3), -1.0, np.float32)
    if not len(index.points):
        return out
    lookup = class_indices(classes)
    scale = size / extent
    rel = (index.points - (x, y)) * scale
    keep = (rel[:, 0] >= 0) & (rel[:, 0] < size) & (rel[:, 1] >= 0) & (rel[:, 1] < size)
    known = np.array([name in lookup for name in index.point_classes], bool)
    sel = np.flatnonzero(keep & known)[:max_points]
    out[: len(sel), :2] = rel[sel]
    out[: len(sel), 2] = [lookup[index.point_classes[i]] for i in sel]
    return out


def instance_target(
    index: AnnotationIndex, x: int, y: int, extent: float, size: int, source: str = "annotations"
) -> np.ndarray:
    """``(size, size)`` int32 map: 0 background, 1..k one id per instance polygon touching the tile."""
    polys = index.detections if source == "detections" else [p for p, _ in index.regions]
    numbered = [(p, i + 1) for i, p in enumerate(polys)]
    label = rasterize(numbered, x, y, extent / size, size, size, dtype=np.int32)
    # renumber to 1..k in order of appearance so ids are small and stable per tile
    ids = np.unique(label)
    ids = ids[ids > 0]
    remap = np.zeros(len(polys) + 1, np.int32)
    remap[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    return remap[label]
