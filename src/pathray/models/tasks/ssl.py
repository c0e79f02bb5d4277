"""Self-supervised pretraining (DINO): a student learns the EMA teacher's view of multi-crop views."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from pathray.models.tasks.base import TaskConfigBase, TaskSpec
from pathray.registry import TASKS

if TYPE_CHECKING:
    from torch import Tensor, nn

    from pathray.models.metrics import EmbeddingMetric


class SslConfig(TaskConfigBase):
    """DINO or DINOv2: the projection heads, temperatures, centring, masking, regulariser and
    teacher momentum. DINOv2's own values: out_dim 65536, head_hidden 2048, head_bottleneck 256,
    teacher_temp 0.07 (warm-up from 0.04), ema_momentum 0.992, centring sinkhorn."""

    name: Literal["ssl"] = "ssl"
    method: Literal["dino", "dinov2"] = Field(
        "dino", description="dino: DINO on class tokens; dinov2: + iBOT masked patches, KoLeo or KDE"
    )
    out_dim: int = Field(4096, ge=2, description="prototypes of the projection head")
    head_hidden: int = 512
    head_bottleneck: int = 128
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_epochs_frac: float = Field(0.3, ge=0, le=1, description="fraction of training")
    center_momentum: float = 0.9
    ema_momentum: float = Field(0.996, description="teacher EMA momentum at the start (cosine to 1)")
    # DINOv2 only (method: dinov2)
    centring: Literal["mean", "sinkhorn"] = Field(
        "sinkhorn", description="dinov2: teacher centring, by running mean or Sinkhorn-Knopp (3 iterations)"
    )
    dino_weight: float = Field(1.0, ge=0, description="dinov2: weight of the DINO class-token loss")
    ibot_weight: float = Field(1.0, ge=0, description="dinov2: weight of the iBOT masked-patch loss")
    ibot_separate_head: bool = Field(False, description="dinov2: an iBOT head of its own, else the DINO head")
    ibot_out_dim: int = Field(4096, ge=2, description="dinov2: prototypes of a separate iBOT head")
    mask_probability: float = Field(0.5, ge=0, le=1, description="dinov2: share of global crops masked")
    mask_ratio: tuple[float, float] = Field(
        (0.1, 0.5), description="dinov2: masked share of the patches, spread over this range across the batch"
    )
    regulariser: Literal["koleo", "kde", "none"] = Field(
        "koleo", description="dinov2: KoLeo (DINOv2) or KDE (Midnight) on the student's class tokens"
    )
    koleo_weight: float = Field(0.1, ge=0)
    kde_weight: float = Field(0.05, ge=0, description="OpenMidnight's weight")
    kde_kappa: float = Field(5.0, gt=0, description="concentration of the KDE kernel (OpenMidnight: 5)")
    freeze_last_layer_steps: int = Field(
        0, ge=0, description="dinov2: the heads' last layers stay frozen this many steps (DINOv2: 1 epoch)"
    )
    collapse_fraction: float = Field(
        0.5, ge=0, le=1, description="warn of collapse when RankMe falls below this share of its peak"
    )


@TASKS.register("ssl")
class SslTask(TaskSpec):
    """DINO: the stream delivers multi-crop views; outputs are ``dino_forward``'s dict; the loss keeps
    its centre as state (checkpointed beside the model)."""

    config_type = SslConfig
    views = True
    score = "rankme"
    config: SslConfig

    def __init__(self, config: SslConfig) -> None:
        super().__init__(config)
        self._criterion: Any = None

    @property  # type: ignore[override]
    def learner(self) -> str:  # type: ignore[override]
        """``dino`` or ``dinov2``: the training learner of ``method``."""
        return self.config.method

    @property
    def criterion(self) -> Any:
        """The DINO loss module (made on first use: it holds the centre)."""
        if self._criterion is None:
            from pathray.models.dino import DinoLoss

            self._criterion = DinoLoss(self.config)
        return self._criterion

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config, "_criterion": None}

    def build_head(self, embed_dim: int, dense_channels: int) -> nn.Module:
        from pathray.models.dino import DinoHead

        c = self.config
        return DinoHead(embed_dim, c.out_dim, c.head_hidden, c.head_bottleneck)

    def loss(self, outputs: dict[str, Any], batch: dict[str, Any], progress: float = 0.0) -> Tensor:
        return self.criterion(outputs["student"], outputs["teacher"], progress)

    def teacher_momentum(self, progress: float) -> float:
        from pathray.models.dino import cosine_momentum

        return cosine_momentum(progress, self.config.ema_momentum)

    def metrics(self) -> EmbeddingMetric:
        from pathray.models.metrics import EmbeddingMetric

        return EmbeddingMetric()

    def predict(self, outputs: dict[str, Any], batch: dict[str, Any] | None = None) -> np.ndarray:
        """``(B, embed_dim)`` float32 teacher embeddings of the first global view."""
        return outputs["embedding"].detach().float().cpu().numpy()

    def state_dict(self) -> dict[str, Any]:
        return {"center": self.criterion.center.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.criterion.center = state["center"].clone().to(self.criterion.center.device)
