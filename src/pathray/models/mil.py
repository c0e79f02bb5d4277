"""Slide-level models on bags of tile embeddings: gated-attention ABMIL and a mean-pool baseline.

    model = build_mil_model("abmil", in_dim=768, n_classes=4)
    out = model(bags, mask)           # bags (B, N, D) float, mask (B, N) bool: True = a real tile
    out.logits                        # (B, C)
    out.attention                     # (B, N): per bag, sums to 1 over its real tiles

Bags of different sizes are padded to a common ``N`` and masked: padding never gets attention and
never changes a bag's output. Each model carries the embedding mean and std of the slides it was
fitted on (``set_input_stats``), so a saved model standardises its input the same way wherever it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pathray.registry import MIL_MODELS


@dataclass
class MILOutput:
    """Slide logits ``(B, C)`` and each tile's weight in its slide ``(B, N)`` (zero on padding)."""

    logits: Tensor
    attention: Tensor


def pad_bags(bags: list[Tensor]) -> tuple[Tensor, Tensor]:
    """``(B, N_max, D)`` zero-padded bags and their ``(B, N_max)`` mask (True: a real tile)."""
    if not bags:
        raise ValueError("no bags to pad")
    n = max(len(b) for b in bags)
    x = bags[0].new_zeros(len(bags), n, bags[0].shape[-1])
    mask = torch.zeros(len(bags), n, dtype=torch.bool, device=bags[0].device)
    for i, bag in enumerate(bags):
        x[i, : len(bag)] = bag
        mask[i, : len(bag)] = True
    return x, mask


def masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the last axis where ``mask`` holds; 0 elsewhere (an empty bag: all 0)."""
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(weights, nan=0.0) * mask


class MILModel(nn.Module):
    """Base: input standardisation (fitted statistics as buffers) and the ``(bags, mask)`` call."""

    def __init__(self, in_dim: int, n_classes: int) -> None:
        super().__init__()
        if in_dim < 1 or n_classes < 2:
            raise ValueError(f"need in_dim >= 1 and n_classes >= 2, got {in_dim} and {n_classes}")
        self.in_dim, self.n_classes = in_dim, n_classes
        self.register_buffer("input_mean", torch.zeros(in_dim))
        self.register_buffer("input_std", torch.ones(in_dim))

    def set_input_stats(self, mean: Tensor, std: Tensor) -> None:
        """Standardise inputs with these (the training tiles' mean and std per feature)."""
        self.input_mean.copy_(mean)
        self.input_std.copy_(std.clamp_min(1e-6))

    def standardise(self, bags: Tensor) -> Tensor:
        return (bags.float() - self.input_mean) / self.input_std

    def forward(self, bags: Tensor, mask: Tensor | None = None) -> MILOutput:
        if bags.ndim != 3 or bags.shape[-1] != self.in_dim:
            raise ValueError(f"bags must be (B, N, {self.in_dim}), got {tuple(bags.shape)}")
        if mask is None:
            mask = torch.ones(bags.shape[:2], dtype=torch.bool, device=bags.device)
        return self.pool(self.standardise(bags), mask.bool())

    def pool(self, bags: Tensor, mask: Tensor) -> MILOutput:
        raise NotImplementedError


class GatedAttention(nn.Module):
    """Ilse et al. 2018, eq. 9: ``a_k ∝ exp(w^T (tanh(V h_k) ⊙ sigm(U h_k)))``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.v = nn.Linear(dim, hidden)
        self.u = nn.Linear(dim, hidden)
        self.w = nn.Linear(hidden, 1)

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        scores = self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h))).squeeze(-1)
        return masked_softmax(scores, mask)


@MIL_MODELS.register("abmil")
class ABMIL(MILModel):
    """Gated-attention MIL: tiles -> ``hidden`` features -> attention-weighted sum -> linear classifier.

    The attention weights say which tiles the slide's label rests on: that is the heatmap.
    """

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 128, dropout: float = 0.25) -> None:
        super().__init__(in_dim, n_classes)
        self.encode = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attend = GatedAttention(hidden, hidden)
        self.classify = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, n_classes))

    def pool(self, bags: Tensor, mask: Tensor) -> MILOutput:
        h = self.encode(bags)
        attention = self.attend(h, mask)
        slide = torch.einsum("bn,bnd->bd", attention, h)
        return MILOutput(self.classify(slide), attention)


@MIL_MODELS.register("meanpool")
class MeanPool(MILModel):
    """The baseline: the mean of a slide's tile embeddings, then a linear classifier.

    Its "attention" is uniform over the slide's tiles (what a mean gives each of them).
    """

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 128, dropout: float = 0.25) -> None:
        super().__init__(in_dim, n_classes)
        del hidden  # one linear layer: the baseline has nothing to size
        self.classify = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, n_classes))

    def pool(self, bags: Tensor, mask: Tensor) -> MILOutput:
        weights = mask.float() / mask.sum(-1, keepdim=True).clamp_min(1)
        slide = torch.einsum("bn,bnd->bd", weights, bags)
        return MILOutput(self.classify(slide), weights)


def build_mil_model(name: str, in_dim: int, n_classes: int, **kwargs: Any) -> MILModel:
    """The MIL model registered as ``name`` (``abmil``, ``meanpool``, or one a plugin added)."""
    return MIL_MODELS.get(name)(in_dim, n_classes, **kwargs)
