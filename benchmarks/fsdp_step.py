"""FSDP train steps of a foundation preset, Ray-free: the training loop's model, shards and optimizer.

    python benchmarks/fsdp_step.py --gpu --preset h_optimus_0                 # 1 GPU, bf16 autocast
    python benchmarks/fsdp_step.py --ranks 2 --preset uni2_h --size 28 --batch 1 --steps 1
    python benchmarks/fsdp_step.py --ranks 2 --preset h_optimus_0 --depth 2   # ViT-g blocks, 2 deep

Each rank (a ``torch.distributed`` process: gloo on CPU, NCCL on CUDA) builds the segmentation
model of ``engine.preset`` exactly as a Ray Train worker does (``build_model``, same seed on every
rank, RANDOM weights), shards it with ``pathray.training.parallel.shard_model`` (FSDP2: one unit
per transformer block, the decoder, the root; also with one rank, so a single GPU runs the FSDP
code path), builds the loop's AdamW (``build_optimizer``: layer decay, warmup + cosine) and times
``--steps`` optimizer steps on random uint8 tiles after ``--warmup`` untimed ones, with the loop's
bf16 autocast and gradient clipping. Nothing here imports Ray (checked at the end), so a GPU box
needs torch, timm and pydantic only.

CPU memory: every rank first builds the whole model (4 bytes a parameter), then holds its shard
of the parameters, gradients and AdamW's two moments (16 bytes a parameter over the ranks). glibc
keeps freed temporaries of up to 32 MB in its heap unless told otherwise: CPU ranks start with
``MALLOC_MMAP_THRESHOLD_=1048576`` (unless set), which returns them to the system (uni2_h over 2
ranks: 11.5 GiB instead of over 14). ``--max-rss-gb`` stops the run when the ranks together hold
more.

Last line: ``fsdp_step preset=X ranks=N ... images_per_s=Y``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from types import SimpleNamespace
from typing import Any

CLASSES = ["Background", "Benign", "G3", "G4", "G5"]


def rank_main(rank: int, args: argparse.Namespace, port: int, out: Any) -> None:
    """One rank: build, shard, step; rank 0 puts its row on ``out``."""
    import resource

    import torch
    import torch.distributed as dist

    from pathray.models.config import EngineConfig
    from pathray.models.foundation import random_init_expected
    from pathray.models.task_model import build_model
    from pathray.models.tasks import SegmentationConfig
    from pathray.training.config import OptimConfig
    from pathray.training.loop import build_optimizer
    from pathray.training.parallel import local_share, shard_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if args.gpu:
        torch.cuda.set_device(rank)
    device = torch.device(f"cuda:{rank}" if args.gpu else "cpu")
    dist.init_process_group("nccl" if args.gpu else "gloo", rank=rank, world_size=args.ranks)
    try:
        torch.manual_seed(0)  # identical initial weights on every rank, as in the training loop
        engine = EngineConfig(
            name="foundation",
            preset=args.preset,
            img_size=args.size,
            model_kwargs={"depth": args.depth} if args.depth else {},
            grad_checkpointing=args.grad_checkpointing,
        )
        t0 = time.perf_counter()
        with torch.device(device), random_init_expected():
            model, task = build_model(engine, SegmentationConfig(classes=CLASSES))
        build_s = time.perf_counter() - t0
        params = sum(p.numel() for p in model.parameters())
        shard_model(model)
        share = local_share(model)
        optim = OptimConfig(warmup_steps=1)
        optimizer, scheduler = build_optimizer(
            model, SimpleNamespace(optim=optim, train=SimpleNamespace(steps=args.warmup + args.steps))
        )
        gen = torch.Generator().manual_seed(1 + rank)  # each rank its own half of the global batch
        shape = (args.batch, args.size, args.size)
        images = torch.randint(0, 256, (*shape, 3), dtype=torch.uint8, generator=gen).to(device)
        batch = {"image": images, "target": torch.randint(0, len(CLASSES), shape, generator=gen).to(device)}
        losses, times = [], []
        model.train()
        for _ in range(args.warmup + args.steps):
            if args.gpu:
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.gpu):
                loss = task.loss(model(batch["image"]), batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.clip_grad or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            losses.append(float(loss.detach()))
            if args.gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        timed = sorted(times[args.warmup :])
        step_s = timed[len(timed) // 2]
        row = {
            "preset": args.preset,
            "depth": args.depth or "full",
            "ranks": args.ranks,
            "device": torch.cuda.get_device_name()
            if args.gpu
            else f"cpu ({torch.get_num_threads()} threads)",
            "size": args.size,
            "batch_per_rank": args.batch,
            "params_m": params / 1e6,
            "local_share": share,
            "build_s": build_s,
            "first_step_s": times[0],
            "step_s": step_s,
            "images_per_s": args.batch * args.ranks / step_s,
            "losses": losses,
            "peak_gib": (
                torch.cuda.max_memory_allocated() / 2**30
                if args.gpu
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB, this rank
            ),
            "ray_imported": any(m == "ray" or m.startswith("ray.") for m in sys.modules),
        }
        if rank == 0:
            out.put(row)
    finally:
        dist.destroy_process_group()


def rss_gib(pid: int) -> float:
    """Resident memory of a process in GiB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0.0
    return kib / 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="h_optimus_0", help="a foundation preset (pathray models list)")
    parser.add_argument("--gpu", action="store_true", help="CUDA + NCCL, bf16 autocast (default: CPU, gloo)")
    parser.add_argument("--ranks", type=int, default=1, help="processes (GPU: one per device)")
    parser.add_argument("--depth", type=int, default=0, help="blocks to build (0: the preset's own)")
    parser.add_argument("--size", type=int, default=224, help="tile side in px")
    parser.add_argument("--batch", type=int, default=None, help="tiles per rank and step (GPU 32, CPU 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps (GPU 5, CPU 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (GPU 2, CPU 1)")
    parser.add_argument("--grad-checkpointing", action="store_true", help="engine.grad_checkpointing")
    parser.add_argument("--max-rss-gb", type=float, default=14.0, help="CPU: stop above this RSS (all ranks)")
    args = parser.parse_args(argv)
    args.batch = args.batch or (32 if args.gpu else 2)
    args.steps = args.steps or (5 if args.gpu else 1)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.gpu else 1)

    import torch
    import torch.multiprocessing as mp

    if args.gpu and torch.cuda.device_count() < args.ranks:
        parser.error(f"--gpu --ranks {args.ranks}: torch sees {torch.cuda.device_count()} CUDA devices")
    if not args.gpu:  # read by glibc when a rank's process starts
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=rank_main, args=(r, args, port, out), daemon=True) for r in range(args.ranks)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    peak_rss, row, stopped = 0.0, None, ""
    while any(p.is_alive() for p in procs) and row is None:
        total = sum(rss_gib(p.pid) for p in procs if p.pid is not None)
        peak_rss = max(peak_rss, total)
        if not args.gpu and total > args.max_rss_gb:
            stopped = f"stopped: the ranks held {total:.1f} GiB > --max-rss-gb {args.max_rss_gb}"
            for p in procs:
                p.kill()
            break
        try:
            row = out.get(timeout=0.5)
        except Exception:  # queue.Empty: keep watching
            pass
    for p in procs:
        p.join(timeout=120)
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    if row is None or failed or stopped:
        print(stopped or f"fsdp_step failed: rank exit codes {[p.exitcode for p in procs]}", flush=True)
        print(f"fsdp_step preset={args.preset} ranks={args.ranks} FAILED peak_rss_gib={peak_rss:.2f}")
        return 1
    row["wall_s"] = time.perf_counter() - t0
    row["peak_rss_gib_all_ranks"] = peak_rss  # sampled every 0.5 s by this process
    print(json.dumps(row, default=float), flush=True)
    print(
        f"fsdp_step preset={row['preset']} depth={row['depth']} ranks={row['ranks']} size={row['size']} "
        f"batch_per_rank={row['batch_per_rank']} params_m={row['params_m']:.1f} "
        f"local_share={row['local_share']:.3f} step_s={row['step_s']:.3f} "
        f"images_per_s={row['images_per_s']:.2f} peak_gib={row['peak_gib']:.2f} "
        f"ray_imported={'YES' if row['ray_imported'] else 'no'}"
    )
    return 1 if row["ray_imported"] else 0


if __name__ == "__main__":
    sys.exit(main())
