"""`pathray eval`: linear and kNN probes on frozen embeddings of annotated tiles, over seeds (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pathray.inference.comparison import PROBES, Comparison, write_comparison
from pathray.inference.probes import (
    EvalConfig,
    ProbeError,
    annotated_slides,
    compare_models,
    probe_classes,
    run_probes,
    sample_tiles,
)
from pathray.models.metrics import knn_probe, logistic_probe
from pathray.storage import read_bytes
from pathray.wsi.annotations import annotation_index

TINY = EvalConfig(seeds=2, tiles_per_class=8, tile=32, device="cpu")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six 2048 px synthetic slides with Gleason GeoJSON: 4 train, 1 val, 1 test."""
    from pathray.datasets.manifest import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("probe-slides"), n=6, size=2048, seed=0)


@pytest.fixture(scope="module")
def manifest(cohort: Path) -> pd.DataFrame:
    return pd.read_parquet(cohort)


def _blobs(n: int = 300, noise: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 3
    centres = torch.zeros(3, 8)
    centres[:, :3] = 4 * torch.eye(3)
    x = torch.randn(n, 8, generator=g) + (0 if noise else centres[y])
    return x, y


@pytest.mark.parametrize("probe", [logistic_probe, knn_probe])
def test_probes_tell_separable_from_noise(probe):
    x, y = _blobs()
    scores = probe(x[:200], y[:200], x[200:], y[200:])
    assert set(scores) == {"accuracy", "balanced_accuracy", "macro_f1"}
    assert min(scores.values()) > 0.95
    x, y = _blobs(noise=True)
    assert probe(x[:200], y[:200], x[200:], y[200:])["balanced_accuracy"] < 0.55


def test_logistic_probe_is_seeded():
    x, y = _blobs(noise=True)
    runs = [logistic_probe(x[:200], y[:200], x[200:], y[200:], seed=s, steps=20) for s in (0, 0, 1)]
    assert runs[0] == runs[1]
    w = [logistic_probe(x[:200], y[:200], x[:200], y[:200], seed=s, steps=2)["accuracy"] for s in range(4)]
    assert len(set(w)) > 1  # one epoch from different inits and orders: different fits


def test_seeds_draw_other_tiles_labelled_by_their_annotations(manifest):
    slides, eval_split = annotated_slides(manifest)
    assert eval_split == "test" and len(slides) == 5  # the val slide is left out
    classes = probe_classes(slides, True, None)
    assert classes == ["Background", "Benign", "G3", "G4", "G5"]
    a, again, b = (sample_tiles(slides, classes, s, TINY) for s in (0, 0, 1))
    np.testing.assert_array_equal(a.centres, again.centres)
    assert not set(map(tuple, a.centres)) & set(map(tuple, b.centres))  # another seed: other tiles
    assert a.counts()["train"] and a.counts()["eval"]
    for split in (True, False):
        counts = np.bincount(a.labels[a.train == split], minlength=len(classes))
        assert counts.max() <= TINY.tiles_per_class
    assert np.bincount(a.labels[a.train], minlength=len(classes)).min() > 0  # every class in train
    uris = {r["slide_id"]: r["annotations_uri"] for r in slides}
    for slide_id, (cx, cy), k in zip(a.slide_ids, a.centres, a.labels, strict=True):
        inside = {
            name
            for p, name in annotation_index(uris[slide_id]).regions
            if p.contains(np.array([[cx, cy]]))[0]
        }
        assert classes[k] in inside if k else not inside


def test_probes_find_the_label_in_embeddings_that_carry_it(manifest):
    slides, _ = annotated_slides(manifest)
    sample = sample_tiles(slides, probe_classes(slides, True, None), 0, TINY)
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(len(sample.labels), len(sample.classes)))
    carrying = noise + 8 * np.eye(len(sample.classes))[sample.labels]
    good, bad = run_probes(carrying, sample, 0), run_probes(noise, sample, 0)
    for probe in PROBES:
        assert good[probe]["balanced_accuracy"] > 0.95
        assert bad[probe]["balanced_accuracy"] < good[probe]["balanced_accuracy"] - 0.3


class Colour:
    """A fake frozen model: each tile's mean colour; counts what it embeds."""

    tile_size, mpp = 32, 0.5

    def __init__(self, name: str) -> None:
        self.source = {"model": name, "random_init": False}
        self.embedded = 0

    def embed(self, tiles: np.ndarray, batch_size: int = 64) -> np.ndarray:
        self.embedded += len(tiles)
        return tiles.reshape(len(tiles), -1, 3).mean(1).astype(np.float16)


