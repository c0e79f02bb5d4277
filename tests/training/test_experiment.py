"""`pathray experiment`: a grid of real Ray Train runs gathered into a table and plots."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_a_fraction_grid_writes_its_table_and_plots(ray_local, manifest_path, tmp_path):
    # One engine: the demo's e2e test runs the runner over two engines x two fractions.
    import pandas as pd

    from pathray.training.experiment import load_experiment, run_experiment

    exp = {
        "experiment": {
            "name": "tiny",
            "base": str(CONFIGS / "gleason-foundation.yaml"),
            "engines": ["debug_vit"],
            "fractions": [0.5, 1.0],
            "workers": [1],
            "set": [
                f"data.manifest={manifest_path}",
                "engine.model=null",
                "scale.cpus_per_worker=0.5",
                "data.stream.readers=1",
                "data.stream.sampler.tiles_per_slide=16",
                "train.batch_size=4",
                "train.steps=3",
                "train.eval_tiles_per_slide=8",
                "run.log_every=1",
                "run.checkpoint_every=3",
            ],
            "out": str(tmp_path / "exp"),
        }
    }
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(exp))
    seen, steps = [], {}
    result = run_experiment(
        load_experiment(path),
        progress=lambda done, total, name: seen.append((done, total)),
        step_progress=lambda cell, row: steps.setdefault(cell.run.name, []).append(row["step"]),
    )
    table = pd.read_parquet(result.paths["results"])
    assert sorted(zip(table.engine, table.fraction, strict=True)) == [("debug_vit", 0.5), ("debug_vit", 1.0)]
    assert (table.steps == 3).all() and (table.workers == 1).all()
    assert table.macro_f1.between(0, 1).all() and (table.images_per_s > 0).all()
    assert seen[-1] == (2, 2)
    # every cell's reports were shown live, once each, under the cell's name (what the CLI prints)
    assert steps == {"tiny-debug_vit-f050-w1": [1, 2, 3], "tiny-debug_vit-f100-w1": [1, 2, 3]}
    # The half-fraction runs trained on 2 of the 4 training slides (nested, stratified).
    for run_dir in table.run_dir:
        cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
        assert cfg["data"]["fraction"] in (0.5, 1.0)
    runs, cells = Path(result.paths["table"]).read_text().split("\n\n")
    assert runs.count("\n") == 2 + 2 - 1 and "| debug_vit | 0.500 |" in runs
    assert cells.startswith("| engine | fraction | workers | runs | macro_f1 | macro_f1_lo |")
    assert (table.coverage == 1.0).all() and (table.seconds_per_slide > 0).all()
    assert "need both" in Path(result.paths["report"]).read_text()  # one engine: no comparison
    for name in ("f1_vs_fraction", "f1_vs_iteration", "throughput_vs_workers"):
        assert Path(result.paths[name]).stat().st_size > 1000


def test_a_wrong_experiment_key_is_one_line_and_exit_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("experiment:\n  base: x.yaml\n  engins: [cnn]\n")
    out = subprocess.run(
        [sys.executable, "-m", "pathray.cli", "experiment", str(path)], capture_output=True, text=True
    )
    assert out.returncode == 2 and "engins" in out.stderr and "Traceback" not in out.stderr
