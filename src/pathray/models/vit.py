"""The ``foundation`` engine: a timm ViT whose patch tokens are upsampled to a stride-4 dense map."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from pathray.models.config import EngineConfig
from pathray.models.engine import Engine, conv_norm_act, create_backbone
from pathray.models.timm_compat import import_timm

log = logging.getLogger(__name__)

# Backbone parameters after the last block: they take the full backbone lr.
_TOP = ("norm.", "fc_norm.", "head", "attn_pool.")


class TokenDecoder(nn.Module):
    """Patch-token grid at stride ``patch`` -> stride 4: a 1x1 projection, x2 upsampling blocks,
    and a bilinear resize where the patch is not 4 times a power of two (e.g. 14 px)."""

    def __init__(self, embed_dim: int, channels: int, patch: int) -> None:
        super().__init__()
        steps = max(0, round(math.log2(patch / 4)))
        self.proj = conv_norm_act(embed_dim, 2 * channels, kernel=1)
        widths = [2 * channels] + [channels] * steps
        self.up = nn.ModuleList(
            conv_norm_act(cin, cout) for cin, cout in zip(widths, widths[1:], strict=False)
        )
        self.out = conv_norm_act(widths[-1], channels)

    def forward(self, grid: Tensor, size: tuple[int, int]) -> Tensor:
        x = self.proj(grid)
        for block in self.up:
            x = block(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False))
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.out(x)


class ViTEngine(Engine):
    """A timm ViT (``config.model``, else ``default_model``): pooled = the model's pooled output (CLS token
    for ``global_pool="token"``), dense = patch tokens (prefix tokens dropped) through ``TokenDecoder``.

    Built with ``dynamic_img_size=True``, so inputs other than ``img_size`` work by interpolating
    the position embedding; sizes that are not a multiple of the patch are zero-padded
    bottom/right and the dense map cropped back. LR decay: patch/pos embeddings are layer 0,
    block ``i`` is layer ``i + 1``, the final norm is layer ``depth + 1``.
    """

    def __init__(
        self, config: EngineConfig, default_model: str = "vit_small_patch16_224", **model_kwargs: Any
    ) -> None:
        size = {"img_size": config.img_size} if config.img_size else {}
        backbone = create_backbone(
            config, default_model, optional={"dynamic_img_size": True}, num_classes=0, **size, **model_kwargs
        )
        super().__init__(config, backbone, embed_dim=backbone.num_features)
        self.num_layers = len(backbone.blocks) + 1
        self.num_prefix_tokens = int(getattr(backbone, "num_prefix_tokens", 1))
        self.patch_size = tuple(backbone.patch_embed.patch_size)
        self.decoder = TokenDecoder(backbone.num_features, config.dense_channels, max(self.patch_size))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % self.patch_size[0], -width % self.patch_size[1]
        if pad_h or pad_w:  # bottom/right zero (= mean colour) padding keeps the dense map aligned
            x = F.pad(x, (0, pad_w, 0, pad_h))
        with self.backbone_context():
            tokens = self.backbone.forward_features(x)
            pooled = self.backbone.forward_head(tokens, pre_logits=True)
        patches = tokens[:, self.num_prefix_tokens :]
        grid_h, grid_w = x.shape[-2] // self.patch_size[0], x.shape[-1] // self.patch_size[1]
        if patches.shape[1] != grid_h * grid_w:
            raise ValueError(
                f"{patches.shape[1]} patch tokens for a {grid_h}x{grid_w} grid ({height}x{width} px)"
            )
        grid = patches.transpose(1, 2).reshape(x.shape[0], -1, grid_h, grid_w)
        size = (x.shape[-2] // self.dense_stride, x.shape[-1] // self.dense_stride)
        dense = self.decoder(grid, size)[..., : height // self.dense_stride, : width // self.dense_stride]
        return pooled, dense

    def layer_id(self, name: str) -> int:
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        if name.startswith(_TOP):
            return self.num_layers
        return 0  # cls/reg tokens, pos_embed, patch_embed, norm_pre

    def adapt_state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Resample a checkpoint's position embedding trained at another image size."""
        posemb, own = state.get("pos_embed"), getattr(self.backbone, "pos_embed", None)
        if posemb is None or own is None or posemb.shape == own.shape or posemb.shape[-1] != own.shape[-1]:
            return state
        timm = import_timm()
        no_embed_class = getattr(self.backbone, "no_embed_class", False)  # runs before __init__ ends
        prefix = 0 if no_embed_class else int(getattr(self.backbone, "num_prefix_tokens", 1))
        resampled = timm.layers.resample_abs_pos_embed(
            posemb, new_size=list(self.backbone.patch_embed.grid_size), num_prefix_tokens=prefix
        )
        log.info("resampled pos_embed %s -> %s", tuple(posemb.shape), tuple(resampled.shape))
        return {**state, "pos_embed": resampled}