def test_each_tile_is_read_once_per_seed_and_embedded_once_per_model(manifest, monkeypatch):
    from pathray.inference import probes

    made: dict[str, Colour] = {}
    reads = []
    real_read = probes.read_tiles
    monkeypatch.setattr(probes, "read_tiles", lambda *a, **k: reads.append(a[2:4]) or real_read(*a, **k))
    config = EvalConfig(seeds=3, tiles_per_class=4, device="cpu")
    comparison = compare_models(
        manifest, ["a", "b"], config, load=lambda name, *_: made.setdefault(name, Colour(name))
    )
    assert reads == [(32, 0.5)] * 3  # one read per seed, shared by both models
    per_seed = [s["tiles"]["train"] + s["tiles"]["eval"] for s in comparison.results["models"][0]["seeds"]]
    assert made["a"].embedded == made["b"].embedded == sum(per_seed)


def test_two_models_give_a_row_per_model_and_probe_consistent_with_results(manifest, tmp_path):
    comparison = compare_models(manifest, ["test_vit", "test_vit2"], TINY)
    table = comparison.table()
    assert list(zip(table["model"], table["probe"], strict=True)) == [
        ("test_vit", "linear"),
        ("test_vit", "knn"),
        ("test_vit2", "linear"),
        ("test_vit2", "knn"),
    ]
    assert set(table["dim"]) == {64}
    for row, (model, probe) in zip(
        table.to_dict("records"), [(0, "linear"), (0, "knn"), (1, "linear"), (1, "knn")], strict=True
    ):
        seeds = comparison.results["models"][model]["seeds"]
        assert [s["seed"] for s in seeds] == [0, 1]
        values = [s[probe]["macro_f1"] for s in seeds]
        assert row["macro_f1_mean"] == pytest.approx(np.mean(values))
        assert row["macro_f1_std"] == pytest.approx(np.std(values, ddof=1))
    remote = write_comparison(comparison, "memory://probe-eval/run")  # any storage pathray writes to
    assert read_bytes(remote["comparison.md"]) == comparison.markdown().encode()
    files = write_comparison(comparison, str(tmp_path))
    assert sorted(Path(f).name for f in files.values()) == [
        "comparison.csv",
        "comparison.md",
        "comparison.png",
        "results.json",
    ]
    assert (tmp_path / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(pd.read_csv(tmp_path / "comparison.csv")) == 4
    again = Comparison(json.loads((tmp_path / "results.json").read_text()))
    pd.testing.assert_frame_equal(again.table(), table)
    first = table.iloc[0]
    assert (
        f"{first['accuracy_mean']:.3f} ± {first['accuracy_std']:.3f}"
        in (tmp_path / "comparison.md").read_text()
    )


def test_bad_manifests_are_refused_with_a_reason(manifest):
    with pytest.raises(ProbeError, match="annotations_uri"):
        annotated_slides(manifest.drop(columns="annotations_uri"))
    with pytest.raises(ProbeError, match="no slide of the manifest has an annotations_uri"):
        annotated_slides(manifest.assign(annotations_uri=None))
    with pytest.raises(ProbeError, match="train split"):
        annotated_slides(manifest.assign(split="test"))
    no_test = manifest[manifest["split"] != "test"]
    assert annotated_slides(no_test)[1] == "val"


def test_cli_compares_two_models(cohort, tmp_path):
    from typer.testing import CliRunner

    from pathray.cli import app

    out = tmp_path / "eval"
    args = ["eval", str(cohort), "--model", "test_vit", "--model", "test_vit2", "--out", str(out)]
    args += ["--seeds", "2", "--tiles-per-class", "8", "--tile", "32", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "| test_vit | linear |" in result.stdout and "| test_vit2 | knn |" in result.stdout
    assert "RANDOM weights" in result.stderr
    results = json.loads((out / "results.json").read_text())
    assert [m["model"] for m in results["models"]] == ["test_vit", "test_vit2"]
    assert results["eval_split"] == "test" and len(results["models"][0]["seeds"]) == 2
    assert (out / "comparison.png").stat().st_size > 1000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "no_such_model"], "unknown model 'no_such_model': not a foundation preset (gigapath"),
        (["--model", "test_vit", "--weights", "uni=/w.bin"], "--weights names 'uni'"),
        (["--model", "test_vit", "--weights", "test_vit"], "--weights wants MODEL=PATH"),
    ],
)
def test_cli_bad_input_is_one_line(cohort, tmp_path, args, message):
    from typer.testing import CliRunner

    from pathray.cli import app

    result = CliRunner().invoke(app, ["eval", str(cohort), "--out", str(tmp_path), *args])
    assert result.exit_code == 2 and message in result.stderr
    assert "Traceback" not in result.output and not list(tmp_path.iterdir())


def test_cli_manifest_without_annotations(manifest, tmp_path):
    from typer.testing import CliRunner

    from pathray.cli import app

    bare = tmp_path / "bare.parquet"
    manifest.assign(annotations_uri=None).to_parquet(bare)
    result = CliRunner().invoke(app, ["eval", str(bare), "--model", "test_vit", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "annotations_uri" in result.stderr
