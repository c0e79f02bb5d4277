"""Manifests: stratified slide-level splits, Parquet/CSV writing, and no Ray needed for either."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from pathray.datasets.manifest import MANIFEST_COLUMNS, stratified_split, synthetic_manifest, write_manifest
from pathray.wsi.synth import SyntheticSlide


def test_split_is_deterministic_per_seed():
    labels = ["Benign"] * 20 + ["G3"] * 15 + ["G4"] * 10
    assert stratified_split(labels, seed=3) == stratified_split(labels, seed=3)
    assert stratified_split(labels, seed=3) != stratified_split(labels, seed=4)


def test_split_proportions_per_label():
    labels = ["A"] * 100 + ["B"] * 50 + ["C"] * 7
    splits = stratified_split(labels, seed=0)
    counts = Counter(zip(labels, splits, strict=True))
    assert [counts["A", s] for s in ("train", "val", "test")] == [60, 20, 20]
    assert [counts["B", s] for s in ("train", "val", "test")] == [30, 10, 10]
    assert sum(counts["C", s] for s in ("train", "val", "test")) == 7 and counts["C", "train"] == 4


def test_small_labels_reach_train_and_every_split_gets_slides():
    labels = ["Benign", "G3", "G4", "G5"] * 2  # the demo's 8 synthetic slides
    splits = stratified_split(labels, seed=0)
    assert all(
        ("train" in {s for lab, s in zip(labels, splits, strict=True) if lab == x}) for x in set(labels)
    )
    assert Counter(splits) == {"train": 4, "val": 2, "test": 2}
    odd = stratified_split(["x", "x", "y"], {"train": 0.2, "val": 0.4, "test": 0.4}, seed=1)
    assert odd[:2].count("train") == 1


def test_split_rejects_bad_fractions():
    with pytest.raises(ValueError, match="fractions"):
        stratified_split(["a"], {"train": -1.0, "test": 0.5})
    with pytest.raises(ValueError, match="fractions"):
        stratified_split(["a"], {})


def _slides(tmp_path: Path) -> list[SyntheticSlide]:
    labels = ["Benign", "G3", "G4", "G5", "Benign", "G3"]
    return [
        SyntheticSlide(f"s{i}", tmp_path / f"s{i}.svs", tmp_path / f"s{i}.geojson", lab, 1024, 1024, 0.25)
        for i, lab in enumerate(labels)
    ]


def test_synthetic_manifest_uris(tmp_path: Path):
    slides = _slides(tmp_path)
    remote = synthetic_manifest(slides, uri_prefix="s3://bucket/slides/", seed=0)
    assert list(remote.columns) == list(MANIFEST_COLUMNS)
    assert remote.uri.tolist()[0] == "s3://bucket/slides/s0.svs"
    assert remote.annotations_uri.tolist()[0] == "s3://bucket/slides/s0.geojson"
    assert set(remote.cohort) == {"synthetic"} and remote.label.tolist() == [s.label for s in slides]
    local = synthetic_manifest(slides)
    assert local.uri[0] == str((tmp_path / "s0.svs").resolve())
    assert local.split.tolist() == remote.split.tolist()


@pytest.mark.parametrize("name", ["m.parquet", "sub/m.csv"])
def test_write_manifest_round_trips(tmp_path: Path, name: str):
    frame = synthetic_manifest(_slides(tmp_path), uri_prefix="s3://b/slides")
    path = write_manifest(frame.to_dict("records"), tmp_path / name)
    back = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    pd.testing.assert_frame_equal(back, frame)


def test_write_manifest_names_missing_columns(tmp_path: Path):
    frame = pd.DataFrame({"slide_id": ["a"], "cohort": ["c"], "label": ["x"], "annotations_uri": [""]})
    with pytest.raises(ValueError, match="missing columns: uri, split"):
        write_manifest(frame, tmp_path / "m.parquet")
    with pytest.raises(ValueError, match=r"\.parquet or \.csv"):
        write_manifest(synthetic_manifest(_slides(tmp_path)), tmp_path / "m.json")


def test_manifest_module_does_not_import_ray():
    code = (
        "import sys, pathray.datasets, pathray.datasets.manifest\n"
        "print(any(m == 'ray' or m.startswith('ray.') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
