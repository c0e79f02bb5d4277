"""DINOv2 pretraining steps of a ViT-S/16 on 2 global + 8 local crops, Ray-free: images/s per worker.

    python benchmarks/ssl_pretrain.py                   # CPU, fp32: batch 4, 4096 prototypes
    python benchmarks/ssl_pretrain.py --gpu             # CUDA, bf16 autocast: batch 32, 65536 prototypes
    python benchmarks/ssl_pretrain.py --depth 1 --size 64 --local-size 32 --batch 2 --steps 1 --out-dim 64

The project is ``configs/dinov2-pretrain.yaml`` (ViT-S/16 with 4 registers and LayerScale, drop path
0.1; DINO + iBOT + KoLeo, Sinkhorn-Knopp centring, one 3-layer head shared by DINO and iBOT), loaded
as ``pathray train`` loads it, with this script's options as overrides. Its sections become the
``WorkerJob`` a Ray Train worker receives; ``DinoV2Learner`` builds student, EMA teacher and
objective from it (RANDOM weights) and ``build_optimizer`` the loop's AdamW (layer decay, patch
embed lr 0.2x, warmup + cosine). ``learner.prepare`` is not called (it imports Ray): model, teacher
and objective are moved to the device here. Each step is the loop's: ``learner.loss`` (block masks,
teacher on the global crops, student on all, the objective) under the loop's autocast, backward,
``before_step``, gradient clipping, AdamW, the lr and weight decay schedules, ``after_step`` (teacher
EMA). ``task.freeze_last_layer_steps`` is 0, so every step is a steady-state one (the frozen first
steps skip the heads' last layers in AdamW).

Crops are random uint8 BHWC tensors already on the device: this measures compute, not data. An
image is one tile with all its crops, so images/s counts tiles, as DINOv2's batch sizes do.

Last line: ``ssl images_per_s=X per_worker device=... batch=B crops=2x224+8x96 step_s=...``, with
``--gpu`` beside DINOv2's own published throughput (``ref_*``). Nothing here imports Ray (checked).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "dinov2-pretrain.yaml"

# DINOv2's published training throughput. facebookresearch/dinov2 README, "Fast setup: training
# DINOv2 ViT-L/16 on ImageNet-1k": dinov2/configs/train/vitl16_short.yaml "on 4 A100-80GB nodes
# (32 GPUs)", "Training time is approximately 1 day". That config is ssl_default_config.yaml with
# batch_size_per_gpu 64: optim.epochs 100 x train.OFFICIAL_EPOCH_LENGTH 1250 = 125,000 iterations
# (dinov2/train/train.py: max_iter = epochs * OFFICIAL_EPOCH_LENGTH), 2 global crops of 224 px and 8
# local of 96 px, 65536 prototypes, DINO head shared with iBOT, fp16 FSDP: the recipe measured here
# but a ViT-L/16. 125,000 x 64 images per GPU / 86,400 s = ~93 images/s per A100, data loading and
# evaluation included, "approximately" one day. How it compares: per worker, the same crops and
# heads; ViT-S/16's backbone costs about 13x fewer FLOPs an image than ViT-L/16's (4.6 vs 61.6
# GMACs at 224 px, timm), but the heads (65536 prototypes, iBOT on masked patches) cost the same,
# so a ViT-S/16 should exceed 93 images/s per GPU by less than 13x on an A100; an H100 has ~3x the
# A100's dense bf16 peak. The model card's A100 hours (22,000 for ViT-g, 4,500 for the ViT-S
# distillation) give no throughput without image counts the repository does not state.
REF_GPU_IMAGES_PER_S = 100 * 1250 * 64 / 86_400
REF_SOURCE = (
    "facebookresearch/dinov2 README 'Fast setup': ViT-L/16 ImageNet-1k, 32 A100-80GB, ~1 day for "
    "100 epochs x 1250 it x 64 images/GPU (configs/ssl_default_config.yaml), 2x224+8x96 crops"
)


def overrides(args: argparse.Namespace) -> list[str]:
    """The project overrides this run's options amount to (``a.b=value``, as ``--set`` takes them)."""
    out = [
        f"engine.img_size={args.size}",
        f"data.stream.augment.global_size={args.size}",
        f"data.stream.augment.local_size={args.local_size}",
        f"data.stream.augment.global_crops={args.global_crops}",
        f"data.stream.augment.local_crops={args.local_crops}",
        f"task.out_dim={args.out_dim}",
        "task.freeze_last_layer_steps=0",
        f"train.batch_size={args.batch}",
        f"train.steps={args.warmup + args.steps}",
        "scale.workers=1",
        f"scale.use_gpu={str(args.gpu).lower()}",
    ]
    if args.depth:
        out.append(f"engine.model_kwargs.depth={args.depth}")
    return out


