"""Analyses inside the ingress: plan the grid, fan chunks out with retries, stitch, write results.

Ray-specific parts are injected (``spec_of``, ``run_chunk``, ``retryable``), so the flow reads as
plain asyncio: one task per analysis, at most ``inflight_chunks`` chunks in flight each.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import replace
from typing import Any

from pathray.serving.analysis import STATUS_FILE, Analysis, failure_reason
from pathray.serving.config import ServeAppConfig
from pathray.serving.store import ResultStore

log = logging.getLogger(__name__)


async def run_all(coros: Iterable[Coroutine[Any, Any, None]]) -> None:
    """Run the chunk jobs of one slide together; the first failure cancels the rest (its chunks
    would be wasted work on the replicas)."""
    jobs = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.gather(*jobs)
    finally:
        for job in jobs:
            job.cancel()


class AnalysisService:
    """Runs analyses as asyncio tasks and keeps their status in memory and in the results store.

    Args:
        config: the app config.
        spec_of: model id -> its ModelSpec (read from the model store).
        run_chunk: (model id, plan, chunk) -> ChunkResult (a model replica does the work).
        retryable: whether a chunk error means "the replica died, try again" rather than a bad slide.
    """

    def __init__(
        self,
        config: ServeAppConfig,
        spec_of: Callable[[str], Awaitable[Any]],
        run_chunk: Callable[[str, Any, Any], Awaitable[Any]],
        retryable: Callable[[BaseException], bool],
        embed_tiles: Callable[..., Awaitable[Any]] | None = None,
    ) -> None:
        self.config = config
        self.section = config.serve.ingress
        self.spec_of, self.run_chunk, self.retryable = spec_of, run_chunk, retryable
        self.embed_tiles = embed_tiles
        self.results = ResultStore(config.serve.output, config.storage)
        self.analyses: dict[str, Analysis] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(self.section.max_concurrent_analyses)

    @property
    def pending(self) -> int:
        """Analyses queued or running."""
        return len(self._tasks)

    def submit(
        self,
        slide: str,
        uri: str,
        model: str,
        outputs: list[str],
        mpp: float | None = None,
        kind: str = "analysis",
        overlap: float = 0.0,
    ) -> Analysis:
        """Queue an analysis (``kind``: or an ``embedding`` job) of ``slide`` (as asked) at ``uri``
        (as checked), at level-0 ``mpp`` when given (else the slide's own); returns at once."""
        analysis = Analysis(
            uuid.uuid4().hex, slide, model, outputs, uri=uri, mpp=mpp, kind=kind, overlap=overlap
        )
        self._forget_old()
        self.analyses[analysis.id] = analysis
        task = asyncio.get_running_loop().create_task(self._run(analysis))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return analysis

    def _forget_old(self) -> None:
        """Keep the newest finished analyses in memory; older ones are served from the store."""
        finished = [a for a in self.analyses.values() if a.state in ("done", "failed")]
        for old in finished[: max(0, len(finished) - self.section.keep_in_memory)]:
            del self.analyses[old.id]

    async def status(self, analysis_id: str) -> dict[str, Any] | None:
        """In-memory status, else the status.json an ingress replica left in the store.

        A stored queued/running status whose heartbeat stopped belongs to an ingress replica
        that died with the analysis in memory: it is reported as failed, so clients stop waiting.
        """
        if analysis_id in self.analyses:
            return self.analyses[analysis_id].doc()
        doc = await asyncio.to_thread(self.results.read_json, analysis_id, STATUS_FILE)
        if doc and doc.get("status") in ("queued", "running"):
            silent = time.time() - float(doc.get("heartbeat") or 0)
            if silent > self.section.stale_after_s:
                doc["status"] = "failed"
                doc["reason"] = (
                    f"interrupted: the ingress running it stopped ({silent:.0f} s without progress)"
                )
        return doc

    async def _save(self, analysis: Analysis) -> None:
        analysis.heartbeat = time.time()
        analysis.saves += 1
        await asyncio.to_thread(self._write_status, analysis, analysis.saves, analysis.doc())

    def _write_status(self, analysis: Analysis, version: int, doc: dict[str, Any]) -> None:
        with analysis.lock:  # versions land in order: the final status is never overwritten
            if version <= analysis.written:
                return
            try:
                self.results.write_json(analysis.id, STATUS_FILE, doc)
                analysis.written = version
            except Exception as exc:  # noqa: BLE001 - a status write must not end the analysis
                log.warning("cannot write status of %s: %s", analysis.id, exc)

    async def _beat(self, analysis: Analysis) -> None:
        """Rewrite status.json every ``status_interval_s`` while the analysis lives (progress, heartbeat)."""
        while True:
            await asyncio.sleep(self.section.status_interval_s)
            await self._save(analysis)

    async def _run(self, analysis: Analysis) -> None:
        beat = asyncio.get_running_loop().create_task(self._beat(analysis))
        try:
            await self._run_in_slot(analysis)
        finally:
            beat.cancel()
        await self._save(analysis)

    async def _run_in_slot(self, analysis: Analysis) -> None:
        await self._save(analysis)
        async with self._slots:
            analysis.state = "running"
            started = time.time()
            analysis.timings["queued_s"] = started - analysis.created
            try:
                await (self._embed if analysis.kind == "embedding" else self._analyse)(analysis)
                analysis.state = "done"
            except Exception as exc:  # noqa: BLE001 - every failure ends as a reason, not a crash
                analysis.state, analysis.reason = "failed", failure_reason(exc)
                log.warning("analysis %s failed: %s", analysis.id, analysis.reason)
            analysis.timings["total_s"] = time.time() - started

    async def _analyse(self, analysis: Analysis) -> None:
        from pathray.inference.grid import plan_grid
        from pathray.inference.stitch import Stitcher
        from pathray.wsi.backends.open import open_slide

        t0 = time.time()
        slide = await asyncio.to_thread(open_slide, analysis.uri, self.config.storage, mpp=analysis.mpp)
        spec = replace(await self.spec_of(analysis.model), name=analysis.model)
        plan = await asyncio.to_thread(plan_grid, slide, spec, self.config.inference, self.config.tissue)
        chunks = plan.chunks(self.config.inference.chunk_tiles)
        analysis.total_tiles, analysis.chunks_total = plan.n_tiles, len(chunks)
        analysis.timings["plan_s"] = time.time() - t0
        await self._save(analysis)

        t1 = time.time()
        stitcher = Stitcher(plan, spec)
        gate = asyncio.Semaphore(self.section.inflight_chunks)
        max_failed = self.config.inference.max_failed_share

        async def one(chunk: Any) -> None:
            async with gate:
                result = await self._chunk_with_retries(analysis, plan, chunk)
            if stitcher.add(result):
                analysis.done_tiles, analysis.chunks_done = stitcher.done_tiles, analysis.chunks_done + 1
                analysis.failed_tiles = len(stitcher.failed_tiles)
                stitcher.check_failed(max_failed)  # undecodable tiles only add up: fail early

        await run_all(one(c) for c in chunks)
        analysis.timings["predict_s"] = time.time() - t1

        t2 = time.time()
        result = await asyncio.to_thread(stitcher.finish, max_failed)
        analysis.files = await asyncio.to_thread(self._write, analysis, result, slide)
        analysis.timings["write_s"] = time.time() - t2

    async def _chunk_with_retries(self, analysis: Analysis, plan: Any, chunk: Any) -> Any:
        return await self._retrying(
            analysis, chunk.index, lambda: self.run_chunk(analysis.model, plan, chunk)
        )

    async def _retrying(self, analysis: Analysis, index: int, call: Callable[[], Awaitable[Any]]) -> Any:
        """``call()`` with the chunk timeout, sent again when the replica died or timed out."""
        for attempt in range(self.section.chunk_retries + 1):
            try:
                return await asyncio.wait_for(call(), self.section.chunk_timeout_s)
            except Exception as exc:
                again = isinstance(exc, TimeoutError) or self.retryable(exc)
                if attempt == self.section.chunk_retries or not again:
                    raise
                analysis.retries += 1
                log.warning("chunk %d of %s: %s; retrying", index, analysis.id, failure_reason(exc))
                await asyncio.sleep(self.section.retry_backoff_s * (attempt + 1))
        raise AssertionError("unreachable")

    async def _embed(self, analysis: Analysis) -> None:
        """An embedding job: the slide's tissue grid at the model's tile size and mpp, chunks of
        tiles read and embedded by model replicas, one Parquet file (``embeddings.parquet``, the
        format ``pathray embed`` writes) in the results store."""
        import numpy as np

        from pathray.inference.embeddings import EmbeddingSource, SlideEmbeddings, to_parquet
        from pathray.serving.batch import slide_id_of
        from pathray.serving.embed import plan_slide_tiles

        if self.embed_tiles is None:
            raise RuntimeError("this service has no model deployment for embeddings")
        t0 = time.time()
        spec = await self.spec_of(analysis.model)
        slide_id = slide_id_of(analysis.uri) or analysis.id
        inference = self.config.inference
        planned = await asyncio.to_thread(
            plan_slide_tiles,
            slide_id,
            analysis.uri,
            analysis.mpp,
            spec.tile_size,
            spec.tile_mpp,
            analysis.overlap,
            inference.min_tissue,
            self.config.storage,
            self.config.tissue,
        )
        if planned["error"][0]:
            raise ValueError(str(planned["error"][0]))
        n = int(planned["n_tiles"][0])
        if n == 0:
            raise ValueError(f"{analysis.slide}: no tissue tile to embed")
        xs, ys, tissue = planned["x"][:n], planned["y"][:n], planned["tissue"][:n]
        size = inference.chunk_tiles
        starts = list(range(0, n, size))
        analysis.total_tiles, analysis.chunks_total = n, len(starts)
        analysis.timings["plan_s"] = time.time() - t0
        await self._save(analysis)

        t1 = time.time()
        gate = asyncio.Semaphore(self.section.inflight_chunks)
        parts: dict[int, dict[str, Any]] = {}

        async def one(index: int, start: int) -> None:
            sl = slice(start, start + size)
            async with gate:
                part = await self._retrying(
                    analysis,
                    index,
                    lambda: self.embed_tiles(
                        analysis.model, analysis.uri, analysis.mpp, xs[sl], ys[sl], spec
                    ),  # type: ignore[misc]
                )
            parts[start] = part
            analysis.done_tiles += int(part["ok"].sum())
            analysis.failed_tiles += int((~part["ok"]).sum())
            analysis.chunks_done += 1
            if n and analysis.failed_tiles / n > inference.max_failed_share:
                raise ValueError(
                    f"{analysis.failed_tiles} of {n} tiles do not decode (more than "
                    f"{inference.max_failed_share:.0%}); first: {part['error']}"
                )

        await run_all(one(i, s) for i, s in enumerate(starts))
        analysis.timings["embed_s"] = time.time() - t1

        t2 = time.time()
        source = EmbeddingSource(**parts[starts[0]]["source"])
        ok = np.concatenate([parts[s]["ok"] for s in starts])
        vectors = np.concatenate([parts[s]["embedding"] for s in starts])[ok]
        table = SlideEmbeddings(
            slide_id=slide_id,
            x=xs[ok],
            y=ys[ok],
            mpp=np.full(int(ok.sum()), spec.tile_mpp, np.float32),
            size=np.full(int(ok.sum()), spec.tile_size, np.int32),
            tissue=tissue[ok],
            embeddings=vectors,
            source=source,
        )
        data = await asyncio.to_thread(to_parquet, table)
        name = analysis.outputs[0]
        uri = await asyncio.to_thread(self.results.write_bytes, analysis.id, name, data)
        analysis.files = {name: uri}
        analysis.timings["write_s"] = time.time() - t2

    def _write(self, analysis: Analysis, result: Any, slide: Any) -> dict[str, str]:
        """Outputs are made in a local temp folder, then put into the store one whole object each."""
        import tempfile
        from pathlib import Path

        from pathray.inference.outputs import write_outputs

        with tempfile.TemporaryDirectory(prefix="pathray-out-") as tmp:
            write_outputs(result, tmp, slide)
            return {
                name: self.results.write_bytes(analysis.id, name, (Path(tmp) / name).read_bytes())
                for name in analysis.outputs
            }
