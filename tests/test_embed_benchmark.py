"""benchmarks/embed.py runs: its CPU figure (on the session's Ray) and its --gpu path, which is
benchmarks/embed_model.py and needs no Ray, here as a dry run on the CPU."""

from __future__ import annotations

import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "embed.py"
LAST = re.compile(r"^embed_vs_model=\d+\.\d\d tiles_per_s=\d+\.\d loader_wait=\d\.\d\d\d")


@pytest.mark.ray
def test_cpu_figure_on_ray(ray_local, tmp_path, capsys):
    main = runpy.run_path(str(BENCHMARK))["main"]
    args = ["--slides", "1", "--slide-size", "2048", "--tile", "32", "--batch", "8", "--repeat", "1"]
    assert main([*args, "--readers", "1", "--cache", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert LAST.match(lines[-1]), lines[-1]
    values = dict(item.split("=") for item in lines[-1].split())
    assert float(values["embed_vs_model"]) > 0 and 0 <= float(values["loader_wait"]) <= 1
    assert any(line.startswith("pathray embed: slides: 1 written") for line in lines)


def test_gpu_flag_runs_the_ray_free_benchmark(tmp_path):
    code = (
        "import runpy, sys\n"
        f"sys.argv = {[str(BENCHMARK), '--gpu', '--device', 'cpu', '--depth', '1', '--size', '32']!r}"
        " + ['--batch', '4', '--batches', '4', '--producers', '1', '--slides', '1', '--slide-size', '2048']\n"
        "try:\n"
        f"    runpy.run_path({str(BENCHMARK)!r}, run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300, cwd=tmp_path
    )
    last = out.stdout.strip().splitlines()[-1]
    assert re.match(r"^embed_vs_model=\d+\.\d\d tiles_per_s=\d+\.\d .*loader_wait=\d\.\d\d\d", last), last
    assert last.endswith("ray_imported=no")  # embed_model.py's own check: nothing here imported Ray
