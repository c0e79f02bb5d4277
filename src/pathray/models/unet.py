"""The ``cnn`` engine: a timm CNN encoder (``features_only``) with a U-Net decoder to stride 4."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pathray.models.config import EngineConfig
from pathray.models.engine import Engine, conv_norm_act, create_backbone


class UNetDecoder(nn.Module):
    """Deepest feature -> stride 4: upsample, concatenate the skip, two 3x3 convs, per level.

    ``in_channels`` run shallow to deep (strides 4, 8, 16, 32 for a ResNet); the stride-4 level
    has ``channels``, each deeper one twice as many, capped at its skip's width (not below ``channels``).
    """

    def __init__(self, in_channels: list[int], channels: int) -> None:
        super().__init__()
        skips = in_channels[:-1][::-1]  # deep to shallow
        doubling = [channels * 2 ** (len(skips) - 1 - i) for i in range(len(skips))]
        widths = [max(channels, min(w, skip)) for w, skip in zip(doubling, skips, strict=True)] or [channels]
        self.center = conv_norm_act(in_channels[-1], widths[0], kernel=1)
        cins = [widths[0]] + widths[:-1]
        self.blocks = nn.ModuleList(
            nn.Sequential(conv_norm_act(cin + skip, width), conv_norm_act(width, width))
            for cin, skip, width in zip(cins, skips, widths, strict=True)
        )
        self.out = conv_norm_act(widths[-1], channels, kernel=1)

    def forward(self, features: list[Tensor], size: tuple[int, int]) -> Tensor:
        x = self.center(features[-1])
        for block, skip in zip(self.blocks, features[:-1][::-1], strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.out(x)


class CNNEngine(Engine):
    """A timm CNN (``config.model``, else ``default_model``; random init by default) + ``UNetDecoder``
    over its stride >= 4 features;
    pooled = global average of the deepest feature map.

    LR decay counts encoder stages: the modules up to the first feature (the stem) are stage 0,
    the module giving feature ``i`` ends stage ``i``; the deepest stage gets ``lr * layer_decay``.
    Models whose features come from hooks rather than top-level modules get no decay.
    """

    def __init__(self, config: EngineConfig, default_model: str = "resnet50", **model_kwargs: Any) -> None:
        backbone = create_backbone(config, default_model, optional={}, features_only=True, **model_kwargs)
        info = backbone.feature_info
        keep = [i for i, r in enumerate(info.reduction()) if r >= self.dense_stride]
        channels = [info.channels()[i] for i in keep]
        super().__init__(config, backbone, embed_dim=channels[-1])
        self.keep = keep
        self._stages = self._stage_of_children(backbone, info.module_name())
        self.num_layers = len(info.module_name())
        self.decoder = UNetDecoder(channels, config.dense_channels)

    @staticmethod
    def _stage_of_children(backbone: nn.Module, feature_modules: list[str]) -> dict[str, int]:
        ends = {name.replace(".", "_") for name in feature_modules}
        stages, stage = {}, 0
        for name, _ in backbone.named_children():
            stages[name] = stage
            if name in ends:
                stage += 1
        return stages

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        height, width = x.shape[-2:]
        with self.backbone_context():
            features = self.backbone(x)
        features = [features[i] for i in self.keep]
        pooled = features[-1].mean(dim=(2, 3))
        dense = self.decoder(features, (height // self.dense_stride, width // self.dense_stride))
        return pooled, dense

    def pooled(self, x: Tensor) -> Tensor:
        """``forward(x)[0]`` without the U-Net decoder."""
        with self.backbone_context():
            return self.backbone(x)[self.keep[-1]].mean(dim=(2, 3))

    def layer_id(self, name: str) -> int:
        return self._stages.get(name.split(".")[0], self.num_layers)

    def adapt_state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Map a full model's ``stages.0.x`` keys to the feature wrapper's flattened ``stages_0.x``."""
        own = self.backbone.state_dict()
        return {
            (k.replace(".", "_", 1) if k not in own and k.replace(".", "_", 1) in own else k): v
            for k, v in state.items()
        }
