"""``inference.decode: device``: compressed tiles decoded where the model runs give today's analysis.

On this CPU the "device" is the CPU: the compressed path (tiles fetched by byte range, decoded by
``tiledecode``, cropped and resampled by torch) against today's (the slide's reader decodes, PIL
resamples). Where the model's mpp is a pyramid level's own, nothing is resampled and both decode
with the same libjpeg-turbo, so the analyses are identical. Where tiles are resampled, the inputs
differ within the decoder tolerance of ``tests/wsi/test_compressed_tiles.py`` (torch's antialiased
bilinear vs PIL's: at most ``RESAMPLE_MAX_ABS`` per value, ``RESAMPLE_MEAN_ABS`` on average), and
the outputs of a model with a known Lipschitz bound differ by at most what that allows.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from torch import nn

from pathray.inference.analyze import analyze_slide
from pathray.inference.config import InferenceConfig
from pathray.inference.grid import plan_grid
from pathray.inference.predictor import Predictor
from pathray.inference.reader import CompressedSource
from pathray.inference.spec import ModelSpec
from pathray.models.tasks import build_task
from pathray.wsi.backends.open import open_slide

# the decoder tolerance of tests/wsi/test_compressed_tiles.py for regions resampled by torch
RESAMPLE_MAX_ABS = 2
RESAMPLE_MEAN_ABS = 0.25
GPU_MAX_ABS, GPU_MEAN_ABS = 32, 1.0  # nvJPEG against libjpeg-turbo, same file
CMU = "aperio/CMU-1-Small-Region.svs"  # one JPEG level at 0.499 µm/px, Aperio RGB tiles with JPEGTables
CLASSES = ["Background", "A", "B", "C"]
# Per pixel logits = (rgb / 255) @ W + b: a change of e grey levels in every channel moves a logit by at
# most LIPSCHITZ * e / 255, and a probability by no more (softmax is 1-Lipschitz in the max norm).
W = torch.tensor([[2.0, -1.0, 0.5, -2.0], [-1.5, 2.0, -0.5, 1.0], [0.5, -0.5, 2.0, -1.0]])
LIPSCHITZ = float(W.abs().sum(0).max())


class LinearColour(nn.Module):
    """uint8 ``(B, H, W, 3)`` -> ``(B, C, H, W)`` logits, linear in the colour: a known sensitivity."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        return (x @ W + torch.tensor([0.0, 0.2, -0.1, 0.1])).permute(0, 3, 1, 2)


def predictor(decode: str, tile: int = 128, mpp: float = 0.5, **config: object) -> Predictor:
    spec = ModelSpec(build_task({"name": "segmentation", "classes": CLASSES}), tile, mpp, "linear")
    cfg = InferenceConfig(
        decode=decode, min_tissue=0.0, batch_size=8, chunk_tiles=20, read_batch=4, read_threads=2, **config
    )
    return Predictor(LinearColour(), spec, cfg)


def chunk_probs(slide, p: Predictor) -> np.ndarray:
    """Every grid tile's window of mean class probabilities, in grid order."""
    plan = plan_grid(slide, p.spec, p.config)
    results = list(p.iter_chunks(slide, plan, plan.chunks(p.config.chunk_tiles)))
    return np.concatenate([r.probs for r in results]).astype(np.float32)


@pytest.fixture(scope="module")
def cmu(testdata: Path) -> str:
    return str(testdata / CMU)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> str:
    from pathray.wsi.synth import SynthConfig, write_synthetic_slide

    path = tmp_path_factory.mktemp("synth") / "device-decode.svs"
    return str(write_synthetic_slide(path, seed=5, config=SynthConfig(size=3072, tile=256)).path)


@pytest.fixture(scope="module")
def package(tmp_path_factory, save_package) -> str:
    """A debug_cnn segmentation model on 128 px tiles at 0.5 µm/px (a real engine, random weights)."""
    out = tmp_path_factory.mktemp("device-decode")
    return save_package(out / "model", "data.stream.sampler.size=128", "data.stream.sampler.mpps=[0.5]")


@pytest.mark.parametrize("name", ["cmu", "synthetic"])
def test_unresampled_levels_give_the_same_analysis(request, name, package):
    """0.5 µm/px is CMU-1's level 0 and the synthetic slide's level 1: the same pixels reach the model.

    Only their memory layout differs (``(N, 3, S, S)`` decoded, viewed as ``(N, S, S, 3)``, against a
    packed ``(N, S, S, 3)`` buffer), which moves a convolution's output by float rounding (~1e-6).
    """
    uri = request.getfixturevalue(name)
    slide = open_slide(uri)
    results = {}
    for decode in ("cpu", "device"):
        config = InferenceConfig(decode=decode, device="cpu", chunk_tiles=24, compute_threads=2)
        p = Predictor.from_package(package, config=config)
        plan = plan_grid(slide, p.spec, config)
        assert p.decodes_on_device(slide, plan) == (decode == "device")
        results[decode] = analyze_slide(uri, p)
    with torch.inference_mode():
        coords = list(zip(plan.xs.tolist(), plan.ys.tolist(), strict=True))
        want = np.stack(slide.read_batch(coords, plan.tile_size, plan.tile_mpp))
        got = CompressedSource(slide, plan, torch.device("cpu")).read(plan.xs, plan.ys)[0].numpy()
    np.testing.assert_array_equal(got, want)  # every tile of the grid, decoded alike
    cpu, device = results["cpu"], results["device"]
    assert cpu.tiles == device.tiles == device.tiles_done > 10
    assert device.failed_tiles == cpu.failed_tiles == []
    assert (device.class_map == cpu.class_map).mean() >= 0.999  # a near-tie may flip a pixel
    for cls, area in cpu.areas_mm2.items():
        assert device.areas_mm2[cls] == pytest.approx(area, rel=1e-3, abs=1e-4)


