"""Task heads and the losses and metrics they share: per-pixel and per-tile read-outs on any engine.

Every head takes ``pooled (B, embed_dim)``, ``dense (B, dense_channels, H/4, W/4)`` and the tile
size, so every task runs on every engine.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pathray.models.metrics import (
    CountAccumulator,
    class_report,
    confusion_matrix,
    foreground_dice,
)


class ConvHead(nn.Module):
    """Per-pixel outputs from the dense features, upsampled bilinearly to the tile size.

    ``hidden=0``: one 1x1 conv (a linear read-out); else a 3x3 conv + ReLU before it, for
    outputs (heatmaps, distances) that need a little spatial context of their own.
    """

    def __init__(self, dense_channels: int, out_channels: int, hidden: int = 0) -> None:
        super().__init__()
        if hidden:
            self.net: nn.Module = nn.Sequential(
                nn.Conv2d(dense_channels, hidden, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(hidden, out_channels, 1),
            )
        else:
            self.net = nn.Conv2d(dense_channels, out_channels, 1)

    def forward(self, pooled: Tensor | None, dense: Tensor, out_hw: tuple[int, int]) -> Tensor:
        out = self.net(dense)
        if tuple(out.shape[-2:]) != tuple(out_hw):
            # A few output channels upsample faster in NCHW than channels-last (a CNN's layout),
            # and the softmax after it then needs no copy: 2.7 ms of 8.4 a 32-tile batch (5 classes).
            out = F.interpolate(out.contiguous(), size=tuple(out_hw), mode="bilinear", align_corners=False)
        return out


class LinearHead(nn.Module):
    """Class logits from the pooled embedding."""

    def __init__(self, embed_dim: int, out_features: int) -> None:
        super().__init__()
        self.fc = nn.Linear(embed_dim, out_features)

    def forward(self, pooled: Tensor, dense: Tensor | None = None, out_hw: Any = None) -> Tensor:
        return self.fc(pooled)


class EmbeddingHead(nn.Module):
    """No parameters: the engine's pooled embedding is the output (an embedding package's head)."""

    def forward(self, pooled: Tensor, dense: Tensor | None = None, out_hw: Any = None) -> Tensor:
        return pooled


class ConfusionMetric(CountAccumulator):
    """A confusion matrix over argmax predictions (pixels or tiles) and the scores read from it."""

    def __init__(self, classes: list[str], exclude: tuple[int, ...] = (), dice: bool = False) -> None:
        n = len(classes)
        super().__init__(confusion=np.zeros((n, n)))
        self.classes, self.exclude, self.dice = classes, exclude, dice

    @torch.no_grad()
    def update(self, outputs: Tensor, batch: dict[str, Any]) -> None:
        target = batch["target"].to(outputs.device)
        self.add(confusion=confusion_matrix(target, outputs.argmax(1), len(self.classes)))

    def compute(self) -> dict[str, float]:
        cm = self.counts["confusion"]
        out = class_report(cm, self.classes, self.exclude)
        if self.dice:
            out["dice"] = foreground_dice(cm)
        return out


def soft_dice_loss(logits: Tensor, target: Tensor, eps: float = 1.0) -> Tensor:
    """``1 - mean_c Dice_c`` of the softmax against one-hot targets, summed over the batch."""
    probs = logits.float().softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    dice = (2 * inter + eps) / (probs.sum(dims) + onehot.sum(dims) + eps)
    return 1 - dice.mean()
