"""``bash benchmarks/gpu.sh --cpu`` runs every check of the GPU suite at small sizes, with Ray,
tiffslide, zarr, imagecodecs and openslide unimportable (the GPU image), so the suite never rots."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKS = [
    "env",
    "analysis_vit_s16",
    "analysis_vit_l16",
    "train_wait",
    "embed",
    "cnn_vs_foundation",
    "gpu_decode",
    "ssl",
    "foundation",
    "fsdp_vitg",
    "fsdp_vitg_gc",
]
FIGURES = {  # the summary's rows: label -> goal on a GPU
    "analysis_vs_model ViT-S/16": ">= 0.9",
    "analysis_vs_model ViT-L/16": ">= 0.9",
    "train_data_wait ViT-S/16 DINO crops": "< 0.05",
    "train_data_wait ResNet-50 U-Net": "< 0.05",
    "embed_vs_model": ">= 0.9",
    "cnn_vs_foundation_infer (time ratio)": "-",
    "decode tiles/s, CPU": "-",
    "decode tiles/s, GPU": "-",
}
NUMBER = re.compile(r"^\d+(\.\d+)?$")


@pytest.mark.slow
def test_cpu_run_prints_every_required_figure(tmp_path: Path) -> None:
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.read_text() if results.exists() else None
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "OUT": str(tmp_path / "out"),
        "GPU_SUITE_CACHE": str(tmp_path / "cache"),
        "GPU_SUITE_BUDGET_S": "900",
    }
    run = subprocess.run(
        ["bash", "benchmarks/gpu.sh", "--cpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert out.strip().splitlines()[-1] == "gpu_suite mode=cpu failed=0 missing=0", out[-4000:]
    started = re.findall(r"^=== (\w+) \(limit", run.stdout, flags=re.MULTILINE)
    assert started == CHECKS  # the required figures first, the extras after

    block = (tmp_path / "out" / "gpu_results.md").read_text()
    assert block.startswith("\n### GPU suite (cpu), ") and "`bash benchmarks/gpu.sh --cpu`" in block
    rows = {}
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] in FIGURES:
            rows[cells[0]] = cells[1:]
    assert rows.keys() == FIGURES.keys(), block
    for label, (value, goal, met) in rows.items():
        assert goal == FIGURES[label], (label, goal)
        if label == "decode tiles/s, GPU":
            assert value == "skipped", value  # no CUDA here
        else:
            assert NUMBER.match(value), (label, value)
            assert met in (("yes", "no") if goal != "-" else ("-",)), (label, met)
    for check in CHECKS:
        assert re.search(rf"^\| {check} \| ok \| \d+ \|$", block, flags=re.MULTILINE), check

    logs = (tmp_path / "out" / "gpu_suite_logs.txt").read_text()
    for line in ("analysis_vs_model=", "train_data_wait=", "embed_vs_model=", "cnn_vs_foundation_infer="):
        assert re.search(rf"(^| ){line}\d", logs, flags=re.MULTILINE), line
    assert "ray_imported=YES" not in logs and "ray imported: YES" not in logs
    # the U-Net's feed took the packed-tile path (decoded where the model runs), DINO's did not
    assert re.search(r"engine=cnn .*feed=1_process\+device_decode ", logs), logs
    assert re.search(r"engine=dinov2 .*feed=1_process ", logs), logs
    assert (results.read_text() if results.exists() else None) == before  # only GPU runs are recorded
