"""Embeddings: a backbone's pooled features, nothing trained on top. What an SSL run exports (its
teacher backbone) and what embedding a cohort runs; ``engine.weights`` of a fine-tuning project
loads such a package's backbone like any checkpoint."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from pathray.models.tasks.base import TaskConfigBase, TaskSpec
from pathray.registry import TASKS

if TYPE_CHECKING:
    from torch import Tensor, nn

    from pathray.models.metrics import EmbeddingMetric


class EmbeddingConfig(TaskConfigBase):
    """No head, no loss: the engine's pooled embedding is the output."""

    name: Literal["embedding"] = "embedding"


@TASKS.register("embedding")
class EmbeddingTask(TaskSpec):
    """Outputs are ``(B, embed_dim)`` pooled embeddings (the engine's pooling: CLS, or CLS + mean)."""

    config_type = EmbeddingConfig
    score = "rankme"
    config: EmbeddingConfig

    def build_head(self, embed_dim: int, dense_channels: int) -> nn.Module:
        from pathray.models.heads import EmbeddingHead

        return EmbeddingHead()

    def loss(self, outputs: Any, batch: dict[str, Any], progress: float = 0.0) -> Tensor:
        raise ValueError("an embedding package is not trained as it is: fine-tune it with engine.weights")

    def metrics(self) -> EmbeddingMetric:
        from pathray.models.metrics import EmbeddingMetric

        return EmbeddingMetric()

    def predict(self, outputs: Any, batch: dict[str, Any] | None = None) -> np.ndarray:
        """``(B, embed_dim)`` float32 embeddings."""
        return outputs.detach().float().cpu().numpy()
