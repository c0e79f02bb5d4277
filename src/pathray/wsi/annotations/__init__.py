"""Annotations: QuPath GeoJSON, polygons and points, class schemes, and the targets cut from them."""

from pathray.wsi.annotations.classes import (
    GLEASON_CLASSES,
    NUCLEUS_CLASSES,
    AnnotationClass,
    class_by_name,
    class_color,
)
from pathray.wsi.annotations.geojson import Annotation, read_geojson, write_geojson
from pathray.wsi.annotations.geometry import Polygon, points_of, polygons_of, rasterize
from pathray.wsi.annotations.targets import (
    AnnotationIndex,
    annotation_index,
    classification_target,
    detection_target,
    instance_target,
    segmentation_target,
)

__all__ = [
    "GLEASON_CLASSES",
    "NUCLEUS_CLASSES",
    "Annotation",
    "AnnotationClass",
    "AnnotationIndex",
    "Polygon",
    "annotation_index",
    "class_by_name",
    "class_color",
    "classification_target",
    "detection_target",
    "instance_target",
    "points_of",
    "polygons_of",
    "rasterize",
    "read_geojson",
    "segmentation_target",
    "write_geojson",
]
