"""Helpers for inference tests: a lossless slide of coloured blocks and models that read colours."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
import torch
from torch import nn

from pathray.wsi.annotations.classes import GLEASON_CLASSES

# Glass is white (Background); the other classes are their own saturated project colours.
PALETTE = np.array([(255, 255, 255)] + [c.color for c in GLEASON_CLASSES[1:]], np.float32)
CLASSES = [c.name for c in GLEASON_CLASSES]


def write_blocks_slide(path: Path, labels: np.ndarray, cell: int, mpp: float) -> Path:
    """A tiled, uncompressed TIFF: each ``labels`` entry is a ``cell`` x ``cell`` px block of its
    class colour; ``mpp`` in the resolution tags (both readers take the mpp from them)."""
    image = PALETTE[np.kron(labels, np.ones((cell, cell), np.int64))].astype(np.uint8)
    return write_image_slide(path, image, mpp)


def write_image_slide(path: Path, image: np.ndarray, mpp: float) -> Path:
    """``image`` (H, W, 3) uint8 as a lossless tiled TIFF with ``mpp`` in its resolution tags."""
    res = 1e4 / mpp
    tifffile.imwrite(
        path, image, tile=(128, 128), photometric="rgb", resolution=(res, res), resolutionunit="CENTIMETER"
    )
    return path


def expected_map(labels: np.ndarray, cell: int, downsample: int) -> np.ndarray:
    """The class of each class-map pixel (``downsample`` level-0 px, dividing ``cell``)."""
    return np.kron(labels, np.ones((cell // downsample, cell // downsample), np.int64)).astype(np.uint8)


class ColourSegmenter(nn.Module):
    """Per pixel: large logits for the nearest palette colour (a known function of the pixels)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()  # (B, H, W, 3)
        dist = ((x[..., None, :] - torch.from_numpy(PALETTE)) ** 2).sum(-1)  # (B, H, W, C)
        return (-dist / 10.0).permute(0, 3, 1, 2)


class ColourClassifier(nn.Module):
    """Per tile: the class whose colour covers most of the tile (ties: the lower class index)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        cls = ColourSegmenter()(images).argmax(1)  # (B, H, W)
        counts = torch.stack([(cls == k).sum((1, 2)) for k in range(len(PALETTE))], 1).float()
        onehot = torch.nn.functional.one_hot(counts.argmax(1), len(PALETTE)).float()
        return onehot * 100.0
