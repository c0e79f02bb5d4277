"""The ``foundation`` engine: a timm ViT whose patch tokens are upsampled to a stride-4 dense map."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pathray.models.config import EngineConfig
from pathray.models.engine import Engine, conv_norm_act, create_backbone
from pathray.models.foundation import build_backbone, pool_tokens, resample_pos_embed, to_preset_layout
from pathray.models.presets import FoundationPreset

# Backbone parameters after the last block: they take the full backbone lr.
_TOP = ("norm.", "fc_norm.", "head", "attn_pool.")


class TokenDecoder(nn.Module):
    """Patch-token grid at stride ``patch`` -> stride 4: a 1x1 projection, x2 upsampling blocks,
    and a bilinear resize where the patch is not 4 times a power of two (e.g. 14 px)."""

    def __init__(self, in_channels: int, channels: int, patch: int) -> None:
        super().__init__()
        steps = max(0, round(math.log2(patch / 4)))
        self.proj = conv_norm_act(in_channels, 2 * channels, kernel=1)
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
    """A timm ViT: a foundation preset (``config.preset``), else ``config.model`` or ``default_model``.

    pooled = the preset's (or ``config.pooling``'s) recipe over the normed tokens (CLS, or CLS + mean
    of the patch tokens), else the model's own pooled output (CLS for ``global_pool="token"``);
    dense = patch tokens (prefix tokens dropped) of the last block, or of ``config.decoder_blocks``
    concatenated, through ``TokenDecoder``.

    A preset's backbone comes from ``foundation.build_backbone`` with its weights loaded strictly
    (its published layouts, and the timm layout of pathray's own checkpoints). Built with
    ``dynamic_img_size=True``, so inputs other than ``img_size`` work by interpolating the position
    embedding; sizes that are not a multiple of the patch are zero-padded bottom/right and the dense
    map cropped back. LR decay: patch/pos embeddings are layer 0, block ``i`` is layer ``i + 1``,
    the final norm is layer ``depth + 1``.
    """

    def __init__(
        self, config: EngineConfig, default_model: str = "vit_small_patch16_224", **model_kwargs: Any
    ) -> None:
        preset = engine_preset(config)
        if preset is not None:
            backbone = build_backbone(preset, config.weights or None, config.allow_partial)
            normalisation: tuple[Any, Any] | None = (preset.mean, preset.std)
            pooling: str | None = preset.pooling
        else:
            size = {"img_size": config.img_size} if config.img_size else {}
            optional = {"dynamic_img_size": True}
            backbone = create_backbone(config, default_model, optional, num_classes=0, **size, **model_kwargs)
            normalisation, pooling = None, config.pooling
        width = backbone.num_features
        super().__init__(
            config,
            backbone,
            embed_dim=width * (2 if pooling == "cls+mean" else 1),
            normalisation=normalisation,
            weights_loaded=preset is not None,
        )
        self.preset = preset
        self.pooling = pooling
        self.num_layers = len(backbone.blocks) + 1
        self.num_prefix_tokens = int(getattr(backbone, "num_prefix_tokens", 1))
        self.patch_size = tuple(backbone.patch_embed.patch_size)
        self.decoder_blocks = _block_indices(config.decoder_blocks, len(backbone.blocks))
        inputs = width * max(1, len(self.decoder_blocks))
        self.decoder = TokenDecoder(inputs, config.dense_channels, max(self.patch_size))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % self.patch_size[0], -width % self.patch_size[1]
        if pad_h or pad_w:  # bottom/right zero (= mean colour) padding keeps the dense map aligned
            x = F.pad(x, (0, pad_w, 0, pad_h))
        grid_h, grid_w = x.shape[-2] // self.patch_size[0], x.shape[-1] // self.patch_size[1]
        with self.backbone_context():
            if self.decoder_blocks:
                tokens, grids = self.backbone.forward_intermediates(
                    x, indices=self.decoder_blocks, norm=True, output_fmt="NCHW"
                )
                grid = torch.cat(grids, dim=1)
            else:
                tokens = self.backbone.forward_features(x)
                grid = self._patch_grid(tokens, grid_h, grid_w, (height, width))
            if self.pooling:
                pooled = pool_tokens(tokens, self.pooling, self.num_prefix_tokens)
            else:
                pooled = self.backbone.forward_head(tokens, pre_logits=True)
        size = (x.shape[-2] // self.dense_stride, x.shape[-1] // self.dense_stride)
        dense = self.decoder(grid, size)[..., : height // self.dense_stride, : width // self.dense_stride]
        return pooled, dense

    def pooled(self, x: Tensor) -> Tensor:
        """``forward(x)[0]`` from the final tokens alone: no intermediate blocks, no decoder."""
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % self.patch_size[0], -width % self.patch_size[1]
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        with self.backbone_context():
            tokens = self.backbone.forward_features(x)
            if self.pooling:
                return pool_tokens(tokens, self.pooling, self.num_prefix_tokens)
            return self.backbone.forward_head(tokens, pre_logits=True)

    def _patch_grid(self, tokens: Tensor, grid_h: int, grid_w: int, size: tuple[int, int]) -> Tensor:
        patches = tokens[:, self.num_prefix_tokens :]
        if patches.shape[1] != grid_h * grid_w:
            raise ValueError(
                f"{patches.shape[1]} patch tokens for a {grid_h}x{grid_w} grid ({size[0]}x{size[1]} px)"
            )
        return patches.transpose(1, 2).reshape(tokens.shape[0], -1, grid_h, grid_w)

    def layer_id(self, name: str) -> int:
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        if name.startswith(_TOP):
            return self.num_layers
        return 0  # cls/reg tokens, pos_embed, patch_embed, norm_pre

    def adapt_state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A checkpoint in a layout the preset accepts converted to timm keys; the position embedding
        of a checkpoint trained at another image size resampled."""
        preset = getattr(self, "preset", None)  # None while Engine.__init__ loads a non-preset checkpoint
        if preset is not None:
            return to_preset_layout(preset, self.backbone, state)
        return resample_pos_embed(self.backbone, state)


def engine_preset(config: EngineConfig) -> FoundationPreset | None:
    """The engine's preset as built: the config's overrides, ``engine.img_size`` and ``drop_path``
    over the preset's own kwargs (``engine.model_kwargs`` wins over both), and the timm layout of
    pathray's own checkpoints (a DINO teacher, a fine-tuned backbone) accepted besides the published
    ones."""
    preset = config.resolved_preset()
    if preset is None:
        return None
    extra: dict[str, Any] = {"img_size": config.img_size} if config.img_size else {}
    extra |= {"drop_path_rate": config.drop_path} if config.drop_path else {}
    return preset.replace(
        model_kwargs={**extra, **config.model_kwargs}, layouts=tuple(dict.fromkeys((*preset.layouts, "timm")))
    )


def _block_indices(blocks: list[int] | None, depth: int) -> list[int]:
    """``config.decoder_blocks`` as block indices in ``[0, depth)`` (negative ones count from the end)."""
    if not blocks:
        return []
    bad = [b for b in blocks if not -depth <= b < depth]
    if bad:
        raise ValueError(f"decoder_blocks {bad} are not blocks of this {depth}-block ViT")
    return sorted({b % depth for b in blocks})
