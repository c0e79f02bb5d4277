"""`pathray demo` end to end, as a new user runs it, at a reduced size (6 slides of 3072 px, 8 steps,
one seed): slides into the store, DINO on the unlabelled ones, the engine x fraction experiment with
its study report, serving and an HTTP analysis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.mark.parametrize(("store", "steps"), [("s3", 8), ("local", 0)])
def test_demo_runs_and_leaves_nothing_behind(tmp_path, own_tmp, own_pids, store, steps):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pathray.cli",
            "demo",
            "--out",
            str(tmp_path / "demo"),
            "--store",
            store,
            "--n",
            "6",
            "--size",
            "3072",
            "--steps",
            str(steps),
            "--seeds",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "COLUMNS": "200", "TMPDIR": own_tmp, "RAY_TMPDIR": own_tmp},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    import pandas as pd

    kept = pd.read_parquet(tmp_path / "demo" / "manifest.parquet")  # what the shipped configs default to
    assert len(kept) == 6 and set(kept.split) == {"unlabelled", "train", "val", "test"}
    # The demo streams from its store; what it leaves must still open once the endpoint is gone.
    assert all(Path(u).is_file() for u in [*kept.uri, *kept.annotations_uri])
    if store == "s3":
        manifest = pd.read_parquet(tmp_path / "demo" / "manifest.s3.parquet")
        assert all(u.startswith("s3://") for u in [*manifest.uri, *manifest.annotations_uri])
        assert all(Path(u).parent == tmp_path / "demo" / "slides" for u in kept.uri)
        same = ["slide_id", "split", "label"]
        assert manifest[same].equals(kept[same]) and "bucket manifest:" in out.stdout
    else:
        manifest = kept
        assert all(u.startswith(str(tmp_path / "demo" / "store")) for u in manifest.uri)
    masks = sorted((tmp_path / "demo" / "masks").glob("*.png"))
    assert [m.stem for m in masks] == sorted(manifest.slide_id)
    assert all(Image.open(m).size[0] > 100 for m in masks)
    assert "tissue masks:" in out.stdout and "manifest:" in out.stdout
    if steps:
        demo = tmp_path / "demo"
        assert (demo / "runs" / "demo-dino" / "curves.png").stat().st_size > 0
        table = pd.read_parquet(demo / "experiments" / "demo" / "results.parquet")
        assert sorted(zip(table.engine, table.fraction, strict=True)) == [
            ("cnn", 0.1), ("cnn", 1.0), ("foundation", 0.1), ("foundation", 1.0)
        ]  # fmt: skip
        assert (table.steps == steps).all() and table.macro_f1.between(0, 1).all()
        for run_dir in table.run_dir:
            metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
            assert metrics["step"] == steps and "test/macro_f1" in metrics
            assert metrics["test/coverage"] == 1.0 and metrics["test/seconds_per_slide"] > 0
        assert "better model at 100 %" in out.stdout
        report = (demo / "experiments" / "demo" / "report.md").read_text()
        assert "## 1. The foundation model is 14-26 % better" in report and "ratio" in report
        assert "ratio" in out.stdout and "macro_f1_lo" in out.stdout
        # F1 against iterations on the val slide, and each run tested with its best val checkpoint
        assert "F1 against iterations, on the val slides" in out.stdout
        assert "| cnn | 1 | " in report.split("## F1 against iterations")[1]
        assert (table.chosen_step > 0).all() and (table.chosen_step <= steps).all()
        # The better model was served and a held-out slide analysed over HTTP.
        summary = json.loads((demo / "analysis" / "summary.json").read_text())
        held_out = manifest[manifest.split == "test"].uri.iloc[0]
        assert summary["slide"] == held_out and summary["tiles_done"] == summary["tiles"] > 0
        assert sum(summary["areas_mm2"].values()) > 0
        geojson = json.loads((demo / "analysis" / "annotations.geojson").read_text())
        assert geojson["type"] == "FeatureCollection"
        assert Image.open(demo / "analysis" / "overlay.png").size[0] > 10
        assert "analysis overlay.png:" in out.stdout and "serving demo-" in out.stdout
        # No config the demo wrote (runs, experiment, its own project files) holds storage
        # credentials: only the names of the variables they are in.
        configs = [*demo.rglob("*.yaml")]
        assert len(configs) >= 6
        for path in configs:
            storage = (yaml.safe_load(path.read_text()) or {}).get("storage") or {}
            assert not {"key", "secret"} & set(storage), (path, storage)
        assert "secret:" not in out.stdout + out.stderr
        # Taking Serve down is quiet: no task of Ray's reported failed on the console.
        assert "graceful_shutdown failed" not in out.stdout + out.stderr
    assert not own_pids(), f"the demo left processes running: {own_pids()}"