@pytest.mark.parametrize(("name", "mpp"), [("cmu", 1.0), ("synthetic", 0.7)])
def test_resampled_tiles_stay_within_the_decoder_tolerance(request, name, mpp):
    """Tiles shrunk from a finer level: inputs within the resampling tolerance, and so outputs."""
    slide = open_slide(request.getfixturevalue(name))
    today, device = predictor("cpu", mpp=mpp), predictor("device", mpp=mpp)
    plan = plan_grid(slide, today.spec, today.config)
    coords = list(zip(plan.xs.tolist(), plan.ys.tolist(), strict=True))[:40]
    with torch.inference_mode():
        want = np.stack(slide.read_batch(coords, plan.tile_size, plan.tile_mpp))
        got = CompressedSource(slide, plan, torch.device("cpu")).read(plan.xs[:40], plan.ys[:40])[0]
    diff = np.abs(got.numpy().astype(np.int16) - want)
    assert 0 < diff.max() <= RESAMPLE_MAX_ABS and diff.mean() <= RESAMPLE_MEAN_ABS  # resampled apart
    a, b = chunk_probs(slide, today), chunk_probs(slide, device)
    assert a.shape == b.shape and len(a) == plan.n_tiles
    gap = np.abs(a - b)
    # window means of probabilities, as float16: up to an ulp of 1.0 on top of the bound
    assert gap.max() <= LIPSCHITZ * RESAMPLE_MAX_ABS / 255 + 1e-3
    assert gap.mean() <= LIPSCHITZ * 3 * RESAMPLE_MEAN_ABS / 255 + 1e-3


def test_levels_without_raw_tiles_fall_back_to_todays_path(testdata):
    """A stripped TIFF has no tiles to fetch by range: decode=device reads it as decode=cpu does."""
    uri = str(testdata / "plain-tiff" / "kidney-48-5.tif")
    slide = open_slide(uri, mpp=0.5)
    device = predictor("device", tile=64, mpp=1.0)
    plan = plan_grid(slide, device.spec, device.config)
    assert not device.decodes_on_device(slide, plan)
    a = analyze_slide(uri, device, mpp=0.5)
    b = analyze_slide(uri, predictor("cpu", tile=64, mpp=1.0), mpp=0.5)
    assert a.tiles == a.tiles_done > 0
    np.testing.assert_array_equal(a.class_map, b.class_map)


def test_auto_and_cpu_decode_on_the_cpu_with_the_slides_reader(cmu):
    slide = open_slide(cmu)
    for decode in ("auto", "cpu"):
        p = predictor(decode)
        assert not p.decodes_on_device(slide, plan_grid(slide, p.spec, p.config))
    p = predictor("device")
    assert p.decodes_on_device(slide, plan_grid(slide, p.spec, p.config))


def corrupt(path: Path, level: int, indices: list[int]) -> None:
    """Overwrite the start of JPEG tiles ``indices`` of ``level``: they no longer decode."""
    with tifffile.TiffFile(path) as tif:
        offsets = tif.series[0].levels[level].keyframe.dataoffsets
    with open(path, "r+b") as fh:
        for i in indices:
            fh.seek(offsets[i])
            fh.write(b"\x00" * 64)


def test_undecodable_tiles_are_the_same_tiles_on_either_path(synthetic, tmp_path):
    path = tmp_path / "damaged.svs"
    shutil.copyfile(synthetic, path)
    with tifffile.TiffFile(path) as tif:
        across = -(-tif.series[0].levels[1].keyframe.imagewidth // 256)
    corrupt(path, 1, [2 * across + 2, 3 * across + 3])  # level 1 (0.5 µm/px): under the tissue grid
    results = {
        decode: analyze_slide(str(path), predictor(decode, max_failed_share=0.5))
        for decode in ("cpu", "device")
    }
    cpu, device = results["cpu"], results["device"]
    assert 0 < len(cpu.failed_tiles) < cpu.tiles
    assert sorted(map(tuple, device.failed_tiles)) == sorted(map(tuple, cpu.failed_tiles))
    np.testing.assert_array_equal(device.class_map, cpu.class_map)


@pytest.mark.gpu
def test_nvjpeg_analysis_matches_the_cpu_path(cmu):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    slide = open_slide(cmu)
    device = predictor("auto", device="cuda", precision="fp32")
    plan = plan_grid(slide, device.spec, device.config)
    assert device.decodes_on_device(slide, plan)  # auto on CUDA: JPEG tiles go to nvJPEG
    a, b = chunk_probs(slide, device), chunk_probs(slide, predictor("cpu", device="cuda", precision="fp32"))
    gap = np.abs(a - b)
    assert gap.max() <= LIPSCHITZ * GPU_MAX_ABS / 255 + 1e-3
    assert gap.mean() <= LIPSCHITZ * 3 * GPU_MEAN_ABS / 255
