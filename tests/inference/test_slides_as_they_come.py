"""Slides as they come (Ray-free): an mpp override for slides without one, undecodable tiles counted,
listed in summary.json, hatched in the overlay, and too many of them failing the analysis by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

TCGA = "aperio/tcga-cr-7395-01a-01-ts1.svs"  # no mpp in its metadata


def corrupt_tiles(path: Path, level: int, indices: list[int]) -> None:
    """Overwrite the start of the JPEG tiles ``indices`` of ``level``: those reads fail to decode."""
    from tiffslide import TiffSlide

    page = TiffSlide(path).ts_tifffile.series[0].levels[level].keyframe
    offsets = list(page.dataoffsets)
    with open(path, "r+b") as fh:
        for i in indices:
            fh.seek(offsets[i])
            fh.write(b"\x00" * 64)


def tiff_tiles(path: Path, level: int) -> tuple[int, int, int]:
    """``(tile edge, tiles per row, level downsample)`` of ``level``'s TIFF tiling."""
    from tiffslide import TiffSlide

    slide = TiffSlide(path)
    page = slide.ts_tifffile.series[0].levels[level].keyframe
    return page.tilewidth, -(-page.imagewidth // page.tilewidth), round(slide.level_downsamples[level])


def touched(plan, level_ds: int, tile: int, per_row: int, bad: set[int]) -> set[tuple[int, int]]:
    """Grid tiles whose pixels (read at a level of downsample ``level_ds`` without resampling) touch a
    corrupted TIFF tile: the tiles an analysis must report as failed."""
    out = set()
    side = plan.tile_size
    for x, y in zip(plan.xs.tolist(), plan.ys.tolist(), strict=True):
        lx, ly = x // level_ds, y // level_ds
        cols = range(max(lx, 0) // tile, (lx + side - 1) // tile + 1)
        rows = range(max(ly, 0) // tile, (ly + side - 1) // tile + 1)
        if any(r * per_row + c in bad for r in rows for c in cols):
            out.add((x, y))
    return out


@pytest.fixture(scope="module")
def fine_package(tmp_path_factory, save_package) -> str:
    """A debug_cnn segmentation model on 128 px tiles at 0.5 µm/px: on a 0.25 µm/px synthetic slide
    it reads level 1 as is, while tissue masks and thumbnails come from level 2."""
    out = tmp_path_factory.mktemp("fine")
    return save_package(out / "model", "data.stream.sampler.size=128", "data.stream.sampler.mpps=[0.5]")


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, fine_package) -> tuple[Path, set[tuple[int, int]]]:
    """A 3072 px synthetic slide with two level-1 JPEG tiles under tissue tiles destroyed, and the
    grid tiles (level-0 corners) that therefore cannot be decoded."""
    from pathray.inference.grid import plan_grid
    from pathray.inference.predictor import Predictor
    from pathray.wsi.backends import open_slide
    from pathray.wsi.synth import SynthConfig, write_synthetic_slide

    out = tmp_path_factory.mktemp("damaged")
    slide = write_synthetic_slide(out / "clean.svs", seed=11, config=SynthConfig(size=3072))
    predictor = Predictor.from_package(fine_package)
    plan = plan_grid(open_slide(slide.path, cache=False), predictor.spec, predictor.config)
    tile, per_row, ds = tiff_tiles(slide.path, 1)
    assert ds == 2
    picks = [len(plan.xs) // 3, 2 * len(plan.xs) // 3]
    centre = plan.extent // 2
    bad = {
        (int(plan.ys[i]) + centre) // ds // tile * per_row + (int(plan.xs[i]) + centre) // ds // tile
        for i in picks
    }
    path = out / "damaged.svs"
    shutil.copyfile(slide.path, path)
    corrupt_tiles(path, 1, sorted(bad))
    expected = touched(plan, ds, tile, per_row, bad)
    assert 0 < len(expected) < plan.n_tiles / 4
    return path, expected


def test_undecodable_tiles_are_counted_listed_and_hatched(fine_package, damaged, tmp_path):
    from PIL import Image

    from pathray.inference.analyze import analyze_slide
    from pathray.inference.config import InferenceConfig
    from pathray.inference.outputs import FAILED_COLOR, write_outputs
    from pathray.inference.predictor import Predictor
    from pathray.wsi.backends import open_slide

    path, expected = damaged
    config = InferenceConfig(max_failed_share=0.5, chunk_tiles=16, read_batch=8, read_threads=2)
    result = analyze_slide(str(path), Predictor.from_package(fine_package, config=config))
    assert {tuple(xy) for xy in result.failed_tiles} == expected
    files = write_outputs(result, str(tmp_path), open_slide(path))
    summary = json.loads(Path(files["summary.json"]).read_text())
    assert summary["tiles_done"] == summary["tiles"] > len(expected)
    assert summary["tiles_failed"] == len(expected)
    assert summary["failed_share"] == pytest.approx(len(expected) / summary["tiles"], abs=1e-6)
    assert {tuple(xy) for xy in summary["failed_tiles"]["xy"]} == expected
    assert "JPEG" in summary["failed_tiles"]["cause"] or "reading level 1" in summary["failed_tiles"]["cause"]
    overlay = np.asarray(Image.open(files["overlay.png"]).convert("RGB"))
    hatched = (overlay == FAILED_COLOR).all(axis=-1)
    d = result.out_mpp / result.slide_mpp
    inside = np.zeros_like(hatched)
    for x, y in expected:
        inside[
            int(y / d) : int(np.ceil((y + result.tile_extent) / d)),
            int(x / d) : int(np.ceil((x + result.tile_extent) / d)),
        ] = True
    assert hatched[inside].sum() > 0.15 * inside.sum()  # stripes over every failed tile's window
    assert not hatched[~inside].any()  # and nowhere else
    clean = analyze_slide(
        str(path.with_name("clean.svs")), Predictor.from_package(fine_package, config=config)
    )
    assert clean.failed_tiles == [] and clean.tiles == result.tiles


def test_too_many_undecodable_tiles_fail_the_analysis_naming_slide_count_and_share(fine_package, damaged):
    from pathray.inference.analyze import analyze_slide
    from pathray.inference.config import InferenceConfig
    from pathray.inference.predictor import Predictor
    from pathray.inference.stitch import TilesLostError

    path, expected = damaged
    config = InferenceConfig(max_failed_share=0.01, chunk_tiles=16)
    with pytest.raises(TilesLostError) as info:
        analyze_slide(str(path), Predictor.from_package(fine_package, config=config))
    message = str(info.value)
    assert message.startswith(f"cannot read {path}: ")
    assert " of " in message and "tiles (" in message and "max_failed_share (1 %)" in message
    lost, total = (int(v) for v in message.split(": ", 1)[1].split(" tiles")[0].split(" of "))
    assert 0 < lost <= len(expected) and lost / total > 0.01


def test_a_slide_without_mpp_is_analysed_with_an_override_and_refused_without(
    save_package, testdata, tmp_path
):
    from pathray.inference.analyze import analyze_slide
    from pathray.inference.config import InferenceConfig
    from pathray.inference.predictor import Predictor
    from pathray.wsi.backends import SlideReadError

    predictor = Predictor.from_package(save_package(tmp_path / "model"), config=InferenceConfig())
    uri = str(testdata / TCGA)
    with pytest.raises(SlideReadError) as info:
        analyze_slide(uri, predictor)
    assert "no usable mpp" in str(info.value) and "--mpp" in str(info.value) and '"mpp"' in str(info.value)
    result = analyze_slide(uri, predictor, mpp=0.5)
    assert result.slide_mpp == 0.5 and result.tiles > 10 and result.tiles_done == result.tiles
    assert sum(result.areas_mm2.values()) > 0
