"""`pathray analyze`: one slide in-process (files, summary, progress), a manifest on Ray Data, errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

PATHRAY = [sys.executable, "-m", "pathray.cli"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([*PATHRAY, *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def package_and_slides(tmp_path_factory, save_package) -> tuple[str, list[Path]]:
    """A debug_cnn segmentation package (random weights) and two small synthetic slides."""
    from pathray.wsi.synth import SynthConfig, write_synthetic_slides

    out = tmp_path_factory.mktemp("analyze")
    package = save_package(out / "model", "task.name=segmentation")
    slides = write_synthetic_slides(out / "slides", n=2, seed=5, config=SynthConfig(size=3072))
    return package, [s.path for s in slides]


def test_analyze_one_slide_in_process(package_and_slides, tmp_path):
    package, slides = package_and_slides
    # the inference section is set like any other (--set), and the named flags are its shorthands
    args = ["--set", "inference.out_mpp=8", "--set", "inference.batch_size=16", "--device", "cpu"]
    out = run("analyze", str(slides[0]), "--model", package, "--out", str(tmp_path / "res"), *args)
    assert out.returncode == 0, out.stderr
    for name in ("overlay.png", "mask.png", "annotations.geojson", "summary.json"):
        assert (tmp_path / "res" / name).is_file()
    summary = json.loads((tmp_path / "res" / "summary.json").read_text())
    assert summary["tiles"] > 0 and summary["tiles_done"] == summary["tiles"]
    assert summary["out_mpp"] == 8.0
    assert set(summary["areas_mm2"]) == {"Background", "Benign", "G3", "G4", "G5"}
    assert f"{summary['tiles']}/{summary['tiles']}" in out.stderr  # the progress bar reached the end


def test_analyze_usage_and_unreadable_slide_errors(package_and_slides, testdata, tmp_path):
    package, _ = package_and_slides
    out = run("analyze", "--model", package, "--out", str(tmp_path))
    assert out.returncode == 2 and "either SLIDE or --manifest" in out.stderr
    broken = str(testdata / "broken" / "broken.svs")
    out = run("analyze", broken, "--model", package, "--out", str(tmp_path))
    assert out.returncode == 2 and broken in out.stderr and "Traceback" not in out.stderr


def test_analyze_mpp_lets_a_slide_without_one_be_analysed_in_process(package_and_slides, testdata, tmp_path):
    from typer.testing import CliRunner

    from pathray.cli import app

    package, _ = package_and_slides
    tcga = str(testdata / "aperio" / "tcga-cr-7395-01a-01-ts1.svs")  # no mpp in its metadata
    runner = CliRunner()
    base = ["analyze", tcga, "--model", package, "--device", "cpu"]
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "none")])
    assert result.exit_code == 2, result.output
    assert "no usable mpp" in result.output and "--mpp" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "res"), "--mpp", "0.5"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "res" / "summary.json").read_text())
    assert summary["slide_mpp"] == 0.5 and summary["tiles"] > 10 and summary["tiles_done"] == summary["tiles"]
    assert summary["tiles_failed"] == 0 and sum(summary["areas_mm2"].values()) > 0
    for args, message in (
        (["--mpp", "0"], "--mpp must be a level-0 µm/px in (0, 20]"),
        (["--mpp", "352.8"], "--mpp must be a level-0 µm/px in (0, 20]"),
    ):
        result = runner.invoke(app, [*base, "--out", str(tmp_path / "x"), *args])
        assert result.exit_code == 2 and message in result.output, result.output
    result = runner.invoke(
        app, ["analyze", "--manifest", str(tmp_path / "m.csv"), "--model", package, "--mpp", "0.5"]
    )
    assert result.exit_code == 2 and "manifest an mpp column" in result.output


def test_analyze_with_an_endpoint_that_does_not_answer(package_and_slides, tmp_path):
    _, slides = package_and_slides
    with socket.socket() as sock:  # a port on 127.0.0.1 nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = run(
        "analyze",
        str(slides[0]),
        "--model",
        "m",
        "--out",
        str(tmp_path),
        "--endpoint",
        f"http://127.0.0.1:{port}",
    )
    assert out.returncode == 2 and f"127.0.0.1:{port}" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.ray
@pytest.mark.slow
def test_manifest_on_ray_data_reports_a_broken_slide_and_goes_on(
    ray_local, package_and_slides, testdata, tmp_path
):
    from typer.testing import CliRunner

    from pathray.cli import app

    package, slides = package_and_slides
    broken = str(testdata / "broken" / "unreadable.svs")
    tcga = str(testdata / "aperio" / "tcga-cr-7395-01a-01-ts1.svs")  # no mpp: the manifest's column gives it
    manifest = tmp_path / "slides.parquet"
    rows = [{"slide_id": p.stem, "uri": str(p)} for p in slides] + [{"slide_id": "bad", "uri": broken}]
    rows += [{"slide_id": "tcga", "uri": tcga, "mpp": 0.5}, {"slide_id": "tcga-no-mpp", "uri": tcga}]
    pd.DataFrame(rows).to_parquet(manifest)
    out_dir = tmp_path / "results"
    result = CliRunner().invoke(
        app,
        ["analyze", "--manifest", str(manifest), "--model", package, "--out", str(out_dir), "--actors", "2"],
    )
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(out_dir / "summary.parquet")
    assert list(table["slide_id"]) == [p.stem for p in slides] + ["bad", "tcga", "tcga-no-mpp"]
    assert list(table["status"]) == ["ok", "ok", "failed", "ok", "failed"]
    assert broken in table.loc[2, "reason"]
    assert "no usable mpp" in table.loc[4, "reason"] and "mpp column" in table.loc[4, "reason"]
    assert (table.loc[[0, 1, 3], "tiles"] > 0).all() and table.loc[[0, 1, 3], "area_mm2/Benign"].notna().all()
    assert (table.loc[[0, 1, 3], "tiles_failed"] == 0).all()
    for stem in [p.stem for p in slides] + ["tcga"]:
        assert (out_dir / stem / "summary.json").is_file()
    assert json.loads((out_dir / "tcga" / "summary.json").read_text())["slide_mpp"] == 0.5
    csv = pd.read_csv(out_dir / "summary.csv")
    assert list(csv["status"]) == ["ok", "ok", "failed", "ok", "failed"]
    assert "2 failed" in result.output
