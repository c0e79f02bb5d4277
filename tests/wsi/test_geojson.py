"""QuPath GeoJSON: round trip, the variants QuPath exports, and clear errors for bad files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pathray.wsi.annotations.classes import GLEASON_CLASSES, NUCLEUS_CLASSES, class_by_name
from pathray.wsi.annotations.geojson import Annotation, read_geojson, write_geojson
from pathray.wsi.synth import generate_geometry

SQUARE = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]}
ANNOTATIONS = [
    Annotation(SQUARE, "G4"),
    Annotation({"type": "MultiPolygon", "coordinates": [SQUARE["coordinates"]] * 2}, "Benign"),
    Annotation({"type": "MultiPoint", "coordinates": [[1.5, 2.25], [3, 4]]}, "Tumor"),
    Annotation({"type": "Point", "coordinates": [7, 8]}, "Stromal", "detection"),
]


def test_round_trip_keeps_geometry_class_and_object_type(tmp_path: Path):
    path = tmp_path / "a.geojson"
    write_geojson(path, ANNOTATIONS)
    assert read_geojson(path) == ANNOTATIONS
    assert read_geojson(str(path)) == ANNOTATIONS
    doc = json.loads(path.read_text())
    assert doc["type"] == "FeatureCollection"
    props = doc["features"][0]["properties"]
    assert props == {"objectType": "annotation", "classification": {"name": "G4", "color": [255, 128, 0]}}


def test_reads_bare_feature_list_single_feature_bytes_and_text(tmp_path: Path):
    path = tmp_path / "a.geojson"
    write_geojson(path, ANNOTATIONS)
    features = json.loads(path.read_text())["features"]
    assert read_geojson(json.dumps(features).encode()) == ANNOTATIONS
    assert read_geojson(json.dumps(features[0])) == ANNOTATIONS[:1]


def test_reads_older_qupath_exports():
    features = [
        {
            "type": "Feature",
            "id": "PathDetectionObject",
            "geometry": SQUARE,
            "properties": {"classification": {"name": "Tumor", "colorRGB": -3670016}, "isLocked": False},
        },
        {
            "type": "Feature",
            "geometry": SQUARE,
            "properties": {"classification": {"names": ["Tumor", "Positive"]}},
        },
        {"type": "Feature", "geometry": SQUARE, "properties": {}},
    ]
    got = read_geojson(json.dumps(features))
    assert [(a.class_name, a.object_type) for a in got] == [
        ("Tumor", "detection"),
        ("Tumor: Positive", "annotation"),
        ("", "annotation"),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        (b"42", "expected a FeatureCollection"),
        ('{"type": "FeatureCollection"}', "no 'features' list"),
        ('{"type": "Topology"}', "got 'Topology'"),
        ('[{"type": "Feature", "properties": {}}]', "feature 0 has no geometry"),
        ('[{"type": "Feature", "geometry": {"type": "GeometryCollection"}}]', "'GeometryCollection'"),
        (
            '[{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}}]',
            "at least 4",
        ),
        (
            '[{"type": "Feature", "geometry": {"type": "Point", "coordinates": ["a", "b"]}}]',
            "[x, y] positions",
        ),
        ('[{"type": "Feature", "geometry": {"type": "Point", "coordinates": [0, 0]}}, 3]', "item 1 is not"),
    ],
)
def test_malformed_input_names_the_problem(text: str | bytes, message: str):
    with pytest.raises(ValueError, match="GeoJSON: .*" + re.escape(message)):
        read_geojson(text)


def test_bad_file_names_the_path(tmp_path: Path):
    path = tmp_path / "broken.geojson"
    path.write_text('{"type": "Feature"}')
    with pytest.raises(ValueError, match="broken.geojson: feature 0 has no geometry"):
        read_geojson(path)


def test_unknown_class_lists_the_known_ones(tmp_path: Path):
    with pytest.raises(KeyError, match="G6.*Background, Benign, G3, G4, G5"):
        write_geojson(tmp_path / "x.geojson", [Annotation(SQUARE, "G6")], GLEASON_CLASSES)
    assert class_by_name("Tumor", NUCLEUS_CLASSES).index == 2


def test_synthetic_truth_is_polygons_and_one_multipoint_per_nucleus_class(tmp_path: Path):
    geometry = generate_geometry(2, 2048, 2048)
    path = tmp_path / "truth.geojson"
    write_geojson(path, geometry.annotations())
    got = read_geojson(path)
    polygons = [a for a in got if a.geometry["type"] == "Polygon"]
    points = [a for a in got if a.geometry["type"] == "MultiPoint"]
    assert [a.class_name for a in polygons] == [r.class_name for r in geometry.regions]
    assert sorted(a.class_name for a in points) == sorted({"Stromal", "Epithelial", "Tumor"})
    assert sum(len(a.geometry["coordinates"]) for a in points) == len(geometry.nuclei_xy)
    ring = polygons[0].geometry["coordinates"][0]
    assert ring[0] == ring[-1] and all(0 <= x <= 2048 and 0 <= y <= 2048 for x, y in ring)
