"""The per-worker training loop: a step a reader can hold in their head, wrapped for Ray Train.

One worker:   pathray train configs/gleason-foundation.yaml --set scale.workers=1
Two workers:  pathray train configs/gleason-foundation.yaml --set scale.workers=2
Two nodes:    RAY_ADDRESS=head:6379 pathray train CONFIG --set scale.workers=2 \
                  --set scale.placement_strategy=SPREAD
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pathray.storage import StorageError, join_uri, write_text
from pathray.training.learners import Learner, WorkerJob, build_learner, detach, fit_positions, unwrap
from pathray.training.outputs import HISTORY_FILE
from pathray.training.parallel import (
    full_parameters,
    is_sharded,
    load_optimizer_state,
    local_share,
    optimizer_state,
)

log = logging.getLogger(__name__)


def lr_lambda(step: int, warmup: int, total: int, floor: float) -> float:
    """Linear warmup, then cosine decay to ``floor`` (a fraction of the base lr)."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def base_lr(job: WorkerJob, workers: int = 1) -> float:
    """``optim.lr``, times ``sqrt(global batch / 1024)`` with ``optim.lr_batch_scaling: sqrt``."""
    o = job.optim
    if o.lr_batch_scaling == "sqrt":
        from pathray.models.dinov2 import scaled_lr

        return scaled_lr(o.lr, job.train.batch_size * o.grad_accum * workers)
    return o.lr


