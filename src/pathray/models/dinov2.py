"""DINOv2 objectives: Sinkhorn-Knopp centring, CLS and iBOT losses, KoLeo/KDE, block masks, schedules.

Ray-free pieces a DINOv2 loop assembles (after facebookresearch/dinov2 at commit
b8931f7bf91576930313be2c6d6af376033b35f0; the KDE regulariser after MedARC-AI/OpenMidnight)::

    rng = np.random.default_rng(seed)
    masks = collate_masks(batch, (16, 16), rng=rng)              # iBOT masks of the global views
    groups = param_groups(student, scaled_lr(4e-3, batch), 0.04)  # layer-wise lr decay, no wd on norms
    optimizer = torch.optim.AdamW(groups)
    dino, ibot, koleo = DinoClsLoss(k), IBotPatchLoss(k), KoLeoLoss()
    for step in range(total):
        p = step / total
        apply_schedules(optimizer, cosine_schedule(peak, 1e-6, p, warmup_frac=0.1),
                        weight_decay_schedule(p), last_layer_frozen(step, freeze))
        temp = teacher_temp_schedule(p)
        loss = dino(s_cls, t_cls, temp) + ibot(s_patch, t_patch, masks["masks"], temp,
                                              masks_weight=masks["masks_weight"])
        loss = loss + 0.1 * sum(koleo(c) for c in s_global_cls)   # or 0.05 * KdeLoss()
        ...
        update_teacher(student, teacher, momentum_schedule(p))       # from pathray.models.dino

Everything all-reduces over ``torch.distributed`` when it is initialised and works on one
process otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

Centring = Literal["mean", "sinkhorn"]
_CENTRINGS = ("mean", "sinkhorn")
_EMBED_NAMES = frozenset(
    {"patch_embed", "pos_embed", "cls_token", "reg_token", "register_tokens", "mask_token"}
)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _check_centring(centring: str) -> None:
    if centring not in _CENTRINGS:
        raise ValueError(f"unknown centring {centring!r}: expected one of {', '.join(_CENTRINGS)}")


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: Tensor, temp: float, n_iterations: int = 3, n_samples: int | Tensor | None = None
) -> Tensor:
    """Balanced teacher targets: ``exp(logits / temp)`` scaled so prototypes share the batch evenly.

    DINOv2's replacement for the running-mean centre: alternately make every prototype (column)
    carry ``1/K`` of the mass (summed over all ranks) and every sample (row) ``1/B``; after the
    last pass each row is a distribution. ``n_samples`` is dinov2's ``n_masked_patches_tensor``
    for iBOT (the local count, all-reduced here); it only scales intermediate values and so does
    not change the result, but is accepted for parity. The global maximum is subtracted before
    ``exp`` (it cancels in the normalisation) so small temperatures do not overflow.

    Returns:
        ``(B, K)`` float32 probabilities, rows summing to 1.
    """
    logits = teacher_logits.float() / temp
    top = logits.max().clone()
    if _distributed():
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    q = torch.exp(logits - top).t()  # (K, B), as in the paper
    n_prototypes = q.shape[0]
    if n_samples is None:
        count = float(q.shape[1] * (dist.get_world_size() if _distributed() else 1))
    else:
        total = torch.as_tensor(n_samples, dtype=torch.float32, device=q.device).clone()
        if _distributed():
            dist.all_reduce(total)
        count = float(total.sum())
    mass = q.sum()
    if _distributed():
        dist.all_reduce(mass)
    q /= mass
    for _ in range(n_iterations):
        per_prototype = q.sum(dim=1, keepdim=True)
        if _distributed():
            dist.all_reduce(per_prototype)
        q /= per_prototype * n_prototypes
        q /= q.sum(dim=0, keepdim=True) * count
    return (q * count).t()


class _Centred(nn.Module):
    """Teacher logits -> targets by an EMA centre (``mean``) or Sinkhorn-Knopp (``sinkhorn``)."""

    center: Tensor

    def __init__(
        self,
        out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centring: Centring = "sinkhorn",
    ) -> None:
        super().__init__()
        _check_centring(centring)
        self.student_temp, self.center_momentum, self.centring = student_temp, center_momentum, centring
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def targets(self, teacher: Tensor, temp: float, n_samples: int | Tensor | None = None) -> Tensor:
        """Soft targets for ``(M, K)`` teacher logits; in ``mean`` mode the centre then moves."""
        teacher = teacher.detach().float()
        if self.centring == "sinkhorn":
            return sinkhorn_knopp(teacher, temp, n_samples=n_samples)
        if self.center.device != teacher.device:
            self.center = self.center.to(teacher.device)
        probs = F.softmax((teacher - self.center) / temp, dim=-1)
        self.update_center(teacher)
        return probs

    @torch.no_grad()
    def update_center(self, teacher: Tensor) -> None:
        """EMA of the teacher's mean logit over rows (all ranks)."""
        stats = torch.cat([teacher.sum(0), teacher.new_tensor([teacher.shape[0]])])
        if _distributed():
            dist.all_reduce(stats)
        batch_mean = stats[:-1] / stats[-1].clamp(min=1.0)
        self.center.mul_(self.center_momentum).add_(batch_mean.unsqueeze(0), alpha=1 - self.center_momentum)


