"""Targets from QuPath-style annotations, as each task spec cuts them: masks, labels, points, instances."""

from __future__ import annotations

import json

import numpy as np

from pathray.models.tasks import build_task
from pathray.wsi.annotations import Annotation, AnnotationIndex, read_geojson


def box(x0, y0, x1, y1):
    return {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}


ANNOTATIONS = [
    Annotation(box(0, 0, 100, 200), "G3"),
    Annotation(box(100, 0, 200, 50), "G5"),
    Annotation(box(150, 150, 170, 170), "Unknown-class"),
    Annotation({"type": "MultiPoint", "coordinates": [[10, 10], [150, 20], [199, 199], [300, 300]]}, "Tumor"),
    Annotation({"type": "Point", "coordinates": [60, 120]}, "Stromal"),
    Annotation(box(20, 20, 40, 40), "Tumor", object_type="detection"),
    Annotation(box(120, 120, 140, 180), "Tumor", object_type="detection"),
]
CLASSES = ["Background", "Benign", "G3", "G4", "G5"]


def index() -> AnnotationIndex:
    return AnnotationIndex.from_annotations(ANNOTATIONS)


def test_segmentation_mask_at_tile_resolution():
    task = build_task({"name": "segmentation", "classes": CLASSES})
    mask = task.target(index(), 0, 0, extent=200, size=20)  # 10 level-0 px per target pixel
    assert mask.shape == (20, 20) and mask.dtype == np.uint8
    assert (mask[:, :10] == 2).all()  # G3: x 0..100
    assert (mask[:5, 10:] == 4).all()  # G5: x 100..200, y 0..50
    assert (mask[5:, 10:] == 0).all()  # unannotated, and the unknown class, are Background
    assert set(np.unique(mask)) == {0, 2, 4}


def test_classification_uses_the_sampler_label_or_the_majority():
    idx = index()
    task = build_task({"name": "classification", "classes": CLASSES})
    assert task.target(idx, 0, 0, 200, 64, label="G5") == 4
    assert task.target(idx, 0, 0, 200, 64) == 2  # G3 covers half the box, G5 an eighth
    assert task.target(idx, 120, 0, 80, 64) == 4
    assert task.target(idx, 500, 500, 80, 64) == 0


def test_detection_points_in_tile_pixels():
    task = build_task({"name": "detection", "max_points": 4})  # Stromal, Epithelial, Tumor
    pts = task.target(index(), 0, 0, extent=200, size=100)  # half scale
    assert pts.shape == (4, 3) and pts.dtype == np.float32
    rows = {tuple(r) for r in pts.tolist() if r[2] >= 0}
    # (10,10) and (150,20) are Tumor (2); (60,120) Stromal (0); (199,199) inside; (300,300) outside
    assert rows == {(5.0, 5.0, 2.0), (75.0, 10.0, 2.0), (99.5, 99.5, 2.0), (30.0, 60.0, 0.0)}
    empty = task.target(index(), 1000, 1000, 200, 100)
    assert (empty == -1).all()


def test_instances_are_numbered_per_tile():
    task = build_task({"name": "instance", "source": "detections"})
    inst = task.target(index(), 0, 0, extent=200, size=200)
    assert inst.dtype == np.int32
    assert set(np.unique(inst)) == {0, 1, 2}
    assert (inst[20:40, 20:40] == 1).all() and (inst[120:180, 120:140] == 2).all()
    assert (inst > 0).sum() == 20 * 20 + 20 * 60
    right = task.target(index(), 100, 100, extent=100, size=100)
    assert set(np.unique(right)) == {0, 1}  # only the second detection; renumbered to 1


def test_ssl_has_no_target():
    assert build_task({"name": "ssl"}).target(index(), 0, 0, 100, 10) is None


def test_load_from_storage(tmp_path):
    path = tmp_path / "a.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    assert AnnotationIndex.load(str(path)).regions == []
    assert AnnotationIndex.load(None).points.shape == (0, 2)
    feats = [
        {"type": "Feature", "geometry": box(0, 0, 10, 10), "properties": {"classification": {"name": "G4"}}}
    ]
    path.write_text(json.dumps(feats))
    loaded = AnnotationIndex.load(path.as_uri())
    assert loaded.region_classes() == {"G4"}
    assert len(read_geojson(path)) == 1
