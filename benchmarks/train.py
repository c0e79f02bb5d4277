"""Training steps/s and the share of step time spent waiting for data, per project; inference images/s.

    python benchmarks/train.py                                   # CPU: the Ray Data stream feeds the steps
    python benchmarks/train.py --steps 5 --warmup 1 --batch 4    # a quick look
    python benchmarks/train.py --device cpu --no-ray             # the Ray-free feed of a GPU box, on CPU
    python benchmarks/train.py --device cuda --engines dinov2 cnn    # the GPU suite's train_data_wait
    python benchmarks/train.py --device cuda --gpu-steps 0       # inference only: cnn_vs_foundation_infer

Each project (``foundation``: Gleason segmentation on ViT-S/16, ``cnn``: on the ResNet-50 U-Net,
``dinov2``: DINOv2 pretraining of a ViT-S/16 on 2x224 + 8x96 DINO crops; ``--engines``/``--models``
change them) is built from its YAML in ``configs/`` by the training code (``build_learner``,
``build_optimizer``) and trained in this process, without Ray Train, on tiles cut from a few
synthetic slides. On CPU the tiles come from the real Ray Data stream
(``build_tile_dataset(...).iter_torch_batches``, local Ray with ``--ray-cpus``); on a GPU, or with
``--no-ray``, from ``pathray.training.feed.ProcessFeed``: ``--producers`` processes run the stream's
own reading code (``sample_slide`` then ``TileReader``, augmentation and multi-crop included) into
shared slots, and a loader thread moves each batch through pinned memory onto the device, so the
step never copies. A step is the training loop's (autocast, loss, backward, the learner's
before/after-step hooks such as the DINO teacher's EMA, clipping, AdamW, the lr and weight-decay
schedules, the loss read back). The data-wait share is the time the loop is blocked on the next
batch over the wall time of the timed steps. Inference is the model alone (engine + head, eval,
no_grad) on the same random tiles for every supervised project, median of ``--iters`` batches; on a
GPU in bf16 autocast. torch keeps its default threads: on CPU they share the cores with the readers.

Ray-free with ``--no-ray`` or on a GPU, and fine without tiffslide or imagecodecs (the GPU suite's
image): the slides are then JPEG-encoded by PIL and read by the tifffile backend.

A line per trained project: ``train_data_wait=X engine=E ...``; a line per device:
``cnn_vs_foundation_infer=Y`` (cnn seconds per batch over foundation's: above 1, the CNN is the
slower). Last line: ``data_wait_share=X cnn_vs_foundation_infer=Y`` on the best device measured (the
GPU if any), X the largest data-wait share of any project.
"""

from __future__ import annotations

import argparse
import importlib
import io
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parent / "configs"
PROJECTS = {"dinov2": "dinov2-pretrain.yaml"}  # any other name: gleason-<engine>.yaml


def slim_image_fallbacks() -> None:
    """What a box without imagecodecs (the GPU suite's image) needs to write the synthetic slides:
    tifffile's JPEG encoder is PIL's (``open_slide`` itself reads TIFFs with the tifffile backend
    where tiffslide is missing). Nothing changes where imagecodecs is installed."""
    import tifffile

    try:
        tifffile.TIFF.COMPRESSORS[7]
    except KeyError:  # no imagecodecs: encode tiles and strips with PIL
        import numpy as np
        from PIL import Image

        def encode(data: Any, level: int | None = None, **_: Any) -> bytes:
            pixels = np.asarray(data)
            pixels = pixels.reshape(pixels.shape[-3:]) if pixels.ndim > 3 else pixels
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="JPEG", quality=level or 85)
            return buf.getvalue()

        tifffile.TIFF.COMPRESSORS._codecs[7] = encode


