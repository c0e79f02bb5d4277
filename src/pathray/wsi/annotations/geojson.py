"""QuPath-style GeoJSON annotations: write a FeatureCollection, read every variant QuPath exports."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pathray.wsi.annotations.classes import GLEASON_CLASSES, NUCLEUS_CLASSES, AnnotationClass, class_by_name

GEOMETRY_TYPES = ("Polygon", "MultiPolygon", "Point", "MultiPoint", "LineString", "MultiLineString")
OBJECT_TYPES = ("annotation", "detection")
_QUPATH_IDS = {"PathAnnotationObject": "annotation", "PathDetectionObject": "detection"}


@dataclass(frozen=True)
class Annotation:
    """One classified GeoJSON geometry; coordinates are level-0 pixels as QuPath writes them."""

    geometry: dict[str, Any]
    class_name: str
    object_type: str = "annotation"


def write_geojson(
    path: Path,
    annotations: Sequence[Annotation],
    classes: Sequence[AnnotationClass] = GLEASON_CLASSES + NUCLEUS_CLASSES,
) -> None:
    """Write ``annotations`` as a FeatureCollection that QuPath imports with names and colours.

    Colours come from ``classes`` so a class looks the same in QuPath whoever wrote the file;
    an unknown class name is an error rather than a silently grey class.
    """
    features = []
    for ann in annotations:
        cls = class_by_name(ann.class_name, classes)
        features.append(
            {
                "type": "Feature",
                "geometry": ann.geometry,
                "properties": {
                    "objectType": ann.object_type,
                    "classification": {"name": cls.name, "color": list(cls.color)},
                },
            }
        )
    doc = {"type": "FeatureCollection", "features": features}
    Path(path).write_text(json.dumps(doc, separators=(",", ":")), encoding="utf-8")


def read_geojson(source: str | bytes | Path) -> list[Annotation]:
    """Read annotations from a path, bytes or JSON text.

    Accepts a FeatureCollection, a bare list of Features and a single Feature, because QuPath
    exports all three. A ``str`` that starts with ``{`` or ``[`` is JSON text, otherwise a path.

    Raises:
        ValueError: the input is not JSON or not GeoJSON features; the message says which
            feature and what is wrong with it.
    """
    if isinstance(source, Path) or (isinstance(source, str) and source.lstrip()[:1] not in ("{", "[")):
        where = str(source)
        text: str | bytes = Path(source).read_bytes()
    else:
        where, text = "GeoJSON", source
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where}: not valid JSON: {exc}") from None
    return [_parse_feature(f, i, where) for i, f in enumerate(_features(doc, where))]


def _features(doc: Any, where: str) -> list[Any]:
    if isinstance(doc, list):
        return doc
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: expected a FeatureCollection, Feature or list, got {type(doc).__name__}")
    kind = doc.get("type")
    if kind == "FeatureCollection":
        features = doc.get("features")
        if not isinstance(features, list):
            raise ValueError(f"{where}: FeatureCollection has no 'features' list")
        return features
    if kind == "Feature":
        return [doc]
    raise ValueError(f"{where}: expected type FeatureCollection or Feature, got {kind!r}")


def _parse_feature(feature: Any, i: int, where: str) -> Annotation:
    if not isinstance(feature, dict) or feature.get("type") != "Feature":
        raise ValueError(f"{where}: item {i} is not a GeoJSON Feature")
    geometry = feature.get("geometry")
    if not isinstance(geometry, dict):
        raise ValueError(f"{where}: feature {i} has no geometry")
    kind = geometry.get("type")
    if kind not in GEOMETRY_TYPES:
        raise ValueError(
            f"{where}: feature {i} has geometry type {kind!r}; supported: {', '.join(GEOMETRY_TYPES)}"
        )
    problem = _coordinate_problem(kind, geometry.get("coordinates"))
    if problem:
        raise ValueError(f"{where}: feature {i} ({kind}): {problem}")
    props = feature.get("properties") or {}
    if not isinstance(props, dict):
        raise ValueError(f"{where}: feature {i} has properties that are not an object")
    object_type = props.get("objectType") or _QUPATH_IDS.get(str(feature.get("id")), "annotation")
    if object_type not in OBJECT_TYPES:
        object_type = "annotation"  # QuPath also writes tiles, cells, TMA cores: treat them as regions
    return Annotation(
        geometry=geometry, class_name=_class_name(props.get("classification")), object_type=object_type
    )


def _class_name(classification: Any) -> str:
    """QuPath writes ``{"name": ...}``; derived classes as ``{"names": [...]}``; none: unclassified."""
    if isinstance(classification, dict):
        if isinstance(classification.get("name"), str):
            return classification["name"]
        names = classification.get("names")
        if isinstance(names, list) and names:
            return ": ".join(str(n) for n in names)
    if isinstance(classification, str):
        return classification
    return ""


def _coordinate_problem(kind: str, coords: Any) -> str | None:
    depth = {
        "Point": 0,
        "MultiPoint": 1,
        "LineString": 1,
        "MultiLineString": 2,
        "Polygon": 2,
        "MultiPolygon": 3,
    }[kind]
    if not _is_nested(coords, depth):
        return "coordinates are not " + "lists of " * depth + "[x, y] positions"
    rings = [coords] if kind == "Polygon" else coords if kind == "MultiPolygon" else []
    for polygon in rings:
        for ring in polygon:
            if len(ring) < 4:
                return f"a ring has {len(ring)} positions; a closed ring needs at least 4"
    return None


def _is_nested(value: Any, depth: int) -> bool:
    if depth == 0:
        return (
            isinstance(value, list)
            and len(value) >= 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        )
    return isinstance(value, list) and all(_is_nested(v, depth - 1) for v in value)
