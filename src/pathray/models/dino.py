"""DINO self-distillation: projection head, centred/sharpened loss, EMA teacher, schedules, one step.

The training loop owns the student and the teacher; this module gives the pieces:

    task = build_task(SslConfig())
    student = DinoModel(engine, task.build_head(engine.embed_dim, engine.dense_channels))
    teacher = make_teacher(student)                 # a frozen copy, moved by EMA only
    for step, batch in enumerate(batches):
        progress = step / total_steps
        glob, local = views_from_batch(batch, to_float)   # to_float: uint8 BHWC -> normalised BCHW
        stats = dino_step(task, student, teacher, optimizer, glob, local, progress)

``dino_step`` = ``dino_forward`` -> ``task.loss`` -> backward, clip, step -> ``update_teacher``
with ``task.teacher_momentum(progress)``; a loop with AMP or gradient accumulation calls those
four itself. ``student`` may be wrapped in DDP (``update_teacher`` unwraps ``.module``); DINO
reads only the pooled output, so the engine's dense decoder gets no gradient: wrap with
``find_unused_parameters=True``. Save ``task.state_dict()`` (the loss centre) with the checkpoint.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm


class DinoSettings(Protocol):
    """What the DINO loss reads (an ``SslConfig`` has it): prototypes, temperatures, centring."""

    out_dim: int
    student_temp: float
    teacher_temp: float
    warmup_teacher_temp: float
    warmup_teacher_epochs_frac: float
    center_momentum: float


class DinoHead(nn.Module):
    """MLP -> bottleneck -> l2-normalised -> weight-normed linear layer to ``out_dim`` prototypes.

    The last layer's norm is fixed at 1 (DINO's ``norm_last_layer``): logits are cosine
    similarities to the prototypes, which keeps the teacher from collapsing onto a few of them.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 512, bottleneck: int = 128) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, bottleneck),
        )
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        magnitude.data.fill_(1.0)
        magnitude.requires_grad = False

    def forward(self, pooled: Tensor, dense: Tensor | None = None, out_hw: Any = None) -> Tensor:
        return self.last_layer(F.normalize(self.mlp(pooled), dim=-1))


class DinoModel(nn.Module):
    """An engine and its DINO head: ``x -> (projection (B, out_dim), pooled (B, embed_dim))``."""

    def __init__(self, engine: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.engine, self.head = engine, head

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pooled, _ = self.engine(x)
        return self.head(pooled), pooled


def make_teacher(student: nn.Module) -> nn.Module:
    """A copy of the student that no optimiser moves: only ``update_teacher`` changes it."""
    teacher = copy.deepcopy(getattr(student, "module", student))
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """EMA ``t <- m t + (1 - m) s`` over parameters; buffers (e.g. BatchNorm statistics) are copied."""
    student = getattr(student, "module", student)
    s_params, t_params = list(student.parameters()), list(teacher.parameters())
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, [p.detach() for p in s_params], alpha=1 - momentum)
    for s_buf, t_buf in zip(student.buffers(), teacher.buffers(), strict=True):
        t_buf.copy_(s_buf)


def cosine_momentum(progress: float, base: float = 0.996, final: float = 1.0) -> float:
    """Teacher momentum from ``base`` at the start to ``final`` at the end, along a half cosine."""
    progress = min(max(progress, 0.0), 1.0)
    return final - (final - base) * (1 + math.cos(math.pi * progress)) / 2


def teacher_temperature(progress: float, config: DinoSettings) -> float:
    """Linear warm-up from ``warmup_teacher_temp`` to ``teacher_temp`` over the first
    ``warmup_teacher_epochs_frac`` of training, then constant (soft targets early: no collapse)."""
    warm = config.warmup_teacher_epochs_frac
    if warm > 0 and progress < warm:
        return (
            config.warmup_teacher_temp + (config.teacher_temp - config.warmup_teacher_temp) * progress / warm
        )
    return config.teacher_temp


class DinoLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher and the student over all view pairs.

    Teacher outputs (global views only) minus the EMA ``center``, over a temperature that warms
    up; student outputs (all views) over ``student_temp``. Every (teacher view i, student view j)
    pair with ``j != i`` counts once; student views list the global views first, in the teacher's
    order. Each call then moves ``center`` toward the teacher's batch mean (all-reduced when
    ``torch.distributed`` is initialised).
    """

    def __init__(self, config: DinoSettings) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("center", torch.zeros(1, config.out_dim))

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor], progress: float = 0.0) -> Tensor:
        if self.center.device != teacher[0].device:
            self.center = self.center.to(teacher[0].device)
        temp = teacher_temperature(progress, self.config)
        targets = [F.softmax((t.float() - self.center) / temp, dim=-1).detach() for t in teacher]
        log_probs = [F.log_softmax(s.float() / self.config.student_temp, dim=-1) for s in student]
        total, terms = student[0].new_zeros((), dtype=torch.float32), 0
        for i, target in enumerate(targets):
            for j, log_prob in enumerate(log_probs):
                if i != j:
                    total = total + (-target * log_prob).sum(-1).mean()
                    terms += 1
        self.update_center(torch.cat([t.detach().float() for t in teacher]))
        return total / max(terms, 1)

    @torch.no_grad()
    def update_center(self, teacher: Tensor) -> None:
        batch_sum, count = teacher.sum(0, keepdim=True), teacher.shape[0]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(batch_sum)
            count *= torch.distributed.get_world_size()
        m = self.config.center_momentum
        self.center.mul_(m).add_(batch_sum / count, alpha=1 - m)


def views_from_batch(
    batch: dict[str, Any], to_float: Callable[[Tensor], Tensor]
) -> tuple[list[Tensor], list[Tensor]]:
    """The stream's ``global_0..`` and ``local_0..`` views, in index order, through ``to_float``."""

    def ordered(prefix: str) -> list[Tensor]:
        keys = sorted((k for k in batch if k.startswith(prefix)), key=lambda k: int(k[len(prefix) :]))
        return [to_float(batch[k]) for k in keys]

    return ordered("global_"), ordered("local_")


def _run(model: nn.Module, views: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Forward views in one pass per run of equal sizes (globals together, locals together)."""
    proj: list[Tensor] = []
    pooled: list[Tensor] = []
    start = 0
    while start < len(views):
        end = start + 1
        while end < len(views) and views[end].shape == views[start].shape:
            end += 1
        p, e = model(torch.cat(list(views[start:end])))
        proj.extend(p.chunk(end - start))
        pooled.extend(e.chunk(end - start))
        start = end
    return proj, pooled


def dino_forward(
    student: nn.Module, teacher: nn.Module, global_views: Sequence[Tensor], local_views: Sequence[Tensor] = ()
) -> dict[str, Any]:
    """``{"student": [per view], "teacher": [per global view], "embedding": teacher pooled of global_0}``."""
    with torch.no_grad():
        t_proj, t_pooled = _run(teacher, global_views)
    s_proj, _ = _run(student, [*global_views, *local_views])
    return {"student": s_proj, "teacher": t_proj, "embedding": t_pooled[0]}


def dino_step(
    task: Any,
    student: nn.Module,
    teacher: nn.Module,
    optimizer: torch.optim.Optimizer,
    global_views: Sequence[Tensor],
    local_views: Sequence[Tensor] = (),
    progress: float = 0.0,
    clip_grad: float | None = 3.0,
) -> dict[str, float]:
    """One DINO step: forward, loss, backward, clip, optimiser step, teacher EMA."""
    outputs = dino_forward(student, teacher, global_views, local_views)
    loss = task.loss(outputs, {}, progress)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad:
        nn.utils.clip_grad_norm_(student.parameters(), clip_grad)
    optimizer.step()
    momentum = task.teacher_momentum(progress)
    update_teacher(student, teacher, momentum)
    return {"loss": float(loss.detach()), "teacher_momentum": momentum}
