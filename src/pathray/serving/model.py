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
        self.store = ModelStore(config.serve.models, config.storage)

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
        return await asyncio.to_thread(front.predict_chunk, plan.slide_uri, plan, chunk, self.config.storage)

    def pid(self) -> int:
        """This replica's process id (tests kill replicas by it)."""
        return os.getpid()
