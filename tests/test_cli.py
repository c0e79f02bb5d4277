"""The `pathray` command as a user runs it: real processes, real files, exit codes and messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

PATHRAY = [sys.executable, "-m", "pathray.cli"]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([*PATHRAY, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_info_json(testdata):
    out = run("slides", "info", str(testdata / "aperio/CMU-1-Small-Region.svs"), "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["dimensions"] == [2220, 2967]
    assert info["mpp"] == pytest.approx(0.499)
    assert info["vendor"] == "aperio" and info["backend"] == "tiffslide"


def test_info_table(testdata):
    out = run("slides", "info", str(testdata / "hamamatsu-ndpi/test3-DAPI-2-(387).ndpi"))
    assert out.returncode == 0, out.stderr
    assert "hamamatsu" in out.stdout and "3968" in out.stdout


@pytest.mark.parametrize(
    "rel",
    [
        "broken/broken.svs",
        "broken/unreadable.svs",
        "broken/unopenable.tiff",
        "broken/zero_gi.tif",
        "nope/missing.svs",
    ],
)
def test_info_on_bad_input_exits_2_with_one_line(testdata, rel):
    out = run("slides", "info", str(testdata / rel))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("error: ") and str(testdata / rel) in lines[0]
    assert "Traceback" not in out.stderr


def test_info_unknown_scheme():
    out = run("slides", "info", "ftp://127.0.0.1/a.svs")
    assert out.returncode == 2
    assert "scheme 'ftp' is not supported" in out.stderr


def test_tissue_writes_a_png(testdata, tmp_path):
    png = tmp_path / "mask.png"
    out = run("slides", "tissue", str(testdata / "aperio/CMU-1-Small-Region.svs"), "--out", str(png))
    assert out.returncode == 0, out.stderr
    img = Image.open(png)
    assert img.mode == "L" and 100 < max(img.size) < 400
    assert "tissue" in out.stdout


def test_synth_writes_slides_annotations_and_manifest(tmp_path):
    out = run("slides", "synth", str(tmp_path / "s"), "--n", "2", "--seed", "3", "--size", "2048")
    assert out.returncode == 0, out.stderr
    import pandas as pd

    manifest = pd.read_parquet(tmp_path / "s" / "manifest.parquet")
    assert list(manifest.columns)[:6] == ["slide_id", "uri", "split", "cohort", "label", "annotations_uri"]
    assert len(manifest) == 2
    for row in manifest.itertuples():
        assert Path(row.uri).exists() and Path(row.annotations_uri).exists()
    info = json.loads(run("slides", "info", manifest.uri[0], "--json").stdout)
    assert info["dimensions"] == [2048, 2048] and info["mpp"] == 0.25 and info["level_count"] >= 3


def test_bad_config_key_is_one_line(tmp_path, testdata):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("tisue: {}\n")
    out = run("slides", "tissue", str(testdata / "aperio/small.svs"), "--config", str(cfg))
    assert out.returncode == 2 and "tisue" in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.ray
@pytest.mark.slow
def test_data_preview_draws_streamed_tiles(tmp_path):
    assert run("slides", "synth", str(tmp_path / "s"), "--n", "2", "--size", "3072").returncode == 0
    config = Path(__file__).resolve().parents[1] / "configs" / "data-gleason.yaml"
    png = tmp_path / "grid.png"
    out = run(
        "data",
        "preview",
        str(config),
        "--n",
        "8",
        "--out",
        str(png),
        "--set",
        f"data.manifest={tmp_path / 's' / 'manifest.parquet'}",
        "--set",
        "data.split=null",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "8 tiles (segmentation" in out.stdout
    img = Image.open(png)
    assert img.size == (3 * 160, 3 * 160 + 20)  # 8 tiles in a 3x3 grid, legend underneath


def test_data_preview_reports_every_manifest_problem(tmp_path, testdata):
    import pandas as pd

    manifest = tmp_path / "m.csv"
    pd.DataFrame(
        {
            "slide_id": ["a", "a"],
            "uri": [str(testdata / "aperio/small.svs"), str(tmp_path / "gone.svs")],
            "split": ["train", "train"],
        }
    ).to_csv(manifest, index=False)
    config = Path(__file__).resolve().parents[1] / "configs" / "data-gleason.yaml"
    out = run("data", "preview", str(config), "--set", f"data.manifest={manifest}")
    assert out.returncode == 2
    assert (
        "2 problem(s)" in out.stderr and "duplicate slide_id 'a'" in out.stderr and "gone.svs" in out.stderr
    )
    assert "Traceback" not in out.stderr
