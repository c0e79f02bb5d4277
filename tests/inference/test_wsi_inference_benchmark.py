"""benchmarks/wsi_inference.py runs: its CPU figure, and its --gpu path on a box with neither Ray nor
tiffslide, zarr or imagecodecs (the GPU suite's image), here as a dry run on the CPU."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "wsi_inference.py"
LAST = re.compile(r"^analysis_vs_model=\d+\.\d\d tiles_per_s=\d+\.\d model_tiles_per_s=\d+\.\d")


def run(args: list[str], tmp_path: Path, blocked: tuple[str, ...] = ()) -> list[str]:
    code = (
        "import runpy, sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None\n"
        f"sys.argv = {[str(BENCHMARK), *args]!r}\n"
        "try:\n"
        f"    runpy.run_path({str(BENCHMARK)!r}, run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        f"print('imported:', sorted(m for m in {blocked!r} if sys.modules.get(m) is not None))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600, cwd=tmp_path
    )
    return out.stdout.strip().splitlines()


def test_cpu_figure_has_the_model_alone_and_a_device_decode_row(tmp_path):
    lines = run(["--size", "2048", "--repeat", "1", "--cache", str(tmp_path)], tmp_path)
    last = lines[-2]
    assert LAST.match(last), last
    assert " decode_device_vs_model=" in last
    assert any(line.startswith("decode_device: analysis_vs_model=") for line in lines)


def test_gpu_path_needs_no_ray_tiffslide_zarr_or_imagecodecs(tmp_path):
    blocked = ("ray", "tiffslide", "zarr", "imagecodecs", "openslide")
    args = ["--gpu", "--device", "cpu", "--size", "1024", "--model", "vit_tiny_patch16_224"]
    args += ["--batch-size", "8", "--repeat", "1", "--cache", str(tmp_path), "--decode", "cpu", "device"]
    lines = run(args, tmp_path, blocked)
    assert lines[-1] == "imported: []"
    assert (
        LAST.match(lines[-2])
        and "decode_cpu_vs_model=" in lines[-2]
        and "decode_device_vs_model=" in lines[-2]
    )
    header = next(line for line in lines if "decoded on the device" in line)
    # on the CPU, auto keeps today's path; decode=device takes the compressed tiles
    assert "{'analysis': False, 'decode_cpu': False, 'decode_device': True}" in header
