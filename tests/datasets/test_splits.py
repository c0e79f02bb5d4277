"""Grouped, stratified, seeded splits of a user's manifest; nested training fractions grouped by case;
`pathray data split` writing the split manifest (locally and to the S3 endpoint) and its counts."""

from __future__ import annotations

import random
from collections import Counter

import pandas as pd
import pytest

from pathray.datasets.manifest import load_manifest
from pathray.datasets.splits import (
    assign_fractions,
    grouped_split,
    select_fraction,
    split_manifest,
    training_subset,
)

LABELS = ("Benign", "G3", "G4", "G5")


def cases_frame(n_cases: int = 120, seed: int = 0, mixed: int = 0) -> pd.DataFrame:
    """``n_cases`` cases of 1-5 slides each, one label per case (``mixed`` cases get a second one)."""
    rng = random.Random(seed)
    rows = []
    for c in range(n_cases):
        label = LABELS[rng.randrange(len(LABELS)) if c % 3 else c % len(LABELS)]
        for k in range(rng.randint(1, 5)):
            other = c < mixed and k == 1
            rows.append(
                {
                    "slide_id": f"p{c:03d}-s{k}",
                    "uri": f"s3://slides/p{c:03d}-s{k}.svs",
                    "case_id": f"p{c:03d}",
                    "label": LABELS[(LABELS.index(label) + 1) % 4] if other else label,
                }
            )
    return pd.DataFrame(rows)


def assert_grouped(frame: pd.DataFrame, column: str = "split") -> None:
    sides = frame.groupby("case_id")[column].nunique(dropna=False)
    assert (sides == 1).all(), sides[sides > 1]


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize(
    "fractions",
    [
        {"train": 0.7, "val": 0.15, "test": 0.15},
        {"train": 0.6, "val": 0.2, "test": 0.2},
        {"train": 0.5, "test": 0.5},
        {"train": 0.8, "val": 0.1, "test": 0.1},
    ],
)
def test_no_case_is_ever_on_two_sides(seed, fractions):
    frame = cases_frame(150, seed=seed, mixed=10)
    out = split_manifest(frame, fractions, seed=seed)
    assert_grouped(out)
    assert set(out.split) == {k for k, v in fractions.items() if v > 0}
    again = split_manifest(frame, fractions, seed=seed)
    assert again.split.tolist() == out.split.tolist()  # seeded
    assert split_manifest(frame, fractions, seed=seed + 100).split.tolist() != out.split.tolist()


@pytest.mark.parametrize("seed", [0, 3])
def test_label_proportions_hold_in_every_split(seed):
    frame = cases_frame(240, seed=seed)
    fractions = {"train": 0.7, "val": 0.15, "test": 0.15}
    out = split_manifest(frame, fractions, seed=seed)
    overall = out.label.value_counts(normalize=True)
    for name, share in fractions.items():
        part = out[out.split == name]
        assert abs(len(part) / len(out) - share) < 0.03, (name, len(part) / len(out))
        within = part.label.value_counts(normalize=True).reindex(overall.index, fill_value=0)
        assert (within - overall).abs().max() < 0.07, (name, within.to_dict(), overall.to_dict())
    # per label, slide shares are close to the ratios too: each label is spread over all splits
    for label, rows in out.groupby("label"):
        shares = rows.split.value_counts(normalize=True)
        assert abs(shares.get("train", 0) - 0.7) < 0.1, (label, shares.to_dict())
        assert shares.get("val", 0) > 0 and shares.get("test", 0) > 0, (label, shares.to_dict())


