"""Embedding tiles from slides, Ray-free, against the model alone: how much of the model's speed it keeps.

    python benchmarks/embed_model.py --device cuda      # ViT-S/16, bf16, 224 px at 0.5 µm/px, batch 256
    python benchmarks/embed_model.py --device cpu --depth 1 --size 32 --batch 4 --batches 8 --producers 1

The pipeline is what embedding a cohort runs on a GPU worker without Ray:
``pathray.training.feed.ProcessFeed``'s producer processes run the stream's own sampling and
reading code (tissue tiles at random positions, no augmentation) from synthetic slides into shared
slots, a loader thread moves each batch through pinned memory onto the device, and one embedding
model (``task.name=embedding``: the engine's pooled embedding, ``TaskModel`` with ``EmbeddingHead``,
RANDOM weights) embeds it, in bf16 autocast on CUDA. The model alone is the same model on the same
tiles, kept on the device from the pipeline's timed batches. Before timing, the pipeline runs
``--warmup`` batches (default: as many as the feed's slots and queue hold, so the timed batches are
produced while they are timed). X = pipeline tiles/s over the model alone's (its median of
``--repeat`` runs); the loader wait is the share of the pipeline's time spent blocked on the next
batch. Needs no tiffslide or imagecodecs (see ``benchmarks/train.py``, whose slides it shares).

Last line: ``embed_vs_model=X tiles_per_s=Y model_tiles_per_s=Z loader_wait=W``.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def train_benchmark() -> Any:
    """``benchmarks/train.py`` (its slides and slim-image fallbacks), imported from this folder put
    after the standard library's on the path."""
    if str(HERE) not in sys.path:
        sys.path.append(str(HERE))
    return importlib.import_module("train")


def embed_config(args: argparse.Namespace, n_slides: int, producers: int) -> Any:
    """The embedding project: the foundation engine's tiles, no augmentation, enough sampling rows."""
    from pathray.config import load_config

    overrides = [
        "engine.name=foundation",
        f"engine.model={args.model}",
        f"engine.img_size={args.size}",
        "task.name=embedding",
        "data.split=null",
        "data.stream.augmentation=false",
        "data.stream.sampler.kind=random_tissue",
        f"data.stream.sampler.size={args.size}",
        f"data.stream.sampler.mpps=[{args.mpp}]",
    ]
    if args.depth:
        overrides.append(f"engine.model_kwargs.depth={args.depth}")
    cfg = load_config(None, overrides)
    tiles = (args.warmup + args.batches + 1) * args.batch
    read = cfg.data.stream.read_batch
    # every producer gets sampling rows (a row is one read batch of one slide); one epoch covers the run
    cfg.data.stream.sampler.tiles_per_slide = max(
        math.ceil(1.25 * tiles / n_slides), read * math.ceil(producers / n_slides)
    )
    return cfg


def run(args: argparse.Namespace) -> dict[str, float]:
    import torch

    from pathray.datasets.manifest import load_manifest
    from pathray.models.foundation import random_init_expected
    from pathray.models.task_model import build_model
    from pathray.training.feed import ProcessFeed

    train = train_benchmark()
    train.slim_image_fallbacks()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    producers = args.producers or max(1, (os.cpu_count() or 2) - 2)
    args.warmup = args.warmup if args.warmup is not None else 2 * producers + 3  # ProcessFeed's slots + queue
    manifest = load_manifest(train.write_slides(args.workdir, args.slides, args.slide_size))
    cfg = embed_config(args, len(manifest), producers)
    torch.manual_seed(0)
    with random_init_expected():
        model, _ = build_model(cfg.engine, cfg.task)
    model.to(device).eval()

    def embed(x: Any) -> Any:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            return model(x)

    def model_alone(batches: list[Any]) -> float:
        start = time.perf_counter()
        outs = [embed(x) for x in batches]
        torch.cat(outs).float().cpu()
        return time.perf_counter() - start

    name = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(
        f"{name}: {args.model} (depth {args.depth or 'full'}), {args.size} px at {args.mpp} µm/px, batch "
        f"{args.batch}; {producers} producer processes on {len(manifest)} slides; {args.warmup} warm-up "
        f"batches, {args.batches} timed",
        flush=True,
    )
    feed = ProcessFeed(manifest, cfg, args.batch, producers, device, timeout=args.data_timeout)
    try:
        for _ in range(args.warmup):
            embed(next(feed)["image"])
        sync()
        kept, outs, wait = [], [], 0.0
        start = tick = time.perf_counter()
        for _ in range(args.batches):
            x = next(feed)["image"]
            wait += time.perf_counter() - tick
            outs.append(embed(x))
            kept.append(x)
            tick = time.perf_counter()
        torch.cat(outs).float().cpu()
        pipeline_s = time.perf_counter() - start
    finally:
        feed.close()
    model_alone(kept[:2])  # warm
    alone = [model_alone(kept) for _ in range(args.repeat)]
    model_s = statistics.median(alone)
    n = len(kept) * args.batch
    print(
        f"pipeline {pipeline_s:.2f} s ({wait:.2f} s waiting for batches); model alone "
        + ", ".join(f"{s:.2f}" for s in alone)
        + f" s; {n} tiles",
        flush=True,
    )
    return {
        "embed_vs_model": model_s / pipeline_s,
        "tiles_per_s": n / pipeline_s,
        "model_tiles_per_s": n / model_s,
        "loader_wait": wait / pipeline_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--model", default="vit_small_patch16_224", help="the timm ViT (random init)")
    parser.add_argument("--depth", type=int, default=0, help="ViT blocks (0: the model's; 1: a dry run)")
    parser.add_argument("--size", type=int, default=224, help="tile side in px")
    parser.add_argument("--mpp", type=float, default=0.5, help="tile resolution, µm/px")
    parser.add_argument("--batch", type=int, default=256, help="tiles per batch")
    parser.add_argument("--batches", type=int, default=48, help="timed batches (kept on the device)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed batches first (default: slots)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of the model alone (median)")
    parser.add_argument("--producers", type=int, default=0, help="reader processes (0: all CPUs but two)")
    parser.add_argument("--data-timeout", type=float, default=300.0, help="longest wait for one batch, s")
    parser.add_argument("--slides", type=int, default=4)
    parser.add_argument("--slide-size", type=int, default=4096)
    parser.add_argument("--workdir", type=Path, default=Path(".bench"), help="where slides are kept")
    args = parser.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU (--device cpu for a dry run)")
    row = run(args)
    ray_loaded = any(m == "ray" or m.startswith("ray.") for m in sys.modules)
    print(
        f"embed_vs_model={row['embed_vs_model']:.2f} tiles_per_s={row['tiles_per_s']:.1f} "
        f"model_tiles_per_s={row['model_tiles_per_s']:.1f} loader_wait={row['loader_wait']:.3f} "
        f"ray_imported={'YES' if ray_loaded else 'no'}"
    )
    return 1 if ray_loaded else 0


if __name__ == "__mp_main__":  # a ProcessFeed producer runs this file under that name: read as we do
    train_benchmark().slim_image_fallbacks()

if __name__ == "__main__":
    sys.exit(main())
