"""Manifests: loading from any storage, every problem reported by row, nested stratified fractions."""

from __future__ import annotations

import pandas as pd
import pytest

from pathray.datasets.manifest import (
    ManifestError,
    assign_fractions,
    load_manifest,
    select_fraction,
    validate_manifest,
    write_manifest,
)


def frame(testdata, n_per_label: int = 10) -> pd.DataFrame:
    rows = []
    for label in ("G3", "G4", "G5", "Benign"):
        for i in range(n_per_label):
            rows.append(
                {
                    "slide_id": f"{label}-{i}",
                    "uri": str(testdata / "aperio/small.svs"),
                    "split": "train",
                    "cohort": "c",
                    "label": label,
                    "annotations_uri": None,
                }
            )
    return pd.DataFrame(rows)


def test_load_parquet_and_csv(tmp_path, testdata):
    df = frame(testdata, 2)
    for suffix in ("parquet", "csv"):
        path = write_manifest(df, tmp_path / f"m.{suffix}")
        back = load_manifest(path)
        assert list(back.slide_id) == list(df.slide_id)
        assert list(load_manifest(path.as_uri()).uri) == list(df.uri)


def test_load_errors(tmp_path):
    with pytest.raises(ManifestError, match="no such file"):
        load_manifest(tmp_path / "nope.parquet")
    with pytest.raises(ManifestError, match="ends in .parquet or .csv"):
        load_manifest(tmp_path / "m.xlsx")


def test_every_problem_is_reported_together_by_row(testdata):
    df = frame(testdata, 1)
    df.loc[1, "slide_id"] = df.loc[0, "slide_id"]
    df.loc[2, "uri"] = str(testdata / "nope.svs")
    df.loc[3, "annotations_uri"] = "s3:///no-bucket.geojson"
    df.loc[3, "split"] = ""
    with pytest.raises(ManifestError) as info:
        validate_manifest(df, source="m.parquet")
    problems = info.value.problems
    assert any(p.startswith("rows 1, 2: duplicate slide_id") for p in problems)
    assert any(p.startswith("row 3 (G5-0): uri no slide at") for p in problems)
    assert any(p.startswith("row 4 (Benign-0): empty split") for p in problems)
    assert any(p.startswith("row 4 (Benign-0): annotations_uri") and "bucket" in p for p in problems)
    assert len(problems) == 4
    assert str(info.value).startswith("m.parquet: 4 problem(s)")


def test_missing_columns():
    with pytest.raises(ManifestError, match="missing column"):
        validate_manifest(pd.DataFrame({"slide_id": ["a"]}))


def test_good_manifest_passes(testdata):
    df = frame(testdata, 2)
    assert validate_manifest(df) is df


def test_fractions_are_nested_stratified_and_seeded(testdata):
    df = assign_fractions(frame(testdata, 10), seed=3)
    subsets = {f: set(select_fraction(df, f).slide_id) for f in (0.1, 0.25, 0.5, 1.0)}
    assert subsets[0.1] < subsets[0.25] < subsets[0.5] < subsets[1.0]
    assert len(subsets[1.0]) == 40
    for f, expected in ((0.1, 1), (0.25, 3), (0.5, 5)):
        per_label = select_fraction(df, f).groupby("label").size()
        assert (per_label == expected).all(), (f, per_label.to_dict())
    again = assign_fractions(frame(testdata, 10), seed=3)
    assert again.fraction.tolist() == df.fraction.tolist()
    other = assign_fractions(frame(testdata, 10), seed=4)
    assert set(select_fraction(other, 0.25).slide_id) != subsets[0.25]


def test_fractions_only_for_the_split(testdata):
    df = frame(testdata, 4)
    df.loc[df.index % 4 == 0, "split"] = "test"
    out = assign_fractions(df)
    assert out[out.split == "test"].fraction.isna().all()
    assert out[out.split == "train"].fraction.notna().all()
    with pytest.raises(ValueError):
        assign_fractions(df, fractions=(0, 0.5))


def test_training_subsets_are_nested_and_keep_the_held_out_slides():
    import math

    import pandas as pd

    from pathray.datasets.manifest import training_subset

    frame = pd.DataFrame(
        {
            "slide_id": [f"s{i}" for i in range(20)],
            "uri": [f"/x/s{i}.svs" for i in range(20)],
            "split": ["train"] * 16 + ["test"] * 4,
            "label": ["G3", "G4"] * 10,
        }
    )
    subsets = {f: set(training_subset(frame, f, seed=3).slide_id) for f in (0.1, 0.25, 0.5, 1.0)}
    test = set(frame.slide_id[frame.split == "test"])
    for small, large in ((0.1, 0.25), (0.25, 0.5), (0.5, 1.0)):
        assert subsets[small] < subsets[large]
    for f, ids in subsets.items():
        assert test <= ids  # held-out slides never shrink
        train = ids - test
        assert len(train) == 2 * max(1, math.ceil(f * 8 - 1e-9))  # 8 training slides per label
        labels = set(frame.set_index("slide_id").loc[sorted(train), "label"])
        assert labels == {"G3", "G4"}  # stratified: every label keeps slides
    assert subsets[0.25] == set(training_subset(frame, 0.25, seed=3).slide_id)  # seeded
