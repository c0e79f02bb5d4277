"""Whole-slide analysis in one process: plan the tissue grid, predict chunk by chunk, stitch.

predictor = Predictor.from_package("runs/gleason/model")
result = analyze_slide("s3://bucket/slide.svs", predictor)
write_outputs(result, "out/slide", open_slide("s3://bucket/slide.svs"))
"""

from __future__ import annotations

import time
from collections.abc import Callable

from pathray.inference.grid import plan_grid
from pathray.inference.outputs import AnalysisResult
from pathray.inference.predictor import Predictor
from pathray.inference.stitch import Stitcher
from pathray.storage import StorageConfig
from pathray.wsi.backends.open import open_slide
from pathray.wsi.backends.slide import Slide
from pathray.wsi.patching.tissue import TissueConfig


def analyze_slide(
    uri: str | Slide,
    predictor: Predictor,
    storage: StorageConfig | None = None,
    tissue: TissueConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
    mpp: float | None = None,
) -> AnalysisResult:
    """Analyse one slide with ``predictor`` (Ray-free); ``progress(tiles_done, tiles_total)`` after
    every chunk. ``mpp`` overrides the slide's level-0 µm/px (needed when its file has none). An open
    ``Slide`` (e.g. ``open_slide(uri, backend="tifffile")``) is analysed as it is (``mpp`` unused).

    Tiles that cannot be decoded are left out, counted and listed in the result; the analysis
    fails when they are more than ``inference.max_failed_share`` of the slide's tiles.

    Raises:
        SlideError: the slide cannot be opened or read (the message names the URI); a
            ``TilesLostError`` when too many tiles could not be decoded.
    """
    t0 = time.perf_counter()
    slide = uri if isinstance(uri, Slide) else open_slide(uri, storage, mpp=mpp)
    slide.check()
    plan = plan_grid(slide, predictor.spec, predictor.config, tissue)
    planned = time.perf_counter() - t0
    stitcher = Stitcher(plan, predictor.spec)
    if progress:
        progress(0, plan.n_tiles)
    for result in predictor.iter_chunks(slide, plan, plan.chunks(predictor.config.chunk_tiles)):
        stitcher.add(result)
        stitcher.check_failed(predictor.config.max_failed_share)  # lost tiles only grow: fail early
        if progress:
            progress(stitcher.done_tiles, plan.n_tiles)
    out = stitcher.finish(predictor.config.max_failed_share)
    out.timings = {"plan_s": planned, **out.timings, "total_s": time.perf_counter() - t0}
    return out