class DinoClsLoss(_Centred):
    """DINO's CLS-token loss with a choice of teacher centring (DINOv2 defaults to ``sinkhorn``).

    Cross-entropy of student (all views, globals first, in the teacher's order) against teacher
    targets (global views) for every pair ``(teacher i, student j)`` with ``j != i``, averaged over
    pairs, as in ``pathray.models.dino.DinoLoss``. Targets come from ``sinkhorn_knopp`` over all
    teacher views together, or from an EMA ``center`` (``centring="mean"``, DINO v1).
    """

    def forward(
        self, student_outputs: Sequence[Tensor], teacher_outputs: Sequence[Tensor], teacher_temp: float
    ) -> Tensor:
        sizes = [t.shape[0] for t in teacher_outputs]
        targets = self.targets(torch.cat(list(teacher_outputs)), teacher_temp).split(sizes)
        log_probs = [F.log_softmax(s.float() / self.student_temp, dim=-1) for s in student_outputs]
        total, terms = log_probs[0].new_zeros(()), 0
        for i, target in enumerate(targets):
            for j, log_prob in enumerate(log_probs):
                if i != j:
                    total = total - (target * log_prob).sum(-1).mean()
                    terms += 1
        return total / max(terms, 1)


class IBotPatchLoss(_Centred):
    """iBOT's masked-patch loss (dinov2 ``iBOTPatchLoss.forward_masked``).

    Per masked patch, the cross-entropy of the student against the teacher target; each patch is
    weighted by ``1 / (masked patches of its image)`` and the sum divided by the number of images
    ``B`` (unmasked images included): the loss is the mean over images of each image's mean patch
    CE, counting unmasked images as 0.
    """

    def forward(
        self,
        student_patch_logits_masked: Tensor,
        teacher_patch_logits_masked: Tensor,
        student_masks_flat: Tensor,
        teacher_temp: float,
        n_masked_patches: int | None = None,
        masks_weight: Tensor | None = None,
    ) -> Tensor:
        """Loss over the ``(M, K)`` masked-patch logits, in ``masks.flatten().nonzero()`` order.

        ``n_masked_patches`` drops padding rows past it (dinov2 pads to ``upperbound``);
        ``masks_weight`` (``collate_masks``) saves recomputing the weights from the masks.
        """
        masks = student_masks_flat.bool()
        student, teacher = student_patch_logits_masked, teacher_patch_logits_masked
        if n_masked_patches is not None:
            student, teacher = student[:n_masked_patches], teacher[:n_masked_patches]
        targets = self.targets(teacher, teacher_temp, n_samples=teacher.shape[0])
        ce = -(targets * F.log_softmax(student.float() / self.student_temp, dim=-1)).sum(-1)
        if masks_weight is None:
            per_image = 1 / masks.sum(-1).clamp(min=1).float()
            masks_weight = per_image.unsqueeze(-1).expand_as(masks)[masks]
        if masks_weight.shape[0] != ce.shape[0]:
            raise ValueError(
                f"iBOT: {ce.shape[0]} masked-patch logits but {masks_weight.shape[0]} patch weights "
                "(pass n_masked_patches to drop padding rows)"
            )
        return (ce * masks_weight.to(ce)).sum() / masks.shape[0]


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy regulariser (Sablayrolles et al. 2018; dinov2 ``KoLeoLoss``).

    ``-mean(log(distance to nearest neighbour + eps))`` of the l2-normalised rows: minimising it
    spreads CLS embeddings apart. DINOv2 weights it 0.1 and applies it per global view (never
    between two views of one image).
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, student_output: Tensor) -> Tensor:
        if student_output.shape[0] < 2:
            raise ValueError(f"KoLeo needs at least 2 embeddings, got {student_output.shape[0]}")
        x = F.normalize(student_output.float(), p=2, dim=-1, eps=self.eps)
        dots = x @ x.t()
        dots.fill_diagonal_(-1.0)  # a point is not its own neighbour
        nearest = dots.argmax(dim=1)  # max inner product = min distance on the sphere
        distances = F.pairwise_distance(x, x[nearest], p=2, eps=self.eps)
        return -torch.log(distances + self.eps).mean()