def test_without_a_case_column_each_slide_is_its_own_case_and_without_labels_it_is_unstratified():
    frame = cases_frame(60).drop(columns=["case_id"])
    out = split_manifest(frame, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=2)
    counts = Counter(zip(out.label, out.split, strict=True))
    for label in set(out.label):
        n = (out.label == label).sum()
        assert abs(counts[label, "train"] - 0.6 * n) <= 1, (label, n, counts)  # slide-level, exact
    bare = split_manifest(frame.drop(columns=["label"]), {"train": 0.5, "test": 0.5}, seed=2)
    assert Counter(bare.split) == {"train": len(frame) // 2 + len(frame) % 2, "test": len(frame) // 2}


def test_a_case_with_two_labels_is_stratified_under_its_most_common_one():
    frame = pd.DataFrame(
        {
            "case_id": ["a", "a", "a", "b", "c", "d"],
            "label": ["G3", "G3", "G4", "G4", "G4", "G3"],
        }
    )
    # case a counts as G3 (2 of 3 slides): G3 has cases a, d; G4 has cases b, c
    splits = grouped_split(["G3"] * 3 + ["G4", "G4", "G3"], list("aaabcd"), {"train": 0.5, "test": 0.5})
    assert len(set(splits[:3])) == 1
    out = split_manifest(frame, {"train": 0.5, "test": 0.5})
    assert out.split.tolist() == splits


def test_nested_fractions_stay_nested_and_grouped():
    frame = split_manifest(cases_frame(160, seed=4), {"train": 0.7, "val": 0.15, "test": 0.15}, seed=4)
    out = assign_fractions(frame, seed=5)
    train = out[out.split == "train"]
    assert train.fraction.notna().all() and out[out.split != "train"].fraction.isna().all()
    assert_grouped(train, "fraction")  # a case's slides enter a subset together
    subsets = {f: set(select_fraction(out, f).slide_id) for f in (0.1, 0.25, 0.5, 1.0)}
    assert subsets[0.1] < subsets[0.25] < subsets[0.5] < subsets[1.0] == set(train.slide_id)
    for f in (0.1, 0.25, 0.5):
        chosen = select_fraction(out, f)
        for label, rows in train.groupby("label"):
            got = (chosen.label == label).sum()
            assert got >= 1 and abs(got - f * len(rows)) <= 5, (f, label, got, len(rows))  # <= one case
    for f in (0.1, 0.25, 0.5):  # training_subset: the same subsets, held-out slides kept whole
        subset = training_subset(frame, f, seed=5)
        assert set(subset.slide_id) == subsets[f] | set(frame.slide_id[frame.split != "train"])


def test_data_split_cli_writes_the_split_manifest_and_prints_counts(tmp_path):
    from typer.testing import CliRunner

    from pathray.cli import app

    frame = cases_frame(90, seed=9, mixed=2)
    source = tmp_path / "mine.csv"
    frame.assign(split="old").to_csv(source, index=False)
    runner = CliRunner()
    result = runner.invoke(
        app, ["data", "split", str(source), "--val", "0.2", "--test", "0.1", "--seed", "3"]
    )
    assert result.exit_code == 0, result.output
    written = load_manifest(tmp_path / "mine.split.csv")
    expected = split_manifest(frame, {"train": 0.7, "val": 0.2, "test": 0.1}, seed=3)
    assert written.split.tolist() == expected.split.tolist()
    assert written.drop(columns="split").equals(frame)
    assert_grouped(written)
    lines = result.output.splitlines()
    header = lines[0].split()
    assert header == ["split", "slides", "cases", *LABELS]
    table = {line.split()[0]: [int(v) for v in line.split()[1:]] for line in lines[1:5]}
    for name in ("train", "val", "test"):
        part = written[written.split == name]
        labels = [int((part.label == label).sum()) for label in LABELS]
        assert table[name] == [len(part), part.case_id.nunique(), *labels]
    assert table["total"][:2] == [len(frame), frame.case_id.nunique()]
    assert "grouped by: case_id; stratified by: label" in result.output
    assert "2 case(s) with more than one label" in result.output and "p000, p001" in result.output

    other = tmp_path / "out" / "split.parquet"
    result = runner.invoke(app, ["data", "split", str(source), "--out", str(other), "--group", "none"])
    assert result.exit_code == 0, result.output
    assert "each slide its own case" in result.output
    assert len(pd.read_parquet(other)) == len(frame)

    for args, message in (
        (["--val", "0.6", "--test", "0.5"], "--val and --test"),
        (["--group", "patient"], "--group 'patient': no such column"),
        (["--stratify", "grade"], "--stratify 'grade': no such column"),
    ):
        result = runner.invoke(app, ["data", "split", str(source), *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["data", "split", str(tmp_path / "missing.csv")])
    assert result.exit_code == 2 and "no such file" in result.output


@pytest.mark.s3
def test_data_split_cli_writes_to_the_object_store(object_store, tmp_path):
    from typer.testing import CliRunner

    from pathray.cli import app

    frame = cases_frame(30, seed=1)
    source = object_store.upload_file(_csv(frame, tmp_path), object_store.url_for("splits/in.csv"))
    out = object_store.url_for("splits/out.parquet")
    key_env, secret_env = object_store.env_names()
    sets = [
        f"storage.endpoint_url={object_store.endpoint_url}",
        f"storage.key_env={key_env}",
        f"storage.secret_env={secret_env}",
    ]
    args = ["data", "split", source, "--out", out, "--seed", "2"]
    for item in sets:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"manifest: {out}" in result.output
    written = load_manifest(out, object_store.storage_config())
    assert (
        written.split.tolist()
        == split_manifest(frame, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=2).split.tolist()
    )
    assert_grouped(written)


def _csv(frame: pd.DataFrame, folder) -> object:
    path = folder / "in.csv"
    frame.to_csv(path, index=False)
    return path
