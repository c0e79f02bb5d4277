"""DINOv2 objectives against hand-worked numbers: SK, CLS/iBOT losses, KoLeo/KDE, masks, schedules, groups."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from pathray.models.dino import teacher_temperature
from pathray.models.dinov2 import (
    DinoClsLoss,
    IBotPatchLoss,
    KdeLoss,
    KoLeoLoss,
    MaskingGenerator,
    collate_masks,
    cosine_schedule,
    last_layer_frozen,
    scaled_lr,
    sinkhorn_knopp,
    weight_decay_schedule,
)
from pathray.models.tasks import SslConfig, build_task

# Three SK passes on exp(logits / temp) = [[1, 2], [1, 1]], worked in exact fractions; the
# limit is sqrt(2) - 1 = 0.41421... (99/239 is a Pell convergent of it).
SK_2X2 = [[99 / 239, 140 / 239], [99 / 169, 70 / 169]]
# The same for [[1, 3], [1, 1], [2, 1]] (3 samples, 2 prototypes).
SK_3X2 = [
    [19666949 / 71600867, 51933918 / 71600867],
    [19666949 / 36978255, 17311306 / 36978255],
    [19666949 / 28322602, 8655653 / 28322602],
]


def logits_for(probs: list[list[float]], temp: float, shift: float = 0.0) -> torch.Tensor:
    """Logits whose exp(logits / temp) is ``probs`` (times a constant, from ``shift``)."""
    return temp * torch.log(torch.tensor(probs, dtype=torch.float64)).float() + shift


def softmax(xs: list[float], temp: float = 1.0) -> list[float]:
    exps = [math.exp(x / temp) for x in xs]
    return [e / sum(exps) for e in exps]


def cross_entropy(target: list[float], student: list[float], temp: float) -> float:
    """-sum_k target_k log softmax(student / temp)_k, written out."""
    log_z = math.log(sum(math.exp(s / temp) for s in student))
    return -sum(t * (s / temp - log_z) for t, s in zip(target, student, strict=True))


# --- Sinkhorn-Knopp ------------------------------------------------------------------------------


def test_sinkhorn_2x2_matches_exact_fractions_and_ignores_logit_shift() -> None:
    for shift in (0.0, 7.0):
        q = sinkhorn_knopp(logits_for([[1, 2], [1, 1]], temp=0.5, shift=shift), temp=0.5)
        assert torch.allclose(q, torch.tensor(SK_2X2), atol=1e-6)
        assert torch.allclose(q.sum(1), torch.ones(2), atol=1e-6)
        assert torch.allclose(q.sum(0), torch.ones(2), atol=1e-4)  # B/K = 1 per prototype


def test_sinkhorn_3x2_rows_are_distributions_columns_balanced() -> None:
    logits = logits_for([[1, 3], [1, 1], [2, 1]], temp=0.1)
    q = sinkhorn_knopp(logits, temp=0.1)
    assert q.shape == (3, 2) and q.dtype == torch.float32
    assert torch.allclose(q, torch.tensor(SK_3X2), atol=1e-6)
    assert torch.allclose(q.sum(1), torch.ones(3), atol=1e-6)
    assert torch.allclose(q.sum(0), torch.full((2,), 1.5), atol=2e-3)  # 3 samples over 2 prototypes
    converged = sinkhorn_knopp(logits, temp=0.1, n_iterations=50)
    assert torch.allclose(converged.sum(0), torch.full((2,), 1.5), atol=1e-5)
    # dinov2's iBOT count only scales intermediate values: same result
    assert torch.allclose(sinkhorn_knopp(logits, 0.1, n_samples=torch.tensor([3])), q)
    assert torch.allclose(sinkhorn_knopp(logits, 0.1, n_samples=17), q)


def test_sinkhorn_small_temperature_does_not_overflow() -> None:
    q = sinkhorn_knopp(torch.tensor([[100.0, 99.0], [99.0, 100.0]]), temp=0.04)
    assert torch.isfinite(q).all() and torch.allclose(q.sum(1), torch.ones(2))


def test_sinkhorn_and_centres_under_a_one_process_group(tmp_path) -> None:
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group already running")
    logits = logits_for([[1, 3], [1, 1], [2, 1]], temp=0.1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        assert torch.allclose(sinkhorn_knopp(logits, 0.1), torch.tensor(SK_3X2), atol=1e-6)
        assert torch.allclose(sinkhorn_knopp(logits, 0.1, n_samples=torch.tensor([3])), torch.tensor(SK_3X2))
        loss = DinoClsLoss(2, centring="mean")
        loss([logits, logits], [logits], 0.1)
        assert torch.allclose(loss.center, 0.1 * logits.mean(0, keepdim=True))
    finally:
        dist.destroy_process_group()


# --- CLS loss ------------------------------------------------------------------------------------


def test_cls_loss_mean_centring_by_hand() -> None:
    t = [[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]]
    s = [
        [[0.1, 0.2, 0.0], [0.0, -0.1, 0.3]],
        [[0.2, 0.0, 0.1], [0.1, 0.1, 0.1]],
        [[-0.2, 0.3, 0.0], [0.05, 0.0, 0.0]],
    ]
    temp = 0.5
    pair_losses = []
    for i in range(2):
        for j in range(3):
            if i != j:
                ces = [cross_entropy(softmax(t[i][b], temp), s[j][b], 0.1) for b in range(2)]
                pair_losses.append(sum(ces) / 2)
    expected = sum(pair_losses) / 4  # pairs (0,1), (0,2), (1,0), (1,2)
    loss = DinoClsLoss(3, centring="mean")
    got = loss([torch.tensor(v) for v in s], [torch.tensor(v) for v in t], temp)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # the centre moved 10% of the way to the teacher's mean row [0.5, 0.5, 0.25]
    assert torch.allclose(loss.center, torch.tensor([[0.05, 0.05, 0.025]]))


def test_cls_loss_sinkhorn_targets_by_hand() -> None:
    t0, t1 = logits_for([[1, 2]], 0.5), logits_for([[1, 1]], 0.5)  # together: the 2x2 SK example
    s0, s1 = [0.3, -0.1], [0.0, 0.2]
    expected = (cross_entropy(SK_2X2[0], s1, 0.1) + cross_entropy(SK_2X2[1], s0, 0.1)) / 2
    loss = DinoClsLoss(2)  # sinkhorn by default
    got = loss([torch.tensor([s0]), torch.tensor([s1])], [t0, t1], teacher_temp=0.5)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert torch.equal(loss.center, torch.zeros(1, 2))  # SK keeps no running centre


def test_unknown_centring_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown centring 'median'"):
        DinoClsLoss(4, centring="median")  # type: ignore[arg-type]


# --- iBOT ----------------------------------------------------------------------------------------

IBOT_MASKS = torch.tensor([[1, 0, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)  # 1, 3, 0 masked
IBOT_TEACHER = [[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [2.0, 0.0]]
IBOT_STUDENT = [[0.1, 0.2], [0.3, -0.1], [0.0, 0.0], [0.2, 0.1]]


def ibot_expected() -> float:
    ce = [cross_entropy(softmax(t), s, 0.1) for t, s in zip(IBOT_TEACHER, IBOT_STUDENT, strict=True)]
    per_image = [ce[0] / 1, (ce[1] + ce[2] + ce[3]) / 3, 0.0]  # each image's mean over its masked patches
    return sum(per_image) / 3  # over all 3 images, the unmasked one included


def test_ibot_weights_each_image_by_its_masked_count() -> None:
    student = torch.tensor(IBOT_STUDENT, requires_grad=True)
    loss = IBotPatchLoss(2, centring="mean")(
        student, torch.tensor(IBOT_TEACHER), IBOT_MASKS, teacher_temp=1.0
    )
    assert loss.item() == pytest.approx(ibot_expected(), rel=1e-5)
    loss.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_ibot_with_collate_weights_and_padding_rows() -> None:
    padded_s = torch.tensor([*IBOT_STUDENT, [9.0, -9.0], [5.0, 5.0]])
    padded_t = torch.tensor([*IBOT_TEACHER, [0.0, 0.0], [1.0, 1.0]])
    weights = torch.tensor([1.0, 1 / 3, 1 / 3, 1 / 3])
    loss = IBotPatchLoss(2, centring="mean")(
        padded_s, padded_t, IBOT_MASKS, 1.0, n_masked_patches=4, masks_weight=weights
    )
    assert loss.item() == pytest.approx(ibot_expected(), rel=1e-5)
    with pytest.raises(ValueError, match="6 masked-patch logits but 4 patch weights"):
        IBotPatchLoss(2)(padded_s, padded_t, IBOT_MASKS, 1.0, masks_weight=weights)


def test_ibot_mean_centre_tracks_masked_teacher_rows() -> None:
    loss = IBotPatchLoss(2, centring="mean")
    loss(torch.tensor(IBOT_STUDENT), torch.tensor(IBOT_TEACHER), IBOT_MASKS, 1.0)
    assert torch.allclose(loss.center, 0.1 * torch.tensor([[3.5 / 4, 1.5 / 4]]))


# --- KoLeo / KDE ---------------------------------------------------------------------------------


def test_koleo_three_points_on_a_circle() -> None:
    # angles 0, 60, 180 degrees; chord = 2 sin(delta / 2): nearest distances 1, 1, sqrt(3)
    angles = [0.0, math.pi / 3, math.pi]
    points = torch.tensor([[3 * math.cos(a), 3 * math.sin(a)] for a in angles])  # scale: normalised away
    expected = -(math.log(1) + math.log(1) + math.log(math.sqrt(3))) / 3
    assert KoLeoLoss()(points).item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        KoLeoLoss()(points[:1])


def test_kde_tiny_sets() -> None:
    kappa = 5.0
    orthogonal = torch.tensor([[2.0, 0.0], [0.0, 0.5]])  # cos 0 off the diagonal, 1 on it
    assert KdeLoss()(orthogonal).item() == pytest.approx(math.log(math.exp(kappa) + 1), rel=1e-6)
    # two copies of one direction and one at 90 degrees
    points = torch.tensor([[1.0, 0.0], [4.0, 0.0], [0.0, 1.0]])
    densities = [2 * math.exp(kappa) + 1, 2 * math.exp(kappa) + 1, math.exp(kappa) + 2]
    expected = sum(math.log(d) for d in densities) / 3
    assert KdeLoss(kappa)(points).item() == pytest.approx(expected, rel=1e-6)
    # OpenMidnight's value is the negated (entropy) one
    assert KdeLoss(kappa, reference_sign=True)(points).item() == pytest.approx(-expected, rel=1e-6)
    # minimising it spreads points: clustered points cost more than spread ones
    clustered = torch.tensor([[1.0, 0.0], [1.0, 0.1], [1.0, -0.1]])
    spread = torch.tensor([[1.0, 0.0], [-0.5, 0.866], [-0.5, -0.866]])
    assert KdeLoss()(clustered) > KdeLoss()(spread)


# --- masking -------------------------------------------------------------------------------------


def test_block_draws_stay_in_area_and_aspect_bounds() -> None:
    generator = MaskingGenerator((16, 16))
    assert generator.max_num_patches == 128  # half the grid by default
    rng = np.random.default_rng(0)
    draws = [generator.sample_block(rng, 50) for _ in range(500)]
    assert all(4 <= area <= 50 for area, _ in draws)
    assert all(0.3 <= aspect <= 1 / 0.3 for _, aspect in draws)
    aspects = [aspect for _, aspect in draws]
    assert min(aspects) < 0.5 and max(aspects) > 2  # both orientations occur


def test_single_block_is_a_filled_rectangle_within_budget() -> None:
    generator = MaskingGenerator((16, 16))
    rng = np.random.default_rng(1)
    for _ in range(50):
        mask = np.zeros((16, 16), dtype=bool)
        added = generator._mask(mask, 30, rng)
        rows, cols = np.nonzero(mask)
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert added == mask.sum() == h * w <= 30
        assert h < 16 and w < 16
        assert mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()


def test_generator_never_masks_more_than_asked() -> None:
    generator, rng = MaskingGenerator((14, 14)), np.random.default_rng(2)
    for n in (0, 3, 19, 60, 98):
        assert generator(n, rng).sum() <= n
    assert generator(0, rng).sum() == 0


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_collate_masks_statistics(seed: int) -> None:
    out = collate_masks(8, (16, 16), rng=np.random.default_rng(seed))
    masks = out["masks"]
    assert masks.shape == (8, 256) and masks.dtype == torch.bool
    counts = masks.sum(1)
    assert int((counts > 0).sum()) == 4  # int(8 * 0.5) images masked, the rest not
    # ratios spread over [0.1, 0.5]: one image per band of linspace(0.1, 0.5, 5)
    bands = [(25, 51), (51, 76), (76, 102), (102, 128)]  # int(256 * bound)
    for count, (low, high) in zip(sorted(counts[counts > 0].tolist()), bands, strict=True):
        assert low <= count <= high
    assert out["upperbound"] == 51 + 76 + 102 + 128
    assert torch.equal(out["mask_indices_list"], masks.flatten().nonzero().flatten())
    assert out["n_masked_patches"].tolist() == [int(counts.sum())]
    expected_weights = torch.cat([torch.full((int(c),), 1 / int(c)) for c in counts if c > 0])
    assert torch.allclose(out["masks_weight"], expected_weights)
    assert out["masks_weight"].sum().item() == pytest.approx(4.0)


def test_collate_masks_is_reproducible_and_seeded() -> None:
    a = collate_masks(6, (14, 14), rng=np.random.default_rng(7))["masks"]
    b = collate_masks(6, (14, 14), rng=np.random.default_rng(7))["masks"]
    c = collate_masks(6, (14, 14), rng=np.random.default_rng(8))["masks"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int((a.sum(1) > 0).sum()) == 3


# --- schedules -----------------------------------------------------------------------------------


def test_schedules_at_chosen_points() -> None:
    config = SslConfig(method="dinov2", teacher_temp=0.07, warmup_teacher_temp=0.04, ema_momentum=0.992)
    assert teacher_temperature(0.0, config) == pytest.approx(0.04)
    assert teacher_temperature(0.15, config) == pytest.approx(0.055)  # half-way through the warm-up
    assert teacher_temperature(0.3, config) == pytest.approx(0.07)
    assert teacher_temperature(0.9, config) == teacher_temperature(1.0, config) == pytest.approx(0.07)
    task = build_task(config)
    assert task.teacher_momentum(0.0) == pytest.approx(0.992)
    assert task.teacher_momentum(0.5) == pytest.approx(0.996)
    assert task.teacher_momentum(1.0) == pytest.approx(1.0)
    assert weight_decay_schedule(0.0) == pytest.approx(0.04)
    assert weight_decay_schedule(0.5) == pytest.approx(0.12)
    assert weight_decay_schedule(1.0) == pytest.approx(0.2)
    # lr-style: warm-up 0 -> 1 over 20%, then cosine 1 -> 0 (its midpoint at 60%)
    assert cosine_schedule(1.0, 0.0, 0.1, warmup_frac=0.2) == pytest.approx(0.5)
    assert cosine_schedule(1.0, 0.0, 0.2, warmup_frac=0.2) == pytest.approx(1.0)
    assert cosine_schedule(1.0, 0.0, 0.6, warmup_frac=0.2) == pytest.approx(0.5)
    assert cosine_schedule(1.0, 0.0, 1.5, warmup_frac=0.2) == pytest.approx(0.0)  # clamped
    assert last_layer_frozen(0, 10) and last_layer_frozen(9, 10) and not last_layer_frozen(10, 10)
    assert scaled_lr(4e-3, 256) == pytest.approx(2e-3)
    assert scaled_lr(4e-3, 1024) == pytest.approx(4e-3)
