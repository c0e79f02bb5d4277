"""benchmarks/ssl_pretrain.py runs as the GPU suite runs it (``python benchmarks/ssl_pretrain.py``,
PYTHONPATH=src, no Ray importable), here as a tiny dry run on the CPU; its --gpu line carries
DINOv2's reference."""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARK = ROOT / "benchmarks" / "ssl_pretrain.py"
TINY = ["--depth", "1", "--size", "32", "--local-size", "16", "--batch", "2", "--steps", "2"]
TINY += ["--warmup", "0", "--out-dim", "64", "--threads", "1"]


def fields(line: str) -> dict[str, str]:
    """``key=value`` tokens of a summary line (values with spaces are shell-quoted)."""
    return dict(token.split("=", 1) for token in shlex.split(line) if "=" in token)


def test_dry_run_prints_images_per_s_without_ray(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked" / "ray"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('ray is not installed on the GPU box')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocked.parent), str(ROOT / "src")])}
    out = subprocess.run(
        [sys.executable, str(BENCHMARK), *TINY],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,  # as gpu.sh runs it: the script's folder is sys.path[0]
        env=env,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines[:-1]] == ["step 0", "step 1"]
    last = lines[-1]
    assert last.startswith("ssl images_per_s=") and shlex.split(last)[2] == "per_worker", last
    row = fields(last)
    assert float(row["images_per_s"]) > 0 and float(row["step_s"]) > 0
    assert row["device"] == "cpu" and row["batch"] == "2" and row["crops"] == "2x32+8x16"
    assert row["depth"] == "1" and row["out_dim"] == "64" and row["loss_finite"] == "True"
    assert row["ray_imported"] == "no" and "ref_images_per_s" not in row


def test_gpu_line_carries_the_cited_reference(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import torch

    spec = importlib.util.spec_from_file_location("pathray_benchmark_ssl", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    row = {"images_per_s": 512.0, "device": "NVIDIA H100 80GB HBM3", "batch": 32, "crops": "2x224+8x96"}
    row.update(step_s=0.0625, loss_finite=True, peak_gib=None)
    monkeypatch.setattr(module, "run", lambda args: row)
    for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:  # other tests' Ray
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert module.main(["--gpu"]) == 0
    got = fields(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["images_per_s"] == "512.00" and got["device"] == "NVIDIA H100 80GB HBM3"
    # 100 epochs x 1250 iterations x 64 images per A100 in about a day
    assert got["ref_images_per_s"] == "93" and got["ref_gpu"] == "A100-80GB"
    assert "facebookresearch/dinov2 README" in got["ref_source"] and "peak_gib" not in got
