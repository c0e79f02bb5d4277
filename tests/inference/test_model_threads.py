"""Model threads take whole batches in grid order: every thread has work (also inside one chunk), the
results are those of one thread, a failure in any batch reaches the caller, and the threads are the
predictor's: kept between calls until ``close``."""

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
        self.runners: list[threading.Thread] = []
        self.lock = threading.Lock()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.threads.append(threading.current_thread().name)
            self.runners.append(threading.current_thread())
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


def ours(before: set[threading.Thread] = frozenset()) -> set[threading.Thread]:
    """The predictor threads alive now that were not in ``before``."""
    now = {t for t in threading.enumerate() if t.name.startswith(("pathray-model", "pathray-tiles"))}
    return now - before


def test_the_same_threads_serve_every_call_until_close(slide):
    model = Recorder()
    p = predictor(model, threads=2)
    plan = plan_grid(slide, p.spec, p.config)
    chunks = plan.chunks(8)[:3]
    before = ours()
    first = list(p.iter_chunks(slide, plan, chunks))
    used = set(model.runners)
    model.runners.clear()
    second = list(p.iter_chunks(slide, plan, chunks))
    assert set(model.runners) <= used and all(t.is_alive() for t in used)  # kept, not started again
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a.probs, b.probs)
    p.close()
    assert not [t for t in used if t.is_alive()] and not ours(before)
    (again,) = p.iter_chunks(slide, plan, chunks[:1])  # a closed predictor starts new threads
    np.testing.assert_array_equal(again.probs, first[0].probs)
    p.close()
    assert not ours(before)


def test_a_failing_batch_fails_the_call_and_the_threads_serve_the_next(slide):
    model = Recorder(fail_at=5)
    p = predictor(model, threads=2)
    plan = plan_grid(slide, p.spec, p.config)
    with pytest.raises(RuntimeError, match="failed"):
        list(p.iter_chunks(slide, plan, plan.chunks(8)))
    model.fail_at = None
    chunk = plan.chunks(8)[0]
    (result,) = p.iter_chunks(slide, plan, [chunk])
    (alone,) = predictor(ColourSegmenter(), threads=1).iter_chunks(slide, plan, [chunk])
    np.testing.assert_array_equal(result.probs, alone.probs)
    with p:  # closes on exit
        pass
    assert not [t for t in set(model.runners) if t.is_alive()]


def test_a_consumer_that_stops_early_stops_the_work(slide):
    model = Recorder(delay=0.01)
    p = predictor(model, threads=2)
    plan = plan_grid(slide, p.spec, p.config)
    chunks = plan.chunks(4)
    results = p.iter_chunks(slide, plan, chunks)
    next(results)
    results.close()  # e.g. the analysis failed on too many lost tiles: returns once the threads stopped
    done = len(model.threads)
    assert done < len(chunks)  # the rest of the slide was not predicted
    time.sleep(0.1)
    assert len(model.threads) == done  # nothing still running or queued
    p.close()
    assert not [t for t in set(model.runners) if t.is_alive()]


class Threads(ColourSegmenter):
    """The colour segmenter, noting how many torch threads each batch's ops get."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: list[int] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.counts.append(torch.get_num_threads())
        return super().forward(images)


def test_kept_threads_take_the_torch_threads_each_call_starts_with(slide):
    model = Threads()
    p = predictor(model, threads=2)
    plan = plan_grid(slide, p.spec, p.config)
    chunks = plan.chunks(8)[:2]
    before = torch.get_num_threads()
    try:
        for n in (2, 1, 2):
            torch.set_num_threads(n)
            model.counts.clear()
            list(p.iter_chunks(slide, plan, chunks))
            assert model.counts and set(model.counts) == {n}
    finally:
        torch.set_num_threads(before)
        p.close()
