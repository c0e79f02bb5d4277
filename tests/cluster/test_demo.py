"""`pathray demo` end to end, as a new user runs it, at a reduced size (6 slides of 3072 px, 8 steps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def pids(pattern: str) -> set[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


@pytest.fixture
def own_tmp():
    """A short TMPDIR of the demo's own: its SeaweedFS data and Ray session live under it, so
    processes naming it are the demo's (other Ray instances on the machine are not)."""
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="prd", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize(("store", "steps"), [("s3", 8), ("local", 0)])
def test_demo_runs_and_leaves_nothing_behind(tmp_path, own_tmp, store, steps):
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
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "COLUMNS": "200", "TMPDIR": own_tmp, "RAY_TMPDIR": own_tmp},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    import pandas as pd

    manifest = pd.read_parquet(tmp_path / "demo" / "manifest.parquet")
    assert len(manifest) == 6 and set(manifest.split) == {"train", "test"}
    prefix = "s3://" if store == "s3" else str(tmp_path / "demo" / "store")
    assert all(uri.startswith(prefix) for uri in manifest.uri)
    masks = sorted((tmp_path / "demo" / "masks").glob("*.png"))
    assert [m.stem for m in masks] == sorted(manifest.slide_id)
    assert all(Image.open(m).size[0] > 100 for m in masks)
    assert "tissue masks:" in out.stdout and "manifest:" in out.stdout
    if steps:
        metrics = json.loads((tmp_path / "demo" / "runs" / "demo-segmentation" / "metrics.json").read_text())
        assert metrics["step"] == steps and "test/macro_f1" in metrics
        assert (tmp_path / "demo" / "runs" / "demo-segmentation" / "curves.png").stat().st_size > 0
        assert (tmp_path / "demo" / "runs" / "demo-dino" / "curves.png").stat().st_size > 0
        assert "segmentation on held-out slides: macro F1" in out.stdout
    assert not pids(own_tmp), f"the demo left processes running: {pids(own_tmp)}"