def synthetic_batch(augment: Any, batch: int, device: Any) -> dict[str, Any]:
    """Random uint8 (B, H, W, 3) crops under the stream's keys: ``global_0..``, ``local_0..``."""
    import torch

    gen = torch.Generator().manual_seed(1)
    views = {f"global_{i}": augment.global_size for i in range(augment.global_crops)}
    views.update({f"local_{i}": augment.local_size for i in range(augment.local_crops)})
    return {
        key: torch.randint(0, 256, (batch, side, side, 3), dtype=torch.uint8, generator=gen).to(device)
        for key, side in views.items()
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the learner and optimizer of the project, time its steps; one row of results."""
    import numpy as np
    import torch

    from pathray.models.foundation import random_init_expected
    from pathray.section import ROOT_SECTIONS, load_section
    from pathray.training.config import ProjectConfig
    from pathray.training.learners import DinoV2Learner, WorkerJob
    from pathray.training.loop import build_optimizer, optimizer_step

    device = torch.device("cuda" if args.gpu else "cpu")
    if args.gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    project = load_section(ProjectConfig, args.config, overrides(args), ignore=ROOT_SECTIONS)
    job = WorkerJob.from_project(project)
    torch.manual_seed(job.train.seed)  # as the training loop seeds every worker
    t0 = time.perf_counter()
    with random_init_expected():
        learner = DinoV2Learner(job.engine, job.task)
    learner.rng = np.random.default_rng(0)  # the same block masks every run
    for module in (learner.model, learner.teacher, learner.objective):
        module.to(device)
    optimizer, scheduler = build_optimizer(learner.model, job)
    build_s = time.perf_counter() - t0
    batch = synthetic_batch(project.data.stream.augment, args.batch, device)
    bf16 = args.gpu and job.scale.precision == "bf16"
    steps, times, losses = job.train.steps, [], []
    learner.trainable.train()
    for step in range(steps):
        if args.gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        progress = step / steps
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = learner.loss(batch, progress)
        loss.backward()
        optimizer_step(learner, optimizer, scheduler, job, step)  # the training loop's own
        losses.append(float(loss.detach()))  # a sync, as the loop's
        if args.gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        label = "warmup" if step < args.warmup else "step"
        print(f"{label} {step}: {times[-1]:.3f} s loss={losses[-1]:.4f}", flush=True)
    step_s = statistics.median(times[args.warmup :])
    a = project.data.stream.augment
    depth = len(learner.model.engine.backbone.blocks)
    return {
        "images_per_s": args.batch / step_s,
        "device": torch.cuda.get_device_name() if args.gpu else "cpu",
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "crops": f"{a.global_crops}x{a.global_size}+{a.local_crops}x{a.local_size}",
        "step_s": round(step_s, 4),
        "first_step_s": round(times[0], 4),
        "model": job.engine.model,
        "depth": depth,
        "out_dim": job.task.config.out_dim,  # type: ignore[attr-defined]
        "params_m": round(sum(p.numel() for p in learner.model.parameters()) / 1e6, 2),
        "precision": "bf16" if bf16 else "fp32",
        "build_s": round(build_s, 2),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if args.gpu else None,
        "loss_finite": bool(np.isfinite(losses).all()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="CUDA, bf16 autocast, TF32 matmuls (default: CPU)")
    parser.add_argument("--batch", type=int, default=None, help="tiles per step (GPU 32, CPU 4)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (GPU 10, CPU 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (GPU 3, CPU 1)")
    parser.add_argument("--out-dim", type=int, default=None, help="prototypes (GPU 65536, CPU 4096)")
    parser.add_argument("--size", type=int, default=224, help="global crop side, px")
    parser.add_argument("--local-size", type=int, default=96, help="local crop side, px")
    parser.add_argument("--global-crops", type=int, default=2, help="global crops a tile")
    parser.add_argument("--local-crops", type=int, default=8, help="local crops a tile")
    parser.add_argument("--depth", type=int, default=0, help="ViT blocks (0: the model's 12; 1: a dry run)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--config", type=Path, default=CONFIG, help="the DINOv2 project config")
    args = parser.parse_args(argv)
    args.batch = args.batch or (32 if args.gpu else 4)
    args.steps = args.steps or (10 if args.gpu else 1)
    args.warmup = args.warmup if args.warmup is not None else (3 if args.gpu else 1)
    args.out_dim = args.out_dim or (65536 if args.gpu else 4096)

    import torch

    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu: torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    row = run(args)
    ray_loaded = any(m == "ray" or m.startswith("ray.") for m in sys.modules)
    fields = {k: v for k, v in row.items() if k not in ("images_per_s", "device") and v is not None}
    line = f"ssl images_per_s={row['images_per_s']:.2f} per_worker device={shlex.quote(row['device'])} "
    line += " ".join(f"{k}={v}" for k, v in fields.items())
    if args.gpu:
        line += f" ref_images_per_s={REF_GPU_IMAGES_PER_S:.0f} ref_model=vit_large_patch16 ref_gpu=A100-80GB"
        line += f" ref_source={shlex.quote(REF_SOURCE)}"
    print(line + f" ray_imported={'YES' if ray_loaded else 'no'}", flush=True)
    return 1 if ray_loaded or not row["loss_finite"] else 0


if __name__ == "__main__":
    sys.exit(main())