class KdeLoss(nn.Module):
    """Kernel-density (von Mises-Fisher) uniformity regulariser, Midnight's stand-in for KoLeo.

    After MedARC-AI/OpenMidnight ``dinov2/loss/kde_loss.py`` (commit
    ad9f7dffe6e9608690e15814089da20607e78a8c, unchanged at f7d5a6457d7f34c0a7be194ed8d0b1199e5360ca):
    ``density_i = sum_j exp(kappa * cos(x_i, x_j))`` over the batch, self term included (it keeps
    the gradient bounded when tiles are near-duplicates, where KoLeo's explodes), ``kappa = 5``.
    The reference returns the entropy estimate ``-mean(log density)`` and adds it to the loss,
    which *raises* density (pulls points together); here the loss is ``+mean(log density)`` so
    that minimising it spreads the embeddings. ``reference_sign=True`` returns OpenMidnight's
    value. OpenMidnight weights it 0.05 (KoLeo off), per global view.
    """

    def __init__(self, kappa: float = 5.0, reference_sign: bool = False) -> None:
        super().__init__()
        self.kappa, self.reference_sign = kappa, reference_sign

    def forward(self, student_output: Tensor) -> Tensor:
        x = F.normalize(student_output.float(), p=2, dim=-1)
        # log(sum exp) without overflow; the reference's +1e-9 is negligible beside exp(kappa)
        log_density = torch.logsumexp(self.kappa * (x @ x.t()), dim=1)
        loss = log_density.mean()
        return -loss if self.reference_sign else loss


