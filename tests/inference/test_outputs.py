"""Result files: QuPath GeoJSON that pathray reads back, PNGs of the map, and the summary."""

from __future__ import annotations

import json

import numpy as np
import pytest
from blocks import CLASSES, ColourSegmenter, write_blocks_slide
from PIL import Image

from pathray.inference.analyze import analyze_slide
from pathray.inference.config import InferenceConfig
from pathray.inference.outputs import OUTPUT_FILES, class_color, write_outputs
from pathray.inference.predictor import Predictor
from pathray.inference.spec import ModelSpec
from pathray.models.tasks import build_task
from pathray.wsi.annotations.geojson import read_geojson
from pathray.wsi.annotations.geometry import polygons_of
from pathray.wsi.backends.open import open_slide


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    labels = np.zeros((8, 8), np.int64)
    labels[1:4, 1:3] = 2  # G3: one 3x2-block region
    labels[5:7, 4:7] = 3  # G4
    labels[2:6, 5] = 3  # touching it: one region with a notch
    labels[0, 7] = 1  # Benign
    labels[3, 2] = 0  # a hole-free notch in G3
    path = write_blocks_slide(tmp_path_factory.mktemp("out") / "b.tiff", labels, 64, 2.0)
    spec = ModelSpec(build_task({"name": "segmentation", "classes": CLASSES}), 64, 2.0, name="colour")
    config = InferenceConfig(overlap=0.25, min_tissue=0.0, clip_to_tissue=False, min_region_um2=100)
    return str(path), analyze_slide(str(path), Predictor(ColourSegmenter(), spec, config))


def test_geojson_round_trips_with_class_names_colours_and_areas(analysed, tmp_path):
    uri, result = analysed
    files = write_outputs(result, str(tmp_path / "res"), open_slide(uri))
    assert sorted(files) == sorted(OUTPUT_FILES)
    annotations = read_geojson(tmp_path / "res" / "annotations.geojson")
    by_class: dict[str, float] = {}
    for ann in annotations:
        assert ann.object_type == "annotation"
        for poly in polygons_of(ann.geometry):
            by_class[ann.class_name] = by_class.get(ann.class_name, 0.0) + poly.area * (2.0**2) / 1e6
    assert set(by_class) == {"Benign", "G3", "G4"}  # Background is everything else: no polygons
    for name, area in by_class.items():
        # contours through pixel centres at 0.5 follow pixel edges except at corners (1/8 px each)
        assert area == pytest.approx(result.areas_mm2[name], rel=0.01)
    doc = json.loads((tmp_path / "res" / "annotations.geojson").read_text())
    for feature in doc["features"]:
        cls = feature["properties"]["classification"]
        assert cls["color"] == list(class_color(cls["name"]))


def test_mask_png_is_the_class_map_and_overlay_has_its_shape(analysed, tmp_path):
    uri, result = analysed
    write_outputs(result, str(tmp_path), open_slide(uri))
    mask = np.asarray(Image.open(tmp_path / "mask.png"))
    np.testing.assert_array_equal(mask, result.class_map)
    overlay = np.asarray(Image.open(tmp_path / "overlay.png"))
    assert overlay.shape == (*result.class_map.shape, 3)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["areas_mm2"]["G4"] == pytest.approx(result.areas_mm2["G4"], abs=1e-6)
    assert summary["gleason"]["primary"] == 4 and summary["gleason"]["secondary"] == 3
    assert summary["gleason"]["score"] == 7 and summary["tiles"] == result.tiles


def test_small_regions_are_left_out_of_the_geojson(analysed):
    _, result = analysed
    result.min_region_um2 = 64 * 64 * 4.0 * 1.5  # bigger than the one-block Benign region
    names = {f["properties"]["classification"]["name"] for f in result.geojson()["features"]}
    assert names == {"G3", "G4"}
