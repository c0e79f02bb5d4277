"""Stitching is exact: models whose predictions are known functions of the pixels, on a slide of blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from blocks import CLASSES, ColourClassifier, ColourSegmenter, expected_map, write_blocks_slide

from pathray.inference.analyze import analyze_slide
from pathray.inference.config import InferenceConfig
from pathray.inference.grid import plan_grid
from pathray.inference.predictor import Predictor
from pathray.inference.spec import ModelSpec
from pathray.inference.stitch import Stitcher
from pathray.models.tasks import build_task
from pathray.wsi.backends.open import open_slide

MPP, CELL = 2.0, 96  # level-0 µm/px (the model's own mpp: tiles are read without resampling)
PX_MM2 = (4.0 / 1000) ** 2  # one class-map pixel at out_mpp 4


@pytest.fixture(scope="module")
def blocks(tmp_path_factory):
    rng = np.random.default_rng(7)
    labels = rng.integers(0, len(CLASSES), size=(12, 14))
    labels[:3, :3] = 0  # a corner of glass
    path = write_blocks_slide(tmp_path_factory.mktemp("blocks") / "blocks.tiff", labels, CELL, MPP)
    return str(path), labels


def seg_spec(task: str = "segmentation") -> ModelSpec:
    task_spec = build_task({"name": task, "classes": CLASSES})
    return ModelSpec(task_spec, tile_size=64, tile_mpp=MPP, name="colour")


@pytest.mark.parametrize("compute_threads", [1, 2])
def test_segmentation_map_and_areas_are_exact(blocks, compute_threads):
    uri, labels = blocks
    # Overlap 0.25: stride 48 px; out_mpp 4: 2 level-0 px per map pixel, so every tile edge, block
    # edge and map pixel line up and the stitched map must equal the blocks exactly.
    config = InferenceConfig(
        overlap=0.25,
        min_tissue=0.0,
        clip_to_tissue=False,
        batch_size=7,
        chunk_tiles=10,
        read_batch=3,
        compute_threads=compute_threads,
    )
    result = analyze_slide(uri, Predictor(ColourSegmenter(), seg_spec(), config))
    expected = expected_map(labels, CELL, 2)
    assert result.class_map.shape == expected.shape
    np.testing.assert_array_equal(result.class_map, expected)
    counts = np.bincount(expected.ravel(), minlength=len(CLASSES))
    for i, name in enumerate(CLASSES):
        assert result.areas_mm2[name] == pytest.approx(counts[i] * PX_MM2, rel=1e-9)
    assert result.tiles_done == result.tiles > 0


def test_classification_paints_tiles_and_averages_overlaps(blocks):
    uri, labels = blocks
    config = InferenceConfig(overlap=0.25, min_tissue=0.0, clip_to_tissue=False, chunk_tiles=16)
    predictor = Predictor(ColourClassifier(), seg_spec("classification"), config)
    slide = open_slide(uri)
    plan = plan_grid(slide, predictor.spec, config)
    result = analyze_slide(uri, predictor)
    # expected: each tile's majority class, one vote per covering tile, argmax (ties: lower index)
    level0 = np.kron(labels, np.ones((CELL, CELL), np.int64))
    votes = np.zeros((len(CLASSES), *plan.map_shape))
    for x, y in zip(plan.xs, plan.ys, strict=True):
        patch = np.full((plan.extent, plan.extent), -1)
        part = level0[y : y + plan.extent, x : x + plan.extent]
        patch[: part.shape[0], : part.shape[1]] = part
        patch[patch < 0] = 0  # outside the slide reads as white glass
        cls = np.bincount(patch.ravel(), minlength=len(CLASSES)).argmax()
        votes[cls, y // 2 : (y + plan.extent) // 2, x // 2 : (x + plan.extent) // 2] += 1
    np.testing.assert_array_equal(result.class_map, votes.argmax(0).astype(np.uint8))


def test_tissue_clipping_leaves_glass_unanalysed(blocks):
    uri, labels = blocks
    config = InferenceConfig(overlap=0.25, min_tissue=0.5, batch_size=16)
    result = analyze_slide(uri, Predictor(ColourSegmenter(), seg_spec(), config))
    expected = expected_map(labels, CELL, 2)
    glass = np.kron(labels == 0, np.ones((CELL // 2, CELL // 2), bool))
    inner = np.zeros_like(glass)
    inner[12:-12, 12:-12] = True  # away from the slide border, where the mask's closing may reach
    # the glass corner holds no tissue tile: not analysed; analysed pixels are exactly the colours
    assert (result.class_map[:CELL, :CELL] == 255).all()
    analysed = result.class_map != 255
    assert analysed.mean() > 0.5
    np.testing.assert_array_equal(result.class_map[analysed], expected[analysed])
    assert result.areas_mm2["Background"] < (glass & inner).sum() * PX_MM2


def test_a_repeated_chunk_is_ignored_and_chunks_are_small(blocks):
    uri, _ = blocks
    config = InferenceConfig(overlap=0.25, min_tissue=0.0, clip_to_tissue=False, chunk_tiles=32)
    predictor = Predictor(ColourSegmenter(), seg_spec(), config)
    slide = open_slide(uri)
    plan = plan_grid(slide, predictor.spec, config)
    chunks = plan.chunks(config.chunk_tiles)
    results = [predictor.predict_chunk(uri, plan, c) for c in chunks]
    assert max(r.nbytes for r in results) < 2 * 2**20  # float16 at out_mpp, not tile pixels
    once, twice = Stitcher(plan, predictor.spec), Stitcher(plan, predictor.spec)
    for r in reversed(results):  # any order
        assert once.add(r)
        assert twice.add(r)
        assert not twice.add(r)  # a retried chunk arrives again: ignored
    assert once.done_tiles == twice.done_tiles == plan.n_tiles
    np.testing.assert_array_equal(once.finish().class_map, twice.finish().class_map)


@pytest.mark.parametrize(("overlap", "out_mpp", "shared"), [(0.25, 4.0, True), (0.3, 8.0, False)])
def test_window_means_are_the_box_means_of_each_tile(blocks, overlap, out_mpp, shared):
    """Each map pixel a tile covers gets the mean of exactly the tile pixels under it, whether every
    tile of a batch has the same boxes (a grid on the map's pixels) or each has its own."""
    from pathray.inference.reduce import _edges, window_means

    uri, _ = blocks
    config = InferenceConfig(overlap=overlap, out_mpp=out_mpp, min_tissue=0.0, clip_to_tissue=False)
    plan = plan_grid(open_slide(uri), seg_spec(), config)
    xs, ys = plan.xs[:12], plan.ys[:12]
    s = plan.tile_size
    probs = torch.rand(len(xs), len(CLASSES), s, s, generator=torch.Generator().manual_seed(0))
    means, rows, cols, heights, widths = window_means(probs, plan, xs, ys)
    k = means.shape[-1]
    ey = _edges(ys, rows, k, plan.downsample, s / plan.extent, s)
    ex = _edges(xs, cols, k, plan.downsample, s / plan.extent, s)
    assert bool((ey == ey[:, :1]).all() and (ex == ex[:, :1]).all()) is shared
    for i in range(len(xs)):
        for j in range(heights[i]):
            for q in range(widths[i]):
                box = probs[i, :, ey[0, i, j] : ey[1, i, j], ex[0, i, q] : ex[1, i, q]]
                torch.testing.assert_close(means[i, :, j, q], box.mean((1, 2)), rtol=1e-5, atol=1e-6)


def test_the_tissue_map_is_the_mask_at_each_map_pixels_centre(blocks):
    uri, _ = blocks
    plan = plan_grid(open_slide(uri), seg_spec(), InferenceConfig(overlap=0.25))
    got = plan.tissue_map()
    assert got is not None and got.shape == plan.map_shape
    th, tw = plan.tissue_shape
    mask = np.unpackbits(plan.tissue_bits, count=th * tw).reshape(th, tw).astype(bool)
    d = plan.downsample / plan.tissue_downsample
    want = np.array(
        [
            [
                mask[min(int((r + 0.5) * d), th - 1), min(int((c + 0.5) * d), tw - 1)]
                for c in range(got.shape[1])
            ]
            for r in range(got.shape[0])
        ]
    )
    np.testing.assert_array_equal(got, want)
    assert 0 < got.mean() < 1  # the glass corner is out, the blocks are in
