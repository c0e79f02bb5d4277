"""`pathray demo` end to end, as a new user runs it (reduced size: 2 slides of 4096 px)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from PIL import Image

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def weed_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "weed server"], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


@pytest.mark.parametrize("store", ["s3", "local"])
def test_demo_runs_and_leaves_nothing_behind(tmp_path, store):
    before = weed_pids()
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
            "2",
            "--size",
            "4096",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    import pandas as pd

    manifest = pd.read_parquet(tmp_path / "demo" / "manifest.parquet")
    assert len(manifest) == 2
    prefix = "s3://" if store == "s3" else str(tmp_path / "demo" / "store")
    assert all(uri.startswith(prefix) for uri in manifest.uri)
    masks = sorted((tmp_path / "demo" / "masks").glob("*.png"))
    assert [m.stem for m in masks] == sorted(manifest.slide_id)
    assert all(Image.open(m).size[0] > 100 for m in masks)
    assert "tissue masks:" in out.stdout and "manifest:" in out.stdout
    assert weed_pids() <= before, "the demo left a SeaweedFS process running"