def write_slides(workdir: Path, n: int, size: int) -> Path:
    """Synthetic slides (seed 0), every one in ``train``; reused when present."""
    from pathray.datasets.manifest import write_synthetic_dataset

    t0 = time.perf_counter()
    path = write_synthetic_dataset(
        workdir / f"train_{n}x{size}", n, size, fractions={"train": 1.0}, reuse=True
    )
    print(f"{n} slides of {size}^2 px in {path.parent} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return path


def engine_config(engine: str, model: str | None, size: int, batch: int, args: argparse.Namespace) -> Any:
    """The project config of ``engine`` (its YAML, so the engine defaults apply) at ``size`` px."""
    from pathray.config import load_config

    path = CONFIGS / PROJECTS.get(engine, f"gleason-{engine}.yaml")
    overrides = [f"train.batch_size={batch}", f"engine.img_size={size}"]
    if engine in PROJECTS:  # DINO crops of ``size`` and ``--local-size`` px, cut from tiles 8/7 as large
        overrides += [
            f"data.stream.augment.global_size={size}",
            f"data.stream.augment.local_size={args.local_size}",
            f"data.stream.sampler.size={size + size // 7}",
            "task.freeze_last_layer_steps=0",  # steady-state steps: every head layer updates
        ]
        if args.out_dim:
            overrides.append(f"task.out_dim={args.out_dim}")
    else:
        overrides += [f"engine.name={engine}", f"data.stream.sampler.size={size}"]
        if not path.exists():  # e.g. debug engines: the foundation project with the engine swapped
            path = CONFIGS / "gleason-foundation.yaml"
            overrides.append("engine.model=null")
    if engine not in PROJECTS:  # one image a tile: packed tiles decoded on the device when asked
        decode = args.decode if args.decode != "auto" else ("device" if args.device_type == "cuda" else "cpu")
        overrides.append(f"data.stream.decode={decode}")
    if model:
        overrides.append(f"engine.model={model}")
    if args.depth and engine != "cnn":
        overrides.append(f"engine.model_kwargs.depth={args.depth}")
    return load_config(path, overrides)


def ray_batches(manifest: Any, cfg: Any, batch: int) -> Iterator[dict[str, Any]]:
    """Batches from the Ray Data tile stream, as the training loop iterates its shard (epoch after epoch)."""
    from pathray.datasets.stream import build_tile_dataset, tile_collate

    epoch = 0
    while True:
        ds = build_tile_dataset(
            manifest,
            cfg.data.stream,
            cfg.task_spec(),
            cfg.storage,
            split=cfg.data.split,
            epoch=epoch,
            tissue=cfg.tissue,
        )
        delivered = False
        for item in ds.iter_torch_batches(
            batch_size=batch,
            collate_fn=tile_collate(),
            local_shuffle_buffer_size=cfg.train.shuffle_buffer or None,
            drop_last=True,
        ):
            delivered = True
            yield item
        if not delivered:
            raise RuntimeError("the tile stream delivered no batch: check the slides and the sampler")
        epoch += 1


@dataclass
class Row:
    engine: str
    model: str
    device: str
    feed: str = "-"
    batch: int = 0
    steps_s: float = math.nan
    images_s: float = math.nan
    wait_share: float = math.nan
    infer_batch: int = 0
    infer_s: float = math.nan  # median seconds per inference batch


def move_learner(learner: Any, device: Any) -> None:
    """The learner's modules onto ``device`` (a DINO learner's teacher and objective too), as
    ``learner.prepare`` would without importing Ray."""
    for name in ("model", "teacher", "objective"):
        module = getattr(learner, name, None)
        if module is not None:
            module.to(device)


def time_training(learner: Any, cfg: Any, batches: Any, device: Any, warmup: int, steps: int) -> tuple:
    """The training loop's step over ``warmup + steps`` batches; returns (wall s, data-wait s) of the
    last ``steps``."""
    import torch

    from pathray.training.learners import WorkerJob, detach
    from pathray.training.loop import build_optimizer, schedule_weight_decay

    job = WorkerJob.from_project(cfg)
    optimizer, scheduler = build_optimizer(learner.model, job)
    bf16 = device.type == "cuda" and cfg.scale.precision == "bf16"
    window = learner.task.metrics()
    learner.trainable.train()
    total, wait = warmup + steps, 0.0
    start = tick = time.perf_counter()
    for i in range(total):
        batch = next(batches)
        got = time.perf_counter()
        if i == warmup:
            start, wait = tick, 0.0
        wait += got - tick
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, outputs = learner.loss(batch, i / total)
        loss.backward()
        with torch.no_grad():
            window.update(detach(outputs), batch)
        learner.before_step(i)
        if cfg.optim.clip_grad:
            torch.nn.utils.clip_grad_norm_(learner.trainable.parameters(), cfg.optim.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        schedule_weight_decay(optimizer, job, (i + 1) / total)
        learner.after_step(i / total)
        float(loss.detach())  # the loop reads the loss back every step (a device sync)
        tick = time.perf_counter()
    return tick - start, wait


def time_inference(model: Any, batch: int, size: int, device: Any, warmup: int, iters: int) -> float:
    """Median seconds per forward pass of ``batch`` random uint8 tiles (bf16 autocast on CUDA)."""
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    model.eval()
    gen = torch.Generator().manual_seed(0)  # the same tiles for every project
    x = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=gen).to(device)
    times = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for i in range(warmup + iters):
            sync()
            t0 = time.perf_counter()
            model(x)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_device(name: str, args: argparse.Namespace, manifest: Any, n_slides: int) -> list[Row]:
    """Inference of every supervised project first (a quiet device), then training fed by Ray Data
    or producers."""
    import torch

    from pathray.models.foundation import random_init_expected
    from pathray.training.learners import WorkerJob, build_learner

    device = torch.device(name)
    gpu = device.type == "cuda"
    batch, steps, warmup = (
        (args.gpu_batch, args.gpu_steps, args.gpu_warmup) if gpu else (args.batch, args.steps, args.warmup)
    )
    use_ray = not gpu and args.ray
    producers = args.producers or max(1, (os.cpu_count() or 2) - 2)
    built = []
    args.device_type = device.type
    for engine, model in zip(args.engines, args.models, strict=True):
        cfg = engine_config(engine, model, args.size, batch, args)
        # one epoch of the stream covers the run (Ray's local shuffle buffer fills first); else it goes on
        tiles = (warmup + steps + 1) * batch + (cfg.train.shuffle_buffer if use_ray else 0)
        cfg.data.stream.sampler.tiles_per_slide = math.ceil(1.25 * tiles / max(1, n_slides))
        torch.manual_seed(0)
        with random_init_expected():
            learner = build_learner(WorkerJob.from_project(cfg))
        move_learner(learner, device)
        row = Row(engine, cfg.engine.model or "(default)", name, infer_batch=batch)
        if cfg.task.name != "ssl":
            row.infer_s = time_inference(
                learner.model, batch, args.size, device, args.infer_warmup, args.iters
            )
            print(f"{name} {engine}: inference {batch / row.infer_s:.1f} images/s", flush=True)
        built.append((row, cfg, learner))
    if steps <= 0:
        return [row for row, _, _ in built]
    if use_ray:
        from pathray.cluster.ray_local import ensure_ray

        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        ensure_ray(num_cpus=args.ray_cpus, log_to_driver=False)
        # after ray's import, which installs its own filter: the training loop passes a function too
        warnings.filterwarnings("ignore", message="Passing a function to `iter_torch_batches")
    for row, cfg, learner in built:
        if use_ray:
            feed: Any = ray_batches(manifest, cfg, batch)
            row.feed = f"ray_data_{args.ray_cpus}_cpus"
        else:
            from pathray.training.feed import ProcessFeed

            feed = ProcessFeed(manifest, cfg, batch, producers, device, timeout=args.data_timeout)
            row.feed = f"{producers}_process{'es' if producers > 1 else ''}"
        row.feed += "+device_decode" if cfg.data.stream.decode == "device" else ""
        try:
            wall, wait = time_training(learner, cfg, feed, device, warmup, steps)
        finally:
            feed.close()
        row.batch, row.steps_s = batch, steps / wall
        row.images_s, row.wait_share = row.steps_s * batch, wait / wall
        print(f"{name} {row.engine}: {row.steps_s:.2f} steps/s, data wait {row.wait_share:.1%}", flush=True)
        move_learner(learner, "cpu")
        if gpu:
            torch.cuda.empty_cache()
    if use_ray:
        ray = importlib.import_module("ray")
        ray.shutdown()
    return [row for row, _, _ in built]


def ray_available() -> bool:
    """Whether Ray imports (a package that is there but fails to import counts as missing)."""
    try:
        importlib.import_module("ray")
    except ImportError:
        return False
    return True


def infer_ratio(rows: list[Row]) -> float:
    times = {r.engine: r.infer_s for r in rows}
    return times["cnn"] / times["foundation"] if {"cnn", "foundation"} <= times.keys() else math.nan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--engines", nargs="+", default=["foundation", "cnn"], help="foundation, cnn, dinov2 or an engine"
    )
    parser.add_argument("--models", nargs="+", default=None, help="timm model per engine (default: YAML)")
    parser.add_argument("--size", type=int, default=224, help="tile side in px (training and inference)")
    parser.add_argument("--local-size", type=int, default=96, help="dinov2: local crop side in px")
    parser.add_argument("--depth", type=int, default=0, help="ViT blocks (0: the model's; 1: a dry run)")
    parser.add_argument("--out-dim", type=int, default=0, help="dinov2: prototypes (0: the YAML's 65536)")
    parser.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CPU, and the GPU if any"
    )
    parser.add_argument("--batch", type=int, default=4, help="CPU batch (training and inference)")
    parser.add_argument("--steps", type=int, default=10, help="timed CPU training steps (0: inference only)")
    parser.add_argument("--warmup", type=int, default=2, help="CPU training steps before timing")
    parser.add_argument("--gpu-batch", type=int, default=64)
    parser.add_argument("--gpu-steps", type=int, default=50, help="timed GPU steps (0: inference only)")
    parser.add_argument("--gpu-warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=10, help="timed inference batches (median)")
    parser.add_argument("--infer-warmup", type=int, default=3)
    parser.add_argument("--no-ray", dest="ray", action="store_false", help="feed CPU training by producers")
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument(
        "--producers", type=int, default=0, help="Ray-free feed: producers (0: all CPUs but two)"
    )
    parser.add_argument(
        "--decode",
        choices=["auto", "cpu", "device"],
        default="auto",
        help="supervised projects: where tiles are decoded (data.stream.decode; auto: device on a GPU)",
    )
    parser.add_argument("--data-timeout", type=float, default=300.0, help="longest wait for one batch, s")
    parser.add_argument("--slides", type=int, default=4)
    parser.add_argument("--slide-size", type=int, default=4096)
    parser.add_argument("--workdir", type=Path, default=Path(".bench"))
    args = parser.parse_args(argv)
    args.models = args.models or [None] * len(args.engines)
    if len(args.models) != len(args.engines):
        parser.error(f"--models names {len(args.models)} models for {len(args.engines)} engines")

    import torch

    from pathray.datasets.manifest import load_manifest

    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        parser.error("--device cuda: torch sees no GPU")
    if args.ray and not ray_available():
        print("ray is not installed: CPU training is fed by producers, as with --no-ray")
        args.ray = False
    slim_image_fallbacks()
    devices = {"auto": ["cpu", "cuda"] if cuda else ["cpu"], "cpu": ["cpu"], "cuda": ["cuda"]}[args.device]
    trains = any((args.gpu_steps if d == "cuda" else args.steps) > 0 for d in devices)
    manifest = load_manifest(write_slides(args.workdir, args.slides, args.slide_size)) if trains else None
    n_slides = len(manifest) if manifest is not None else 0
    rows = [row for name in devices for row in bench_device(name, args, manifest, n_slides)]

    gpu_name = f", {torch.cuda.get_device_name()}" if "cuda" in devices else ""
    print(
        f"\n{n_slides} synthetic slides of {args.slide_size}^2 px, {args.size} px tiles (engine mpp); "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads on {os.cpu_count()} CPUs{gpu_name}; "
        "GPU rows in bf16"
    )
    print(
        f"{'engine':11s} {'model':22s} {'device':6s} {'feed':18s} {'batch':>5s} {'steps/s':>8s} "
        f"{'images/s':>9s} {'data wait':>9s} {'infer img/s':>11s}"
    )
    for r in rows:
        print(
            f"{r.engine:11s} {r.model:22s} {r.device:6s} {r.feed:18s} {r.batch:5d} {r.steps_s:8.2f} "
            f"{r.images_s:9.1f} {r.wait_share:9.1%} {r.infer_batch / r.infer_s:11.1f}"
        )
    for r in rows:
        if not math.isnan(r.wait_share):
            print(
                f"train_data_wait={r.wait_share:.3f} engine={r.engine} model={r.model} device={r.device} "
                f"feed={r.feed} batch={r.batch} steps_per_s={r.steps_s:.2f} images_per_s={r.images_s:.1f}"
            )
    best = [r for r in rows if r.device == devices[-1]]
    for name in devices:
        print(f"{name}: cnn_vs_foundation_infer={infer_ratio([r for r in rows if r.device == name]):.2f}")
    worst = max((r.wait_share for r in best if not math.isnan(r.wait_share)), default=math.nan)
    print(f"data_wait_share={worst:.3f} cnn_vs_foundation_infer={infer_ratio(best):.2f}")
    return 0


if __name__ == "__mp_main__":  # a ProcessFeed producer runs this file under that name: read as we do
    slim_image_fallbacks()

if __name__ == "__main__":
    sys.exit(main())
