"""The model deployment: multiplexed predictors; a chunk's tiles are read here and batched across chunks.

Each request is one chunk of a slide's grid. The replica opens the slide itself and reads the
chunk's tiles (threads), so pixels never cross processes; what goes back is a compact
``ChunkResult``. Tile batches of chunks that run at the same time in one replica meet in one
``@serve.batch`` forward pass (up to ``max_batch_tiles`` tiles), which keeps a GPU busy.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import numpy as np
from ray import serve

from pathray.heap import keep_freed_memory
from pathray.lru import LruCache
from pathray.serving.config import ServeAppConfig
from pathray.serving.store import ModelStore


class _BatchedModel:
    """Stands in for a predictor's model: each forward call joins the replica's shared batch."""

    def __init__(self, submit: Any, real: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.submit, self.real, self.loop = submit, real, loop

    def to(self, *_: Any, **__: Any) -> _BatchedModel:
        return self

    def eval(self) -> _BatchedModel:
        return self

    def __call__(self, x: Any) -> Any:
        images = x.cpu().numpy() if hasattr(x, "cpu") else np.asarray(x)
        return asyncio.run_coroutine_threadsafe(self.submit((self.real, images)), self.loop).result()


def _forward(real: Any, images: np.ndarray) -> Any:
    """One forward pass of the real predictor's model on its device and precision; CPU float32 out."""
    import torch

    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(images)).to(real.device)
        dtype = real.dtype or torch.float32
        with torch.autocast(real.device.type, dtype=dtype, enabled=real.dtype is not None):
            out = real.model(x)
        return out.float().cpu()


@serve.deployment(name="ModelServer")
class ModelServer:
    """Predicts chunks with the model the request names (``multiplexed_model_id``).

    Args:
        config: the app config (model store, storage, inference and batching settings).
    """

    def __init__(self, config: ServeAppConfig) -> None:
        import torch

        self.config = config
        section = config.serve.model
        torch.set_num_threads(section.torch_threads or max(1, int(section.num_cpus or 1)))
        if config.inference.keep_freed_memory:  # the replica's process is there to predict
            keep_freed_memory()
        self.store = ModelStore(config.serve.models, config.storage)
        self._embedders: LruCache[str, Any] = LruCache(section.max_models_per_replica)  # id -> TileEmbedder

        async def load(model_id: str) -> Any:
            return await asyncio.to_thread(self._load, model_id)

        async def forward_batch(items: list[tuple[Any, np.ndarray]]) -> list[Any]:
            return await asyncio.to_thread(self._forward_items, items)

        self._get_model = serve.multiplexed(max_num_models_per_replica=section.max_models_per_replica)(load)
        self._forward_batch = serve.batch(
            max_batch_size=section.max_batch_tiles,
            batch_wait_timeout_s=section.batch_wait_timeout_s,
            batch_size_fn=lambda items: sum(len(images) for _, images in items),
        )(forward_batch)

    def _load(self, model_id: str) -> Any:
        from pathray.inference.predictor import Predictor

        return Predictor.from_package(
            self.store.uri_for(model_id), self.config.storage, self.config.inference
        )

    @staticmethod
    def _forward_items(items: list[tuple[Any, np.ndarray]]) -> list[Any]:
        """Run items model by model, each model's tiles in one pass; split outputs back per item."""
        import torch

        outputs: list[Any] = [None] * len(items)
        for real in {id(r): r for r, _ in items}.values():
            idx = [i for i, (r, _) in enumerate(items) if r is real]
            images = np.concatenate([items[i][1] for i in idx])
            out = _forward(real, images)
            if not isinstance(out, torch.Tensor):  # structured outputs: no split, one pass per item
                for i in idx:
                    outputs[i] = _forward(real, items[i][1])
                continue
            start = 0
            for i in idx:
                n = len(items[i][1])
                outputs[i] = out[start : start + n]
                start += n
        return outputs

    async def _predictor(self) -> Any:
        return await self._get_model(serve.get_multiplexed_model_id())

    async def predict_chunk(self, plan: Any, chunk: Any) -> Any:
        """Read ``chunk``'s tiles of ``plan.slide_uri``, predict them, return a compact ChunkResult."""
        from pathray.inference.config import InferenceConfig
        from pathray.inference.predictor import Predictor

        real = await self._predictor()
        front_cfg = real.config.model_copy(update={"device": "cpu", "precision": "fp32"})
        assert isinstance(front_cfg, InferenceConfig)
        front = Predictor(
            _BatchedModel(self._forward_batch, real, asyncio.get_running_loop()),  # type: ignore[arg-type]
            real.spec,
            front_cfg,
        )

        def run() -> Any:
            with front:  # its threads are this request's
                return front.predict_chunk(plan.slide_uri, plan, chunk, self.config.storage)

        return await asyncio.to_thread(run)

    def _embedder(self, model_id: str) -> Any:
        """The model's frozen embedder (``load_embedder`` of its package, so the weights digest is the
        one ``pathray embed`` records), kept in a small LRU beside the predictors."""
        from pathray.inference.embedder import load_embedder

        inference = self.config.inference
        return self._embedders.get_or_make(
            model_id,
            lambda: load_embedder(
                self.store.uri_for(model_id), None, self.config.storage, inference.device, inference.precision
            ),
        )

    async def embed_tiles(
        self,
        uri: str,
        slide_mpp: float | None,
        xs: np.ndarray,
        ys: np.ndarray,
        tile_size: int,
        tile_mpp: float,
    ) -> dict[str, Any]:
        """Read these tiles of ``uri`` here and embed them with the request's model (batched with
        the replica's other work); returns float16 ``embedding`` rows, an ``ok`` mask (undecodable
        tiles: False, zeros), the first ``error`` and the model's ``source``."""
        from dataclasses import asdict

        model_id = serve.get_multiplexed_model_id()
        embedder = await asyncio.to_thread(self._embedder, model_id)
        loop = asyncio.get_running_loop()

        def run() -> dict[str, Any]:
            from pathray.inference.reader import read_tolerant
            from pathray.wsi.backends.open import open_slide

            slide = open_slide(uri, self.config.storage, mpp=slide_mpp)
            coords = [(int(x), int(y)) for x, y in zip(xs, ys, strict=True)]
            tiles, failed, singles = read_tolerant(lambda c: slide.read_batch(c, tile_size, tile_mpp), coords)
            ok = np.ones(len(coords), bool)
            ok[np.array([k for k, _ in failed], dtype=np.int64)] = False
            out = np.zeros((len(coords), embedder.embed_dim), np.float16)
            if ok.any():
                images = (
                    np.asarray(tiles)
                    if tiles is not None
                    else np.stack([singles[k] for k in np.flatnonzero(ok)])
                )
                step = self.config.serve.model.max_batch_tiles
                for s in range(0, len(images), step):
                    batch = np.ascontiguousarray(images[s : s + step])
                    vec = asyncio.run_coroutine_threadsafe(
                        self._forward_batch((embedder, batch)), loop
                    ).result()
                    rows = np.flatnonzero(ok)[s : s + step]
                    out[rows] = vec.numpy().astype(np.float16)
            return {
                "embedding": out,
                "ok": ok,
                "error": failed[0][1] if failed else "",
                "source": asdict(embedder.source),
            }

        return await asyncio.to_thread(run)

    def pid(self) -> int:
        """This replica's process id (tests kill replicas by it)."""
        return os.getpid()
