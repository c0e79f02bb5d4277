"""DINOv2's student and teacher: a ViT engine with a mask token, a DINO head on the class token and
an iBOT head (shared or separate) on the masked patch tokens, and the combined objective.

    model = DinoV2Model(engine, DinoHead(width, ...), ibot_head=None)   # None: the DINO head is shared
    teacher = make_teacher(model)
    out = model(global_x, local_x, masks)                     # one pass per crop size
    with torch.no_grad():
        target = teacher(global_x, None, masks, apply_masks=False)
    losses = objective(out, target, masks, progress)          # {"loss", "loss/dino", "loss/ibot", ...}

Global crops of the student see a learned mask token in place of the masked patches; the teacher
sees them whole, and its head outputs at those patches are the iBOT targets. Everything the student
computes happens inside one ``forward`` call, so DDP and FSDP see one pass per step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pathray.models.dinov2 import (
    DinoClsLoss,
    IBotPatchLoss,
    KdeLoss,
    KoLeoLoss,
    collate_masks,
)


def masked_tokens(
    backbone: nn.Module, x: Tensor, masks: Tensor | None = None, mask_token: Tensor | None = None
) -> Tensor:
    """A timm ViT's normed tokens (B, prefix + N, D), with ``mask_token`` in place of the patch
    embeddings where ``masks`` (B, N) is True: ``forward_features`` with one step added."""
    tokens = backbone.patch_embed(x)  # (B, H, W, D) with dynamic_img_size, else (B, N, D)
    if masks is not None and mask_token is not None:
        where = masks.reshape(*tokens.shape[:-1], 1)
        tokens = torch.where(where, mask_token.to(tokens.dtype), tokens)
    tokens = backbone._pos_embed(tokens)
    tokens = backbone.patch_drop(tokens)
    tokens = backbone.norm_pre(tokens)
    if getattr(backbone, "grad_checkpointing", False) and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        for block in backbone.blocks:
            tokens = checkpoint(block, tokens, use_reentrant=False)
    else:
        tokens = backbone.blocks(tokens)
    return backbone.norm(tokens)


class DinoV2Model(nn.Module):
    """A ViT engine, a DINO head on the class token, an iBOT head on masked patch tokens.

    ``forward(global_x, local_x, masks)`` -> ``{"cls": (G, D) global class tokens before the head,
    "global": (G, K), "local": (L, K) DINO head outputs, "patch": (M, K') iBOT head outputs at the
    masked patches of the global crops}`` (``patch`` only with ``masks``).
    """

    def __init__(self, engine: nn.Module, head: nn.Module, ibot_head: nn.Module | None = None) -> None:
        super().__init__()
        backbone = getattr(engine, "backbone", None)
        if backbone is None or not hasattr(backbone, "patch_embed") or not hasattr(backbone, "blocks"):
            raise ValueError(
                f"ssl.method dinov2 needs a ViT engine (foundation or debug_vit), not {type(engine).__name__}"
            )
        self.engine, self.head, self.ibot_head = engine, head, ibot_head
        self.prefix = int(getattr(backbone, "num_prefix_tokens", 1))
        self.mask_token = nn.Parameter(torch.zeros(1, backbone.num_features))

    def tokens(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        with self.engine.backbone_context():
            return masked_tokens(self.engine.backbone, x, masks, self.mask_token)

    def forward(
        self,
        global_x: Tensor,
        local_x: Tensor | None = None,
        masks: Tensor | None = None,
        apply_masks: bool = True,
    ) -> dict[str, Tensor]:
        glob = self.tokens(global_x, masks if apply_masks else None)
        cls = [glob[:, 0]]
        if local_x is not None:
            cls.append(self.tokens(local_x)[:, 0])
        projected = self.head(torch.cat(cls))
        out = {"cls": cls[0], "global": projected[: len(global_x)], "local": projected[len(global_x) :]}
        if masks is not None:
            patches = glob[:, self.prefix :][masks]
            out["patch"] = (self.ibot_head or self.head)(patches)
        return out


class DinoV2Objective(nn.Module):
    """DINO on class tokens + iBOT on masked patches + KoLeo or KDE on the student's global class
    tokens, with centring by running mean or Sinkhorn–Knopp. Holds the centres (checkpointed)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        c = config
        self.dino = DinoClsLoss(c.out_dim, c.student_temp, c.center_momentum, c.centring)
        patch_dim = c.ibot_out_dim if c.ibot_separate_head else c.out_dim
        self.ibot = IBotPatchLoss(patch_dim, c.student_temp, c.center_momentum, c.centring)
        self.koleo = KoLeoLoss()
        self.kde = KdeLoss(c.kde_kappa)

    def forward(
        self,
        student: dict[str, Tensor],
        teacher: dict[str, Tensor],
        masks: dict[str, Any],
        temp: float,
        n_global: int,
        n_local: int = 0,
    ) -> dict[str, Tensor]:
        """``{"loss": weighted total, "loss/dino", "loss/ibot", "loss/koleo" or "loss/kde"}`` for
        ``n_global`` global and ``n_local`` local crops (each the same batch of tiles)."""
        c = self.config
        s_views = list(student["global"].chunk(n_global))
        if n_local:
            s_views += list(student["local"].chunk(n_local))
        t_views = list(teacher["global"].float().chunk(n_global))
        parts: dict[str, Tensor] = {"loss/dino": self.dino(s_views, t_views, temp)}
        total = c.dino_weight * parts["loss/dino"]
        if "patch" in student and c.ibot_weight > 0 and len(student["patch"]):
            parts["loss/ibot"] = self.ibot(
                student["patch"],
                teacher["patch"].float(),
                masks["masks"],
                temp,
                masks_weight=masks["masks_weight"],
            )
            total = total + c.ibot_weight * parts["loss/ibot"]
        cls = [t.float() for t in student["cls"].chunk(n_global)]
        if c.regulariser == "koleo" and c.koleo_weight > 0:
            parts["loss/koleo"] = sum(self.koleo(t) for t in cls) / len(cls)
            total = total + c.koleo_weight * parts["loss/koleo"]
        elif c.regulariser == "kde" and c.kde_weight > 0:
            parts["loss/kde"] = sum(self.kde(t) for t in cls) / len(cls)
            total = total + c.kde_weight * parts["loss/kde"]
        return {"loss": total, **parts}


def step_masks(
    batch_size: int, grid: tuple[int, int], config: Any, rng: np.random.Generator, device: Any
) -> dict[str, Any]:
    """Block masks for ``batch_size`` global crops (``collate_masks``), as tensors on ``device``."""
    masks = collate_masks(
        batch_size,
        grid,
        mask_probability=config.mask_probability,
        ratio_min_max=tuple(config.mask_ratio),
        rng=rng,
    )
    return {"masks": masks["masks"].to(device), "masks_weight": masks["masks_weight"].to(device)}
