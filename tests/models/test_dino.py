"""DINO pieces: head, loss by hand, centring, teacher EMA, schedules, and a run of real steps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from pathray.models.dino import (
    DinoHead,
    DinoLoss,
    DinoModel,
    cosine_momentum,
    dino_forward,
    dino_step,
    make_teacher,
    teacher_temperature,
    update_teacher,
    views_from_batch,
)
from pathray.models.metrics import EmbeddingMetric
from pathray.models.tasks import SslConfig, build_task


class TinyEngine(nn.Module):
    """The engine contract in miniature; any input size (global and local views)."""

    embed_dim, dense_channels, dense_stride = 16, 8, 4

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.ReLU(), nn.BatchNorm2d(8))
        self.pool = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dense = self.stem(x)
        return self.pool(dense.mean((2, 3))), dense


def config(**kw) -> SslConfig:
    return SslConfig(**{"out_dim": 32, "head_hidden": 32, "head_bottleneck": 8, **kw})


def test_head_is_cosine_to_unit_prototypes():
    head = DinoHead(16, 32, hidden=24, bottleneck=8)
    out = head(torch.randn(5, 16))
    assert out.shape == (5, 32) and out.abs().max() <= 1 + 1e-5
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(32))
    assert not head.last_layer.parametrizations.weight.original0.requires_grad


def test_loss_by_hand_for_two_global_views():
    cfg = config(student_temp=0.5, teacher_temp=0.25, warmup_teacher_temp=0.25)
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(3, 32, generator=g) for _ in range(3)]  # 2 global + 1 local student view
    t = [torch.randn(3, 32, generator=g) for _ in range(2)]
    loss = DinoLoss(cfg)(s, t, progress=0.5)  # centre still 0 for this call

    def ce(ti, si):
        return -(torch.softmax(ti / 0.25, -1) * torch.log_softmax(si / 0.5, -1)).sum(-1).mean()

    expected = (ce(t[0], s[1]) + ce(t[0], s[2]) + ce(t[1], s[0]) + ce(t[1], s[2])) / 4
    assert torch.isfinite(loss) and loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_centre_moves_toward_teacher_mean():
    criterion = DinoLoss(config(center_momentum=0.9))
    mean = torch.linspace(-1, 1, 32)
    teacher = [mean.expand(64, 32)] * 2
    gaps = []
    for _ in range(5):
        criterion([torch.zeros(64, 32)] * 2, teacher)
        gaps.append((criterion.center - mean).norm().item())
    assert gaps == sorted(gaps, reverse=True)
    torch.testing.assert_close(criterion.center[0], (1 - 0.9**5) * mean)


def test_update_teacher_ema_math_and_buffers():
    student, teacher = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    with torch.no_grad():
        student.weight.fill_(1.0)
        teacher.weight.fill_(0.0)
        student.running_mean.fill_(7.0)
    update_teacher(student, teacher, momentum=0.9)
    torch.testing.assert_close(teacher.weight, torch.full((3,), 0.1))
    torch.testing.assert_close(teacher.running_mean, torch.full((3,), 7.0))
    update_teacher(student, teacher, momentum=0.5)
    torch.testing.assert_close(teacher.weight, torch.full((3,), 0.55))


def test_schedules():
    cfg = config(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_epochs_frac=0.3)
    temps = [teacher_temperature(p, cfg) for p in (0.0, 0.15, 0.3, 1.0)]
    assert temps == pytest.approx([0.04, 0.055, 0.07, 0.07])
    assert teacher_temperature(0.0, config(warmup_teacher_epochs_frac=0.0, teacher_temp=0.07)) == 0.07
    assert [cosine_momentum(p, 0.996) for p in (0.0, 0.5, 1.0)] == pytest.approx([0.996, 0.998, 1.0])
    assert build_task(config()).teacher_momentum(0.0) == pytest.approx(0.996)


def test_views_from_batch_in_index_order():
    batch = {f"global_{i}": torch.full((1, 4, 4, 3), i, dtype=torch.uint8) for i in (10, 2, 0)}
    batch["local_0"] = torch.zeros((1, 2, 2, 3), dtype=torch.uint8)
    glob, local = views_from_batch(batch, lambda v: v.permute(0, 3, 1, 2).float())
    assert [int(v[0, 0, 0, 0]) for v in glob] == [0, 2, 10] and local[0].shape == (1, 3, 2, 2)


def run_steps(center_momentum: float, steps: int = 20):
    torch.manual_seed(0)
    task = build_task(config(out_dim=64, center_momentum=center_momentum))
    engine = TinyEngine()
    student = DinoModel(engine, task.build_head(engine.embed_dim, engine.dense_channels))
    teacher = make_teacher(student)
    assert not any(p.requires_grad for p in teacher.parameters())
    g = torch.Generator().manual_seed(1)
    glob = [torch.rand(4, 3, 32, 32, generator=g) for _ in range(2)]
    local = [torch.rand(4, 3, 16, 16, generator=g) for _ in range(3)]
    before = [p.clone() for p in teacher.parameters()]
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    losses = [
        dino_step(task, student, teacher, opt, glob, local, progress=i / steps)["loss"] for i in range(steps)
    ]
    assert any(not torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True))
    return task, student, teacher, glob, local, losses


def test_dino_steps_distil_the_teacher():
    # With the centre held (momentum 1) the targets stay put and the student must fit them.
    _, _, _, _, _, losses = run_steps(center_momentum=1.0)
    assert np.isfinite(losses).all() and losses[-1] < 0.1 * losses[0], losses


def test_dino_steps_with_centring_stay_finite_and_keep_state():
    # Centring pulls the teacher away from its collapsed start, so here the loss need not fall.
    task, student, teacher, glob, local, losses = run_steps(center_momentum=0.9)
    assert np.isfinite(losses).all()
    outputs = dino_forward(student, teacher, glob, local)
    assert len(outputs["student"]) == 5 and len(outputs["teacher"]) == 2
    assert task.predict(outputs).shape == (4, 16)
    state = task.state_dict()
    assert state["center"].abs().sum() > 0
    fresh = build_task(config(out_dim=64))
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.criterion.center, state["center"])


def test_embedding_metric_merges_and_scores():
    a, b = EmbeddingMetric(), EmbeddingMetric()
    a.update({"embedding": torch.eye(4)[:2]})
    b.update({"embedding": torch.eye(4)[2:]})
    a.merge(b.state())
    out = a.compute()
    assert out["rankme"] == pytest.approx(4.0, rel=1e-5)
    assert math.isclose(out["odcorr"], 1 / 3, rel_tol=1e-6)  # one-hot columns: corr -1/3 each