class MaskingGenerator:
    """Random rectangular block masks on a patch grid (dinov2 ``MaskingGenerator``, BEiT-style).

    Blocks of ``min_num_patches`` to ``max_num_patches`` patches and aspect ratio (height/width)
    log-uniform in ``[min_aspect, max_aspect]`` are added until the requested count is reached
    (blocks may overlap; never more than requested). ``max_num_patches`` defaults to half the
    grid, dinov2's training setting. Randomness comes only from the ``rng`` passed in.
    """

    def __init__(
        self,
        grid: tuple[int, int],
        min_num_patches: int = 4,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        max_num_patches: float | None = None,
    ) -> None:
        self.height, self.width = grid
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        self.max_num_patches = 0.5 * self.num_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def sample_block(self, rng: np.random.Generator, max_mask_patches: float) -> tuple[float, float]:
        """One candidate block's (target area, aspect ratio), before rounding to whole patches."""
        low, high = sorted((self.min_num_patches, max_mask_patches))  # python's uniform(a, b) with a > b
        return float(rng.uniform(low, high)), math.exp(rng.uniform(*self.log_aspect_ratio))

    def _mask(self, mask: np.ndarray, max_mask_patches: float, rng: np.random.Generator) -> int:
        """Add one block (up to 10 tries); return the number of newly masked patches."""
        for _ in range(10):
            area, aspect = self.sample_block(rng, max_mask_patches)
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < self.width and h < self.height:
                top = int(rng.integers(0, self.height - h + 1))
                left = int(rng.integers(0, self.width - w + 1))
                window = mask[top : top + h, left : left + w]
                new = h * w - int(window.sum())
                if 0 < new <= max_mask_patches:
                    window[...] = True
                    return new
        return 0

    def __call__(self, num_masking_patches: int, rng: np.random.Generator) -> np.ndarray:
        """A ``(height, width)`` bool mask with at most ``num_masking_patches`` patches set."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            budget = min(num_masking_patches - count, self.max_num_patches)
            delta = self._mask(mask, budget, rng)
            if delta == 0:
                break
            count += delta
        return mask


def collate_masks(
    batch_size: int,
    grid: tuple[int, int],
    mask_probability: float = 0.5,
    ratio_min_max: tuple[float, float] = (0.1, 0.5),
    *,
    rng: np.random.Generator,
    generator: MaskingGenerator | None = None,
) -> dict[str, Any]:
    """iBOT masks for a batch of global views (dinov2 ``collate_data_and_cast``).

    ``int(batch_size * mask_probability)`` images are masked; their ratios are spread over
    ``ratio_min_max``: image ``i`` draws uniformly between consecutive bounds of
    ``linspace(lo, hi, n_masked + 1)``. The rest are unmasked; the order is shuffled.

    Returns:
        ``masks`` (B, N) bool; ``mask_indices_list`` flat indices of masked patches;
        ``n_masked_patches`` (1,) long; ``masks_weight`` per masked patch ``1 / masked patches
        of its image``; ``upperbound`` an int bound on the masked count (buffer size).
    """
    generator = generator or MaskingGenerator(grid)
    n_tokens = grid[0] * grid[1]
    n_masked = int(batch_size * mask_probability)
    bounds = np.linspace(*ratio_min_max, n_masked + 1)
    upperbound = 0
    masks = []
    for i in range(n_masked):
        ratio = rng.uniform(bounds[i], bounds[i + 1])
        masks.append(generator(int(n_tokens * ratio), rng))
        upperbound += int(n_tokens * bounds[i + 1])
    masks.extend(generator(0, rng) for _ in range(n_masked, batch_size))
    order = rng.permutation(batch_size)
    collated = torch.from_numpy(np.stack([masks[i] for i in order]).reshape(batch_size, n_tokens))
    indices = collated.flatten().nonzero().flatten()
    weight = (1 / collated.sum(-1).clamp(min=1).float()).unsqueeze(-1).expand_as(collated)[collated]
    return {
        "masks": collated,
        "mask_indices_list": indices,
        "n_masked_patches": torch.full((1,), indices.shape[0], dtype=torch.long),
        "masks_weight": weight,
        "upperbound": upperbound,
    }


def cosine_schedule(
    base: float, final: float, progress: float, warmup_frac: float = 0.0, warmup_start: float = 0.0
) -> float:
    """Linear ``warmup_start -> base`` over ``warmup_frac``, then a half cosine ``base -> final``.

    dinov2's ``CosineScheduler`` on ``progress = step / total`` in ``[0, 1]`` (clamped); the lr
    schedule is ``cosine_schedule(peak_lr, min_lr, p, warmup_frac)``.
    """
    progress = min(max(progress, 0.0), 1.0)
    if warmup_frac > 0 and progress < warmup_frac:
        return warmup_start + (base - warmup_start) * progress / warmup_frac
    if warmup_frac >= 1:
        return final
    t = (progress - warmup_frac) / (1 - warmup_frac)
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * t))


def weight_decay_schedule(progress: float, base: float = 0.04, final: float = 0.2) -> float:
    """Weight decay, cosine ``base -> final`` (0.04 -> 0.2, OpenMidnight; dinov2 ends at 0.4)."""
    return cosine_schedule(base, final, progress)


def last_layer_frozen(step: int, freeze_steps: int) -> bool:
    """Whether the heads' last layer is still frozen (lr 0) at ``step``: DINO's early stabiliser."""
    return step < freeze_steps


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """dinov2's ``sqrt_wrt_1024`` rule: ``base_lr`` is for a global batch of 1024."""
    return base_lr * math.sqrt(batch_size / 1024)