def build_optimizer(model: nn.Module, job: WorkerJob, workers: int = 1) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the engine's layer-decayed groups and the rest (heads, a mask token) at full lr;
    warmup + cosine schedule."""
    o = job.optim
    lr = base_lr(job, workers)
    groups = model.engine.param_groups(lr, o.weight_decay, o.layer_decay, o.patch_embed_lr_mult)
    seen = {id(p) for g in groups for p in g["params"]}
    rest = [p for p in model.parameters() if id(p) not in seen and p.requires_grad]
    if rest:
        groups.append({"params": rest, "lr": lr, "weight_decay": o.weight_decay})
    for g in groups:
        g.setdefault("initial_lr", g["lr"])
        g.setdefault("initial_weight_decay", g["weight_decay"])
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=o.betas, weight_decay=o.weight_decay)
    steps = job.train.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, o.warmup_steps, steps, o.min_lr_ratio)
    )
    return optimizer, scheduler


def schedule_weight_decay(optimizer: Any, job: WorkerJob, progress: float) -> None:
    """``optim.weight_decay`` -> ``optim.weight_decay_end`` on a cosine (each group keeps its own
    share: groups without decay stay at 0); nothing when no end is set."""
    o = job.optim
    if o.weight_decay_end is None or o.weight_decay <= 0:
        return
    from pathray.models.dinov2 import weight_decay_schedule

    factor = weight_decay_schedule(progress, o.weight_decay, o.weight_decay_end) / o.weight_decay
    for group in optimizer.param_groups:
        group["weight_decay"] = group["initial_weight_decay"] * factor


def optimizer_step(learner: Learner, optimizer: Any, scheduler: Any, job: WorkerJob, step: int) -> None:
    """One optimizer step once the gradients are in: the learner's pre-step hook (frozen last
    layers), gradient clipping, the update, the lr and weight-decay schedules, then the learner's
    post-step work (the teacher's EMA) at this step's progress."""
    steps = max(1, job.train.steps)
    learner.before_step(step)
    if job.optim.clip_grad:
        nn.utils.clip_grad_norm_(learner.trainable.parameters(), job.optim.clip_grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    schedule_weight_decay(optimizer, job, (step + 1) / steps)
    learner.after_step(step / steps)


def weights_digest(model: nn.Module) -> str:
    """A digest of the full parameters (sharded ones gathered: every rank calls it). BatchNorm
    running statistics are left out: each rank updates its own in the forward pass."""
    h = hashlib.sha256()
    for name, tensor in sorted(full_parameters(model), key=lambda item: item[0]):
        h.update(name.encode())
        h.update(tensor.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def checkpoint_payload(learner: Learner, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """Model(s), optimizer and scheduler state, full and plain (under FSDP a collective)."""
    return {
        **learner.state(),
        "optimizer": optimizer_state(learner.trainable, optimizer),
        "scheduler": scheduler.state_dict(),
    }


def save_checkpoint(directory: Path, payload: dict[str, Any], state: dict) -> None:
    torch.save({**payload, **state}, directory / "checkpoint.pt")
    (directory / "state.json").write_text(json.dumps({"step": state["step"], "epoch": state["epoch"]}))
    (directory / "history.json").write_text(json.dumps(state.get("history", []), default=float))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: build, restore, stream, step, checkpoint. ``config["job"]`` is a WorkerJob."""
    import ray.train
    import ray.train.torch

    from pathray.datasets.stream import tile_collate
    from pathray.training.evaluate import load_checkpoint

    job: WorkerJob = config["job"]
    val = Validation(ray.get(config["val"])) if config.get("val") is not None else None
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(job.train.seed)  # identical initial weights on every rank
    learner = build_learner(job)  # engine.finetune applied: only what trains needs gradients
    learner.prepare(job.scale.strategy)
    device = ray.train.torch.get_device()
    workers = ray.train.get_context().get_world_size()
    optimizer, scheduler = build_optimizer(unwrap(learner.trainable), job, workers)
    state = {"step": 0, "epoch": 0}
    history: list[dict[str, Any]] = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            saved = load_checkpoint(d)
        learner.load(saved)
        load_optimizer_state(learner.trainable, optimizer, saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = {"step": int(saved["step"]), "epoch": int(saved["epoch"])}
        history = list(saved["history"])
    elif config.get("init") is not None:  # train.init_from: another run's weights, a fresh optimizer
        learner.load(fit_positions(learner, ray.get(config["init"])))
    if val is not None:
        val.restore(history)
        # an SSL run's baseline: its initial weights (not when sharded: FSDP's first forward must
        # go through the root module, which a training step does)
        if not history and not learner.selects_checkpoint and not is_sharded(learner.trainable):
            history.append({"step": 0, **val.score(learner, job, rank, baseline=True)})
    bf16 = device.type == "cuda" and job.scale.precision == "bf16"
    steps, accum = job.train.steps, job.optim.grad_accum
    shard = ray.train.get_dataset_shard("train")
    t_data = t_step = 0.0
    first_step = state["step"]  # steps/s count this process's steps, not a restored run's
    losses: list[float] = []
    window = learner.task.metrics()  # training metrics over the steps since the last report
    micro = 0
    learner.trainable.train()
    while state["step"] < steps and not state.get("stopped"):
        delivered = False
        tick = time.perf_counter()
        for batch in shard.iter_torch_batches(
            batch_size=job.train.batch_size,
            collate_fn=tile_collate(device),  # packed tiles (data.stream.decode: device) decode there
            local_shuffle_buffer_size=job.train.shuffle_buffer or None,
            drop_last=True,
        ):
            delivered = True
            t_data += time.perf_counter() - tick
            start = time.perf_counter()
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            progress = state["step"] / max(1, steps)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss, outputs = learner.loss(batch, progress)
            (loss / accum).backward()
            with torch.no_grad():
                window.update(detach(outputs), batch)
            micro += 1
            if micro % accum == 0:
                optimizer_step(learner, optimizer, scheduler, job, state["step"])
                state["step"] += 1
                state["epoch"] = int(batch["epoch"].max()) if "epoch" in batch else state["epoch"]
                losses.append(float(loss.detach()))
            t_step += time.perf_counter() - start
            if micro % accum == 0:
                timing = {"data": t_data, "step": t_step, "steps": state["step"] - first_step}
                if _after_optimizer_step(
                    job, learner, optimizer, scheduler, state, losses, window, history, timing, rank, val
                ):
                    window = learner.task.metrics()
                if state["step"] >= steps or state.get("stopped"):
                    break
            tick = time.perf_counter()
        if not delivered:
            raise RuntimeError("the training stream delivered no tiles: check the manifest's train split")


def _after_optimizer_step(
    job: WorkerJob,
    learner: Learner,
    optimizer: Any,
    scheduler: Any,
    state: dict,
    losses: list[float],
    window: Any,
    history: list[dict[str, Any]],
    timing: dict[str, float],
    rank: int,
    val: Validation | None = None,
) -> bool:
    """Report every ``log_every`` steps, checkpoint every ``checkpoint_every`` and at the end; score
    the val tiles at each checkpoint (and stop early when ``train.early_stop_patience`` says so).

    Returns whether it reported (the caller then starts a new metric window).
    """
    import ray.train

    step = state["step"]
    if job.train.fail_at_step is not None and step == job.train.fail_at_step:
        _fail_once(job, rank)
    checkpointing = step % job.run.checkpoint_every == 0 or step >= job.train.steps
    every = [job.run.log_every, job.train.eval_every or job.run.log_every]
    if not checkpointing and all(step % n != 0 for n in every):
        return False
    busy = timing["data"] + timing["step"]
    steps_per_s = timing.get("steps", step) / max(1e-9, busy)
    workers = ray.train.get_context().get_world_size()
    metrics = {
        "step": step,
        "epoch": state["epoch"],
        "loss": sum(losses) / max(1, len(losses)),
        "lr": float(scheduler.get_last_lr()[0]),
        "data_wait_share": timing["data"] / max(1e-9, busy),
        "steps_per_s": steps_per_s,
        "tiles_per_s": steps_per_s * job.train.batch_size * job.optim.grad_accum * workers,
        "eta_s": (job.train.steps - step) / max(1e-9, steps_per_s),
        "params_local_share": local_share(learner.trainable),
        # the training window's metrics; loss parts ("loss/dino", "loss/ibot", ...) under their own names
        **{(k if k.startswith("loss/") else f"train/{k}"): float(v) for k, v in window.compute().items()},
    }
    evaluating = checkpointing or (job.train.eval_every is not None and step % job.train.eval_every == 0)
    if evaluating and val is not None:
        metrics.update(val.score(learner, job, rank))
        if learner.selects_checkpoint and val.stale >= (job.train.early_stop_patience or math.inf):
            state["stopped"] = True
            metrics["stopped_early"] = 1.0
    history.append(metrics)
    losses.clear()
    if rank == 0:
        write_history(job, history)
    if checkpointing:
        _report_with_checkpoint(
            job, learner, optimizer, scheduler, {**state, "history": history}, metrics, rank
        )
    else:
        ray.train.report(metrics)
    return True


class Validation:
    """The val tiles (fixed, unaugmented batches the driver drew once) and the best score so far.

    Every rank keeps the same record: rank 0 scores (all ranks, when the model is sharded, since
    its forward is a collective) and the score is broadcast. An SSL run's scores (RankMe, ODCorr,
    probes) choose no checkpoint; they watch for collapse: RankMe below ``collapse_fraction`` of
    its peak is warned of and recorded as ``ssl/collapse_warning``.
    """

    KEY = "val/score"
    RANKME = "ssl/rankme"

    def __init__(self, batches: list[dict[str, Any]]) -> None:
        self.batches = batches
        self.best = -math.inf
        self.stale = 0  # scores since the best one
        self.peak_rankme = -math.inf

    def restore(self, history: list[dict[str, Any]]) -> None:
        """Best score, staleness and peak RankMe of a restored run, from its history."""
        for row in history:
            if self.KEY in row:
                self._record(float(row[self.KEY]))
            if self.RANKME in row and row.get("step") and not math.isnan(float(row[self.RANKME])):
                self.peak_rankme = max(self.peak_rankme, float(row[self.RANKME]))

    def _record(self, score: float) -> None:
        if score > self.best:
            self.best, self.stale = score, 0
        else:
            self.stale += 1

    def score(self, learner: Learner, job: WorkerJob, rank: int, baseline: bool = False) -> dict[str, float]:
        """``val/<metric>`` of every task metric, and ``val/score``: the task's score (-1 when it is
        NaN, so a checkpoint that scored nothing ranks last)."""
        import ray.train.torch

        device = ray.train.torch.get_device()
        scores: dict[str, float] = {}
        if rank == 0 or is_sharded(learner.trainable):
            scores = learner.validate(self.batches, device)
        if not learner.selects_checkpoint:
            scores = {f"{learner.val_prefix}{k}": v for k, v in scores.items()}
            return scores if baseline else self.watch(scores, job)
        value = scores.get(job.task.score, math.nan)
        value = _broadcast(-1.0 if math.isnan(value) else value, device)
        self._record(value)
        return {**{f"val/{k}": v for k, v in scores.items()}, self.KEY: value}

    def watch(self, scores: dict[str, float], job: WorkerJob) -> dict[str, float]:
        """SSL scores, with a collapse warning when RankMe has fallen below its share of the peak
        since training began (the initial weights' RankMe, often high by chance, is no peak)."""
        rankme = scores.get(self.RANKME, math.nan)
        if math.isnan(rankme):
            return scores
        self.peak_rankme = max(self.peak_rankme, rankme)
        fraction = float(getattr(job.task.config, "collapse_fraction", 0.0))
        collapsing = rankme < fraction * self.peak_rankme
        if collapsing:
            log.warning(
                "collapse warning: RankMe %.1f is below %.0f %% of its peak %.1f (teacher temperature, "
                "momentum, lr or the regulariser need a look)",
                rankme,
                100 * fraction,
                self.peak_rankme,
            )
        return {**scores, "ssl/collapse_warning": float(collapsing)}


def _broadcast(value: float, device: Any) -> float:
    """Rank 0's ``value`` on every rank (itself when there is no process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t.item())


def write_history(job: WorkerJob, history: list[dict[str, Any]]) -> None:
    """``history.jsonl`` of the run so far, rewritten at every report (an object store appends
    nothing): a run that dies keeps what it reported, and ``pathray train`` shows it as it grows."""
    rows = "".join(json.dumps(row, default=float) + "\n" for row in history)
    run_dir = join_uri(job.run.storage_path, str(job.run.name))
    try:
        write_text(join_uri(run_dir, HISTORY_FILE), rows, job.storage)
    except StorageError as exc:  # progress is worth a warning, never the run
        log.warning("cannot write %s: %s", HISTORY_FILE, exc)


def _fail_once(job: WorkerJob, rank: int) -> None:
    """Testing aid: SIGKILL this worker's own process, once per run (a marker file remembers)."""
    if rank != job.train.fail_rank:
        return
    marker = Path(tempfile.gettempdir()) / f"pathray-failed-{job.run.name}"
    if marker.exists():
        return
    marker.write_text("killed")
    os.kill(os.getpid(), signal.SIGKILL)


def _report_with_checkpoint(
    job: WorkerJob, learner: Learner, optimizer: Any, scheduler: Any, state: dict, metrics: dict, rank: int
) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if job.train.weights_digest:
            digest = weights_digest(unwrap(learner.trainable))
            metrics = {**metrics, "weights_digest": digest}
            run_dir = join_uri(job.run.storage_path, str(job.run.name))
            write_text(join_uri(run_dir, f"digests/step{state['step']}_rank{rank}.txt"), digest, job.storage)
        sharded = is_sharded(learner.trainable)
        # FSDP gathers the full state on rank 0 from every rank; DDP ranks all hold it already
        payload = checkpoint_payload(learner, optimizer, scheduler) if rank == 0 or sharded else {}
        if rank == 0:
            extra = {"job": job.record(), "strategy": job.scale.strategy}
            save_checkpoint(Path(tmp), payload, {**state, **extra})
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)
