"""The one predictor: a model package -> tile predictions -> compact chunk results (no Ray).

    predictor = Predictor.from_package("runs/x/model")
    plan = plan_grid(slide, predictor.spec, predictor.config)
    for result in predictor.iter_chunks(slide, plan, plan.chunks(128)): stitcher.add(result)

A Serve replica calls ``predict_chunk`` per chunk; offline runs and the CLI use ``analyze_slide``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import numpy as np
import torch
from torch import nn

from pathray.inference.config import InferenceConfig
from pathray.inference.grid import Chunk, GridPlan, map_windows, window_counts
from pathray.inference.points import grid_keys, owned
from pathray.inference.reader import Batch, CompressedSource, PixelSource, TileReader
from pathray.inference.reduce import window_means
from pathray.inference.results import ChunkParts, ChunkResult, TilePredictions
from pathray.inference.spec import ModelSpec
from pathray.storage import StorageConfig
from pathray.wsi.backends.compressed import CompressedTileReader
from pathray.wsi.backends.levels import select_level
from pathray.wsi.backends.slide import Slide


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Predictor:
    """A model in eval mode on its device, its spec and the inference config.

    Args:
        model: uint8 ``(B, H, W, 3)`` tiles -> task outputs (a ``TaskModel``, or any module alike).
        spec: what the outputs mean (its task spec turns them into probabilities and points).
        config: batch size, reader threads, device, precision.
    """

    def __init__(self, model: nn.Module, spec: ModelSpec, config: InferenceConfig | None = None) -> None:
        self.spec = spec
        self.config = config or InferenceConfig()
        self.device = resolve_device(self.config.device)
        self.model = model.to(self.device).eval()
        if self.config.torch_threads and self.device.type == "cpu":
            torch.set_num_threads(self.config.torch_threads)  # process-wide: see InferenceConfig
        bf16 = self.config.precision == "bf16" or (
            self.config.precision == "auto" and self.device.type == "cuda"
        )
        self.dtype = torch.bfloat16 if bf16 else None
        self._pools: tuple[ThreadPoolExecutor, ThreadPoolExecutor] | None = None
        self._pools_lock = threading.Lock()

    def _threads(self) -> tuple[ThreadPoolExecutor, ThreadPoolExecutor]:
        """``(model threads, reader threads)``, started on first use and kept for later calls.

        A thread keeps the memory glibc gave it (its arena): new threads for every slide or chunk
        fault the model's activations in again each time (347k against 64k page faults in four
        passes of ``benchmarks/wsi_inference.py``, 2-3 % of the CPU). Calls from several threads
        share them: their batches wait for the model threads in turn.
        """
        with self._pools_lock:
            if self._pools is None:
                cfg = self.config
                self._pools = (
                    ThreadPoolExecutor(cfg.compute_threads, thread_name_prefix="pathray-model"),
                    ThreadPoolExecutor(cfg.read_threads, thread_name_prefix="pathray-tiles"),
                )
            return self._pools

    def close(self) -> None:
        """Stop the predictor's threads once their work is done (a later call starts new ones)."""
        with self._pools_lock:
            pools, self._pools = self._pools, None
        for pool in pools or ():
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def from_package(
        cls, uri: str, storage: StorageConfig | None = None, config: InferenceConfig | None = None
    ) -> Predictor:
        """Load a model package (``save_model_package`` / a training run's ``model/``)."""
        from pathray.models.package import read_model_package

        package = read_model_package(uri, storage)
        model, _ = package.build("cpu")
        return cls(model, ModelSpec.from_package(package.config, name=uri), config)

    # -- tiles --------------------------------------------------------------------------------
    @torch.inference_mode()
    def _forward(self, images: np.ndarray | torch.Tensor) -> Any:
        x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
        if self.device.type == "cuda" and x.device.type == "cpu":  # tiles decoded on the GPU are there
            x = (x if x.is_pinned() else x.pin_memory()).to(self.device, non_blocking=True)
        with torch.autocast(
            self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None
        ):
            return self.model(x)

    def _probs(self, outputs: Any) -> torch.Tensor:
        """Class probabilities ``(B, C, H, W)`` (``(B, C, 1, 1)``: one per tile), as the task says."""
        return self.spec.task.class_probs(outputs)

    def _points(self, outputs: Any) -> list[np.ndarray]:
        """Per tile ``(n, 4)`` ``(x, y, class, score)`` in tile px (detections, instance centroids)."""
        return self.spec.task.points(outputs)

    def predict_tiles(self, images: np.ndarray) -> TilePredictions:
        """Predictions of uint8 ``(N, H, W, 3)`` tiles, in batches of ``config.batch_size``."""
        probs, points = [], []
        for s in range(0, len(images), self.config.batch_size):
            outputs = self._forward(images[s : s + self.config.batch_size])
            if self.spec.has_map:
                probs.append(self._probs(outputs).cpu().numpy())
            else:
                points.extend(self._points(outputs))
        if self.spec.has_map:
            return TilePredictions(probs=np.concatenate(probs) if probs else None)
        return TilePredictions(points=points)

    # -- chunks -------------------------------------------------------------------------------
    def predict_chunk(
        self, slide: Slide | str, plan: GridPlan, chunk: Chunk, storage: StorageConfig | None = None
    ) -> ChunkResult:
        """Read the chunk's tiles (threads), predict them in batches, return a compact result."""
        return next(iter(self.iter_chunks(slide, plan, [chunk], storage)))

    def decodes_on_device(self, slide: Slide, plan: GridPlan) -> bool:
        """Whether tiles are read compressed and decoded where the model runs (``inference.decode``).

        ``device``: whenever the plan's pyramid level has raw tiles; ``auto``: on CUDA, when they
        are JPEG (what nvJPEG decodes). Otherwise the slide's reader decodes on CPU threads.
        """
        mode = self.config.decode
        if mode == "cpu" or (mode == "auto" and self.device.type != "cuda") or slide.level_mpps is None:
            return False
        level = select_level(slide.level_mpps, plan.tile_mpp).level
        tiles = CompressedTileReader.for_slide(slide)
        if not tiles.servable(level):
            return False
        return mode == "device" or tiles.layout(level).codec.name == "jpeg"

    def iter_chunks(
        self,
        slide: Slide | str,
        plan: GridPlan,
        chunks: Iterable[Chunk],
        storage: StorageConfig | None = None,
    ) -> Iterator[ChunkResult]:
        """Chunk results in order, while reader threads read ahead (also across chunk borders).

        ``compute_threads`` model threads take whole batches in grid order, so every thread has
        work until the last batch (also within one chunk); the caller stitches chunk ``i`` while
        they predict chunk ``i + 1``. The threads are the predictor's, kept between calls
        (``close`` stops them). A slide given by URI is opened at the plan's mpp (a slide
        without mpp metadata was planned with an override; a replica reading its tiles needs the
        same one).
        """
        if isinstance(slide, str):
            from pathray.wsi.backends.open import open_slide

            slide = open_slide(slide, storage, mpp=plan.slide_mpp)
        chunks = list(chunks)
        if not chunks:
            return
        cfg = self.config
        source: PixelSource | CompressedSource
        if self.decodes_on_device(slide, plan):
            source = CompressedSource(slide, plan, self.device)
        else:
            source = PixelSource(slide, plan, cfg.batch_size, pinned=self.device.type == "cuda")
        models, readers = self._threads()
        reader = TileReader(plan, chunks, source, readers, cfg.read_threads, cfg.read_batch, cfg.batch_size)
        states = [ChunkParts(chunk, n) for chunk, n in zip(chunks, reader.per_chunk, strict=True)]
        for state in states:
            if not state.batches:  # an empty chunk: no batch will finish it
                state.done.set_result(self._assemble(plan, state))
        workers = max(1, min(cfg.compute_threads, len(reader.todo)))
        intra = cfg.torch_threads or torch.get_num_threads()  # as the caller has it now
        work = [models.submit(self._work, plan, reader, states, intra) for _ in range(workers)]
        try:
            for state in states:
                yield state.done.result()
        finally:
            reader.close()  # the model threads take no more batches
            wait(work)

    def _work(self, plan: GridPlan, reader: TileReader, states: list[ChunkParts], intra: int) -> None:
        """One model thread: predict batches until none are left; the last batch of a chunk
        assembles its result. A failure fails every chunk not yet done.

        ``intra``: torch threads of each op. A thread takes torch's count once, when it first
        runs an op, and these threads outlive the call: two model threads that had started while
        the process was set to 2 each ran 2 OpenMP threads on 2 CPUs (0.87 of the model's speed
        against 0.92).
        """
        if torch.get_num_threads() != intra:
            torch.set_num_threads(intra)
        try:
            while (batch := reader.next_batch()) is not None:
                state = states[batch.pos]
                try:
                    self._run_batch(plan, state, batch)
                finally:
                    reader.release(batch)
                if state.add_done():
                    state.done.set_result(self._assemble(plan, state))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller through the chunks
            reader.close()
            for state in states:
                if not state.done.done():
                    state.done.set_exception(exc)

    @torch.inference_mode()
    def _run_batch(self, plan: GridPlan, state: ChunkParts, batch: Batch) -> None:
        tiles, failed, waited = batch.result()
        t0 = time.perf_counter()
        chunk, start, n = state.chunk, batch.start, batch.n
        ok = np.ones(n, bool)
        for row, _ in failed:  # undecodable tiles: predicted with the rest, then dropped
            ok[row] = False
        xs, ys = chunk.xs[start : start + n][ok], chunk.ys[start : start + n][ok]
        part = points = None
        if ok.any():
            outputs = self._forward(tiles)
            if self.spec.has_map:
                probs = self._probs(outputs)
                probs = probs if ok.all() else probs[torch.from_numpy(ok).to(probs.device)]
                part = window_means(probs, plan, xs, ys)
            if self.spec.has_points:
                found = [p for p, k in zip(self._points(outputs), ok, strict=True) if k]
                points = self._level0_points(plan, found, xs, ys)
        causes = [cause for _, cause in failed]
        state.put(start, ok, causes, part, points, waited, time.perf_counter() - t0)

    def _assemble(self, plan: GridPlan, state: ChunkParts) -> ChunkResult:
        chunk, keep = state.chunk, state.keep
        starts = sorted(state.parts)  # batches in grid order, whichever thread predicted them
        parts = [p for s in starts if (p := state.parts[s]) is not None]
        points = [p for s in starts if (p := state.points[s]) is not None]
        result = self._chunk_result(plan, chunk, parts, points, keep)
        result.failed = np.column_stack([chunk.xs[~keep], chunk.ys[~keep]]).astype(np.int64)
        causes = [c for s in starts for c in state.causes[s]]
        result.failed_cause = causes[0] if causes else ""
        result.timings = {
            "read_wait_s": state.wait,
            "predict_s": state.predict,
            "total_s": time.perf_counter() - state.started,
        }
        return result

    def _level0_points(
        self, plan: GridPlan, found: list[np.ndarray], xs: np.ndarray, ys: np.ndarray
    ) -> np.ndarray:
        """Tile-px points -> level-0 rows ``(x, y, class, score, tile key)`` that their tile owns."""
        scale = plan.extent / plan.tile_size
        counts = [len(p) for p in found]
        if not sum(counts):
            return np.zeros((0, 5))
        pts = np.concatenate(found).astype(np.float64)
        tx, ty = np.repeat(xs, counts), np.repeat(ys, counts)
        lvl0 = np.column_stack([tx + pts[:, 0] * scale, ty + pts[:, 1] * scale, pts[:, 2], pts[:, 3]])
        keep = owned(plan, lvl0, tx, ty)  # one call per batch: the plan's keys are sorted once
        keys = grid_keys(plan, tx, ty).astype(np.float64)
        return np.column_stack([lvl0, keys])[keep]

    def _chunk_result(
        self, plan: GridPlan, chunk: Chunk, parts: list[Any], points: list[np.ndarray], keep: np.ndarray
    ) -> ChunkResult:
        n = len(chunk)
        pts = (np.concatenate(points) if points else np.zeros((0, 5))) if self.spec.has_points else None
        if not self.spec.has_map:
            xs, ys = chunk.xs[keep], chunk.ys[keep]
            rows, cols, _ = map_windows(plan, xs, ys)
            hs, ws = window_counts(plan, ys, rows), window_counts(plan, xs, cols)
            return ChunkResult(chunk.index, n, rows, cols, hs, ws, points=pts)
        k = max(int(p[0].shape[-1]) for p in parts) if parts else 1
        probs = [torch.nn.functional.pad(p[0], (0, k - p[0].shape[-1], 0, k - p[0].shape[-2])) for p in parts]
        cat = torch.cat(probs).to(torch.float16).cpu().numpy() if probs else None
        rows, cols, hs, ws = (
            np.concatenate([p[i] for p in parts]) if parts else np.zeros(0, np.int64) for i in range(1, 5)
        )
        return ChunkResult(chunk.index, n, rows, cols, hs, ws, probs=cat, points=pts)
