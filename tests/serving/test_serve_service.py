"""The ingress's analysis flow without Ray: retries, timeouts, failures, stale statuses (a real
predictor, slide and store; the chunk runner is the injected seam where Serve's handle sits)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pytest

from pathray.inference.config import InferenceConfig


class ReplicaGone(RuntimeError):
    """Stands for the errors ``replica_died`` accepts (a real one needs a real dying replica)."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory, save_package):
    from pathray.inference.predictor import Predictor
    from pathray.wsi.synth import SynthConfig, write_synthetic_slides

    root = tmp_path_factory.mktemp("service")
    (slide,) = write_synthetic_slides(root / "slides", 1, seed=3, config=SynthConfig(size=4096))
    save_package(root / "models" / "seg")
    inference = InferenceConfig(chunk_tiles=4, read_threads=2)
    predictor = Predictor.from_package(str(root / "models" / "seg"), config=inference)
    return root, str(slide.path), predictor, inference


def run_service(setup, run_chunk, **ingress):
    from pathray.serving.app import load_app_config
    from pathray.serving.service import AnalysisService

    root, slide, predictor, inference = setup
    ingress = {"retry_backoff_s": 0.01, "status_interval_s": 0.05, **ingress}
    cfg = load_app_config(
        {
            "inference": inference.model_dump(),
            "serve": {"models": str(root / "models"), "output": str(root / "out"), "ingress": ingress},
        }
    )

    async def spec_of(model_id: str):
        return predictor.spec

    async def main():
        service = AnalysisService(cfg, spec_of, run_chunk, lambda e: isinstance(e, ReplicaGone))
        analysis = service.submit(slide, slide, "seg", ["summary.json", "mask.png"])
        while analysis.state in ("queued", "running"):
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # the last status write
        return analysis, await service.status(analysis.id)

    return asyncio.run(main())


def test_lost_chunks_are_retried_and_every_tile_counted_once(setup):
    from pathray.inference.analyze import analyze_slide

    root, slide, predictor, _ = setup
    calls: Counter[int] = Counter()

    async def flaky(model_id, plan, chunk):
        calls[chunk.index] += 1
        if chunk.index % 3 == 0 and calls[chunk.index] == 1:
            raise ReplicaGone("replica died")
        return await asyncio.to_thread(predictor.predict_chunk, plan.slide_uri, plan, chunk)

    analysis, doc = run_service(setup, flaky)
    assert analysis.state == "done", analysis.reason
    n_chunks = analysis.chunks_total
    assert analysis.retries == len(range(0, n_chunks, 3))
    assert analysis.done_tiles == analysis.total_tiles and analysis.chunks_done == n_chunks
    stored = json.loads((root / "out" / analysis.id / "summary.json").read_text())
    offline = analyze_slide(slide, predictor).summary()
    assert stored["tiles_done"] == stored["tiles"] == offline["tiles"]
    assert stored["areas_mm2"] == offline["areas_mm2"]
    assert doc["status"] == "done" and set(doc["links"]) == {"self", "summary.json", "mask.png"}
    assert not (root / "out" / analysis.id / "overlay.png").exists()


def test_slow_chunks_time_out_and_are_retried(setup):
    _, _, predictor, _ = setup
    calls: Counter[int] = Counter()

    async def stuck_once(model_id, plan, chunk):
        calls[chunk.index] += 1
        if chunk.index == 0 and calls[0] == 1:
            await asyncio.sleep(30)
        return await asyncio.to_thread(predictor.predict_chunk, plan.slide_uri, plan, chunk)

    analysis, _ = run_service(setup, stuck_once, chunk_timeout_s=2)
    assert analysis.state == "done" and analysis.retries == 1 and calls[0] == 2


def test_final_errors_and_exhausted_retries_fail_with_the_reason(setup):
    async def bad_slide(model_id, plan, chunk):
        raise ValueError("cannot read tile at (0, 0)")

    analysis, doc = run_service(setup, bad_slide)
    assert analysis.state == "failed" and analysis.retries == 0
    assert doc["status"] == "failed" and doc["reason"] == "ValueError: cannot read tile at (0, 0)"

    async def always_gone(model_id, plan, chunk):
        raise ReplicaGone("replica died")

    analysis, _ = run_service(setup, always_gone, chunk_retries=2)
    assert analysis.state == "failed" and "replica died" in analysis.reason
    assert analysis.retries >= 2


def test_a_stale_running_status_in_the_store_reads_as_failed(setup, tmp_path):
    from pathray.serving.app import load_app_config
    from pathray.serving.service import AnalysisService
    from pathray.serving.store import ResultStore

    ResultStore(str(tmp_path)).write_json("abc", "status.json", {"status": "running", "heartbeat": 0})
    cfg = load_app_config({"serve": {"output": str(tmp_path)}})

    async def never(*_):
        raise AssertionError("not called")

    async def main():
        return await AnalysisService(cfg, never, never, lambda e: False).status("abc")

    doc = asyncio.run(main())
    assert doc["status"] == "failed" and doc["reason"].startswith("interrupted")
    assert Path(tmp_path / "abc" / "status.json").is_file()
