"""Model threads take whole batches in grid order: every thread has work (also inside one chunk), the
results are those of one thread, and a failure in any batch reaches the caller."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from blocks import CLASSES, ColourSegmenter, write_blocks_slide

from pathray.inference.config import InferenceConfig
from pathray.inference.grid import Chunk, plan_grid
from pathray.inference.predictor import Predictor
from pathray.inference.spec import ModelSpec
from pathray.models.tasks import build_task
from pathray.wsi.backends.open import open_slide

MPP = 2.0


class Recorder(ColourSegmenter):
    """The colour segmenter, slowed down, noting which thread ran each batch; fails at batch ``fail_at``."""

    def __init__(self, delay: float = 0.0, fail_at: int | None = None) -> None:
        super().__init__()
        self.delay, self.fail_at = delay, fail_at
        self.threads: list[str] = []
        self.lock = threading.Lock()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.threads.append(threading.current_thread().name)
            calls = len(self.threads)
        if self.fail_at is not None and calls >= self.fail_at:
            raise RuntimeError(f"batch {calls} failed")
        time.sleep(self.delay)
        return super().forward(images)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    labels = np.random.default_rng(3).integers(0, len(CLASSES), size=(8, 10))
    return open_slide(write_blocks_slide(tmp_path_factory.mktemp("threads") / "b.tiff", labels, 96, MPP))


def predictor(model: torch.nn.Module, threads: int) -> Predictor:
    spec = ModelSpec(build_task({"name": "segmentation", "classes": CLASSES}), 64, MPP, "colour")
    config = InferenceConfig(
        min_tissue=0.0, clip_to_tissue=False, batch_size=4, read_batch=2, compute_threads=threads
    )
    return Predictor(model, spec, config)


def test_one_chunk_is_shared_by_every_model_thread(slide):
    model = Recorder(delay=0.05)
    p = predictor(model, threads=2)
    plan = plan_grid(slide, p.spec, p.config)
    chunk = plan.chunks(24)[0]
    (result,) = p.iter_chunks(slide, plan, [chunk])
    assert len(model.threads) == 6 and len(set(model.threads)) == 2  # 6 batches of one chunk, 2 threads
    (alone,) = predictor(ColourSegmenter(), threads=1).iter_chunks(slide, plan, [chunk])
    np.testing.assert_array_equal(result.probs, alone.probs)  # batch results put back in grid order
    np.testing.assert_array_equal(result.rows, alone.rows)


def test_chunks_come_in_order_an_empty_one_too(slide):
    p = predictor(ColourSegmenter(), threads=2)
    plan = plan_grid(slide, p.spec, p.config)
    chunks = plan.chunks(7)[:3]
    empty = Chunk(99, np.zeros(0, np.int64), np.zeros(0, np.int64))
    results = list(p.iter_chunks(slide, plan, [chunks[0], empty, chunks[1], chunks[2]]))
    assert [r.index for r in results] == [chunks[0].index, 99, chunks[1].index, chunks[2].index]
    assert [r.n_tiles for r in results] == [7, 0, 7, 7]


def test_a_failing_batch_fails_the_call_and_leaves_no_thread_behind(slide):
    p = predictor(Recorder(fail_at=5), threads=2)
    plan = plan_grid(slide, p.spec, p.config)
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(RuntimeError, match="failed"):
        list(p.iter_chunks(slide, plan, plan.chunks(8)))
    left = {t.name for t in threading.enumerate()} - before
    assert not [name for name in left if name.startswith(("pathray-model", "pathray-tiles"))]


def test_a_consumer_that_stops_early_stops_the_threads(slide):
    model = Recorder(delay=0.01)
    p = predictor(model, threads=2)
    plan = plan_grid(slide, p.spec, p.config)
    chunks = plan.chunks(4)
    results = p.iter_chunks(slide, plan, chunks)
    next(results)
    results.close()  # e.g. the analysis failed on too many lost tiles
    assert len(model.threads) < len(chunks)  # the rest of the slide was not predicted
    assert not [t for t in threading.enumerate() if t.name.startswith(("pathray-model", "pathray-tiles"))]
