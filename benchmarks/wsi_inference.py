"""Seconds to analyse a whole synthetic slide: the pipelined predictor vs a naive read-predict-stitch loop.

    python benchmarks/wsi_inference.py                    # CPU: 32768 px slide, debug_cnn, 128 px @ 1 µm/px
    python benchmarks/wsi_inference.py --tile engine --store s3   # 64 px @ 2 µm/px, slide on SeaweedFS
    python benchmarks/wsi_inference.py --gpu              # CUDA: ViT-S/16 (random init, bf16)

CPU: both sides run the same model object on the same CPUs in this process, on the same tissue
grid (the tissue mask is computed once, before either is timed). The naive loop reads one batch
with ``read_batch``, predicts it, stitches it (area-pooled probabilities added into the class
map), then reads the next; it gets the better of 1 torch thread and one per CPU. The pipelined
side is ``analyze_slide``: reader threads cut tiles ahead, two model threads (one torch thread
each, one chunk each) keep both cores busy, probabilities are reduced to the map's resolution next
to the model. The default tile (128 px at 1 µm/px, read from the 1 µm level) makes reading a real
share of the work, as at the resolutions models use; at the debug engine's own 64 px at 2 µm/px
the whole level is 256 JPEG tiles and reading is nearly free. Rounds run both sides back to
back (alternating which goes first); X is the median of the per-round ratios, which holds up
better than best-of-each-side when other work shares the box.
Last line: ``speedup_vs_naive=X tiles_per_s=Y`` (Y: the pipelined side's median round).

GPU (``--gpu``): ``analyze_slide`` with ViT-S/16 at 224 px, 0.5 µm/px, bf16 autocast, against the
same model alone on random uint8 tensors already on the GPU. Last line:
``analysis_vs_model=X tiles_per_s=Y model_tiles_per_s=Z``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import numpy as np


def synthetic_slide(cache: Path, size: int) -> Path:
    """A ``size`` x ``size`` synthetic slide (seed 0), written once into ``cache``."""
    from pathray.wsi.synth import SynthConfig, write_synthetic_slide

    path = cache / f"wsi_{size}.svs"
    if not path.exists():
        t0 = time.perf_counter()
        tmp = cache / f"wsi_{size}.tmp.svs"
        write_synthetic_slide(tmp, seed=0, config=SynthConfig(size=size, workers=os.cpu_count() or 2))
        tmp.rename(path)
        tmp.with_suffix(".geojson").rename(path.with_suffix(".geojson"))
        print(f"wrote {path} in {time.perf_counter() - t0:.1f} s", flush=True)
    return path


def model_package(cache: Path, overrides: list[str], name: str) -> str:
    """A model package with random weights (seed 0), saved once into ``cache``."""
    import torch

    from pathray.config import load_config
    from pathray.models.package import WEIGHTS_FILE, package_model, save_model_package
    from pathray.models.task_model import build_model

    uri = cache / name
    if not (uri / WEIGHTS_FILE).exists():
        torch.manual_seed(0)
        cfg = load_config(None, overrides)
        model, _ = build_model(cfg.engine, cfg.task)
        sampler = cfg.data.stream.sampler
        save_model_package(
            str(uri), package_model(model, cfg.engine, cfg.task, sampler.size, sampler.mpps[0])
        )
    return str(uri)


def naive(slide: Any, predictor: Any, plan: Any) -> np.ndarray:
    """Read one batch, predict it, stitch it, next batch: one thread, no look-ahead."""
    import torch
    import torch.nn.functional as F

    d = plan.downsample
    k = max(1, round(plan.extent / d))
    rows, cols = plan.map_shape
    sums = np.zeros((len(predictor.spec.classes), rows + k, cols + k), np.float32)
    bs = predictor.config.batch_size
    for s in range(0, plan.n_tiles, bs):
        xs, ys = plan.xs[s : s + bs], plan.ys[s : s + bs]
        coords = [(int(x), int(y)) for x, y in zip(xs, ys, strict=True)]
        tiles = np.stack(slide.read_batch(coords, plan.tile_size, plan.tile_mpp))
        with torch.inference_mode():
            probs = predictor.model(torch.from_numpy(tiles)).float().softmax(1)
            small = F.adaptive_avg_pool2d(probs, k).numpy()
        for p, x, y in zip(small, xs, ys, strict=True):
            r, c = int(round(y / d)), int(round(x / d))
            sums[:, r : r + k, c : c + k] += p
    return sums[:, :rows, :cols].argmax(0).astype(np.uint8)


def bench_cpu(args: argparse.Namespace) -> None:

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    path = synthetic_slide(cache, args.size)
    overrides = [f"engine.name={args.engine}", "task.name=segmentation"]
    name = args.engine
    if (
        args.tile != "engine"
    ):  # e.g. 224@0.5: the tile geometry of a real engine, with the debug engine's speed
        size, mpp = args.tile.split("@")
        overrides += [f"data.stream.sampler.size={size}", f"data.stream.sampler.mpps=[{mpp}]"]
        name += f"_{size}_{mpp}"
    package = model_package(cache, overrides, name)
    with contextlib.ExitStack() as stack:
        uri, storage = str(path), None
        if args.store == "s3":  # the slide in the embedded SeaweedFS on 127.0.0.1, read by ranges
            from pathray.cluster.local import LocalObjectStore

            store = stack.enter_context(LocalObjectStore())
            uri = store.upload_file(path, f"s3://{store.bucket}/wsi/{path.name}")
            storage = store.storage_config()
        cpu_rounds(args, uri, storage, package)


def cpu_rounds(args: argparse.Namespace, uri: str, storage: Any, package: str) -> None:
    import torch

    from pathray.inference.analyze import analyze_slide
    from pathray.inference.config import InferenceConfig
    from pathray.inference.grid import plan_grid
    from pathray.inference.predictor import Predictor
    from pathray.wsi.backends.open import open_slide

    config = InferenceConfig(
        batch_size=args.batch_size,
        read_threads=args.read_threads,
        device="cpu",
        compute_threads=args.compute_threads,
        torch_threads=args.torch_threads,
    )
    predictor = Predictor.from_package(package, config=config)
    slide = open_slide(uri, storage)
    plan = plan_grid(slide, predictor.spec, config)  # computes and caches the tissue mask
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"slide {args.size}x{args.size} px, {plan.n_tiles} tissue tiles of {plan.tile_size} px at "
        f"{plan.tile_mpp} µm/px, {args.engine}, batch {args.batch_size}, {cpus} CPUs; pipelined: "
        f"{args.compute_threads} model threads x {args.torch_threads} torch threads, {args.read_threads} "
        f"reader threads; naive: best of 1 and {cpus} torch threads; slide on {args.store}",
        flush=True,
    )
    naive(slide, predictor, dataclasses.replace(plan, xs=plan.xs[:64], ys=plan.ys[:64]))  # warm-up
    ratios, naive_all, pipe_all = [], [], []
    for i in range(args.repeat):
        naive_s: dict[int, float] = {}

        def run_naive(naive_s: dict[int, float] = naive_s) -> None:
            for threads in sorted({1, cpus or 1}):
                torch.set_num_threads(threads)
                t0 = time.perf_counter()
                naive(slide, predictor, plan_grid(slide, predictor.spec, config))
                naive_s[threads] = time.perf_counter() - t0

        def run_pipelined() -> float:
            torch.set_num_threads(args.torch_threads)
            t0 = time.perf_counter()
            analyze_slide(uri, predictor, storage)
            return time.perf_counter() - t0

        if i % 2:  # alternate which side goes first, so drifting load hits both alike
            pipe_s = run_pipelined()
            run_naive()
        else:
            run_naive()
            pipe_s = run_pipelined()
        ratios.append(min(naive_s.values()) / pipe_s)
        naive_all.append(min(naive_s.values()))
        pipe_all.append(pipe_s)
        shown = ", ".join(f"{t} thread(s) {v:.1f} s" for t, v in naive_s.items())
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"round {i}: naive {shown}; pipelined {pipe_s:.1f} s; ratio {ratios[-1]:.2f}; load {load:.1f}")
    mid = float(np.median(ratios))
    print(
        f"naive_s(median)={np.median(naive_all):.2f} pipelined_s(median)={np.median(pipe_all):.2f} "
        f"tiles={plan.n_tiles}; X = median over rounds of (better naive / pipelined), same round"
    )
    print(f"speedup_vs_naive={mid:.2f} tiles_per_s={plan.n_tiles / float(np.median(pipe_all)):.1f}")


def bench_gpu(args: argparse.Namespace) -> None:
    import torch

    from pathray.inference.analyze import analyze_slide
    from pathray.inference.config import InferenceConfig
    from pathray.inference.grid import plan_grid
    from pathray.inference.predictor import Predictor
    from pathray.wsi.backends.open import open_slide

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    uri = str(synthetic_slide(cache, args.size))
    overrides = ["engine.name=foundation", "engine.model=vit_small_patch16_224", "task.name=segmentation"]
    package = model_package(cache, overrides, "vit_s16")
    config = InferenceConfig(
        batch_size=args.batch_size,
        read_threads=args.read_threads,
        device=args.accel,
        chunk_tiles=4 * args.batch_size,
    )
    predictor = Predictor.from_package(package, config=config)
    slide = open_slide(uri)
    plan = plan_grid(slide, predictor.spec, config)
    size = predictor.spec.tile_size
    x = torch.randint(0, 256, (args.batch_size, size, size, 3), dtype=torch.uint8, device=args.accel)
    cuda = args.accel == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def model_alone(n: int) -> float:
        with torch.inference_mode(), torch.autocast(args.accel, torch.bfloat16, enabled=cuda):
            predictor.model(x)
            sync()
            t0 = time.perf_counter()
            for _ in range(n):
                predictor.model(x).float().softmax(1)
            sync()
        return n * args.batch_size / (time.perf_counter() - t0)

    model_alone(3)
    model_tps = model_alone(max(5, plan.n_tiles // args.batch_size))
    analyze_slide(uri, predictor)  # warm-up: cuDNN/cuBLAS choices, page cache
    best = float("inf")
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        result = analyze_slide(uri, predictor)
        best = min(best, time.perf_counter() - t0)
    tps = plan.n_tiles / best
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(
        f"{name}: {plan.n_tiles} tiles of {size} px, batch {args.batch_size}, "
        f"{args.read_threads} reader threads; analysis {best:.2f} s; timings {result.timings}"
    )
    print(f"analysis_vs_model={tps / model_tps:.2f} tiles_per_s={tps:.1f} model_tiles_per_s={model_tps:.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=32768, help="slide width and height in px")
    parser.add_argument("--cache", default=".bench/wsi_inference", help="where the slide and model are kept")
    parser.add_argument("--engine", default="debug_cnn", help="CPU: engine of the random-weight package")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--compute-threads", type=int, default=2, help="CPU: pipelined model threads")
    parser.add_argument(
        "--torch-threads", type=int, default=1, help="CPU: torch threads of the pipelined side"
    )
    parser.add_argument("--read-threads", type=int, default=None)
    parser.add_argument(
        "--tile", default="128@1.0", help="CPU: tile SIZE@MPP; 'engine': the engine's own (64@2.0 for debug)"
    )
    parser.add_argument("--store", default="local", choices=["local", "s3"], help="CPU: where the slide is")
    parser.add_argument("--repeat", type=int, default=5, help="rounds of both sides")
    parser.add_argument("--gpu", action="store_true", help="run on CUDA with ViT-S/16 in bf16")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="--device cuda = --gpu")
    parser.add_argument("--accel", default="cuda", help=argparse.SUPPRESS)  # --gpu code path on the CPU
    args = parser.parse_args(argv)
    gpu = args.gpu or args.device == "cuda"
    args.batch_size = args.batch_size or (256 if gpu else 32)
    args.read_threads = args.read_threads or ((os.cpu_count() or 4) if gpu else 4)
    bench_gpu(args) if gpu else bench_cpu(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
