"""Whole-slide analysis against the model alone: how much of the model's speed the pipeline keeps.

    python benchmarks/wsi_inference.py                  # CPU: 32768 px slide, debug_cnn, 128 px @ 1 µm/px
    python benchmarks/wsi_inference.py --tile engine --store s3   # 64 px @ 2 µm/px, slide on SeaweedFS
    python benchmarks/wsi_inference.py --gpu            # CUDA: ViT-S/16 (random init, bf16), 16384 px slide
    python benchmarks/wsi_inference.py --gpu --model vit_large_patch16_224 --repeat 3   # ViT-L/16
    python benchmarks/wsi_inference.py --gpu --device cpu --size 1024 --depth 1 --tile 64@0.5  # dry run

CPU: the pipeline is ``analyze_slide`` (plan the tissue grid, read tiles on reader threads, batch,
model, reduce and stitch the class map). The model alone is the same model object on the same
tiles, read once beforehand and held in memory as its uint8 batches, on the same CPUs in this
process, with the pipeline's layout (``--compute-threads`` model threads taking batches in turn,
``--torch-threads`` torch threads; ``--model-layouts 1x2`` adds others, the best counts). The
tissue mask is computed once before either side is timed. Rounds run both sides back to back
(alternating which goes first); X is the median of the per-round ratios, which holds up better
than best-of-each-side when other work shares the box; each round also prints the CPU seconds
each side used (their ratio is the pipeline's overhead in work, whatever the load). A row per
``--decode`` mode runs the pipeline with ``inference.decode`` set to it (default ``device``:
compressed tiles fetched by range and decoded by ``tiledecode`` where the model runs). The
process's allocator keeps freed memory, as Serve replicas and batch-analysis actors have it
(``inference.keep_freed_memory``; ``--release-memory``: as a user's own process). Last line:

    analysis_vs_model=X tiles_per_s=Y model_tiles_per_s=Z decode_device_vs_model=W

GPU (``--gpu``): ``analyze_slide`` with ViT-S/16 (``--model``: any timm ViT, e.g. ViT-L/16) at the
foundation engine's 224 px, 0.5 µm/px (``--tile`` and ``--depth`` shrink it for a dry run), bf16
autocast (default ``decode: auto``, which is nvJPEG for JPEG tiles on CUDA), against the same model
alone on the same tiles already on the GPU; a row per ``--decode`` mode (default ``cpu``: today's path, tiles
decoded on CPU threads into pinned batches). Ray-free and needs neither tiffslide, zarr nor
imagecodecs: the slide is written with PIL-encoded JPEG tiles and opened with
``backend="tifffile"``. Needs torch, torchvision, timm, tifffile, PIL, PyYAML, safetensors and
pydantic. Last line: ``analysis_vs_model=X tiles_per_s=Y model_tiles_per_s=Z decode_cpu_vs_model=W``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
try:
    import pathray  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`: use its src/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


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


def preload(slide: Any, plan: Any, batch: int, device: Any = "cpu") -> list[Any]:
    """Every tile of the plan read once, as the model's uint8 ``(B, S, S, 3)`` batches on ``device``."""
    import torch

    out = []
    for s in range(0, plan.n_tiles, batch):
        xs, ys = plan.xs[s : s + batch], plan.ys[s : s + batch]
        coords = [(int(x), int(y)) for x, y in zip(xs, ys, strict=True)]
        tiles = np.stack(slide.read_batch(coords, plan.tile_size, plan.tile_mpp))
        out.append(torch.from_numpy(tiles).to(device))
    return out


def model_alone(model: Any, batches: list[Any], workers: int, torch_threads: int) -> None:
    """``model`` predicts every batch: ``workers`` threads, each on its own batches."""
    import torch

    def forward(x: Any) -> None:
        with torch.inference_mode():
            model(x)

    torch.set_num_threads(torch_threads)
    if workers == 1:
        for x in batches:
            forward(x)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(forward, batches))


def timed(fn: Any, *args: Any) -> tuple[float, float]:
    """``(wall seconds, CPU seconds of this process)`` of ``fn(*args)``."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - w0, time.process_time() - c0


def bench_cpu(args: argparse.Namespace) -> None:
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    path = synthetic_slide(cache, args.size)
    overrides = [f"engine.name={args.engine}", "task.name=segmentation"]
    name = args.engine
    if args.tile != "engine":  # e.g. 224@0.5: a real engine's tile geometry at the debug engine's speed
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

    base = {
        "batch_size": args.batch_size,
        "device": "cpu",
        "torch_threads": args.torch_threads,
        "compute_threads": args.compute_threads,
    }
    if args.read_threads:
        base["read_threads"] = args.read_threads
    config = InferenceConfig(**base)
    predictor = Predictor.from_package(package, config=config)
    decoded = {
        mode: Predictor(predictor.model, predictor.spec, InferenceConfig(**base, decode=mode))
        for mode in args.decode
    }
    slide = open_slide(uri, storage)
    plan = plan_grid(slide, predictor.spec, config)  # computes and caches the tissue mask
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    t0 = time.perf_counter()
    batches = preload(slide, plan, args.batch_size)
    layouts = sorted(
        {(args.compute_threads, args.torch_threads), *(tuple(lay) for lay in args.model_layouts)}
    )
    print(
        f"slide {args.size}x{args.size} px, {plan.n_tiles} tissue tiles of {plan.tile_size} px at "
        f"{plan.tile_mpp} µm/px ({time.perf_counter() - t0:.1f} s to preload), {args.engine}, batch "
        f"{args.batch_size}, {cpus} CPUs; pipeline: {config.compute_threads} model threads x "
        f"{config.torch_threads} torch threads, {config.read_threads} reader threads, decode "
        f"{getattr(config, 'decode', 'cpu')}; model alone: best of (model threads, torch threads) "
        f"{layouts}; slide on {args.store}; freed memory {'returned' if args.release_memory else 'kept'}",
        flush=True,
    )
    model_alone(predictor.model, batches[:2], 1, cpus)  # warm-up
    analyze_slide(uri, predictor, storage)
    pipelines = {"analysis": predictor, **{f"decode_{m}": p for m, p in decoded.items()}}
    ratios: dict[str, list[float]] = {k: [] for k in pipelines}
    walls: dict[str, list[float]] = {"model": [], **{k: [] for k in pipelines}}
    cpu: dict[str, list[float]] = {k: [] for k in walls}
    for i in range(args.repeat):
        alone: dict[tuple[int, int], tuple[float, float]] = {}
        pipes: dict[str, tuple[float, float]] = {}

        def run_model(alone: dict[tuple[int, int], tuple[float, float]] = alone) -> None:
            for workers, threads in layouts:
                alone[(workers, threads)] = timed(model_alone, predictor.model, batches, workers, threads)

        def run_pipes(pipes: dict[str, tuple[float, float]] = pipes) -> None:
            for key, p in pipelines.items():
                torch.set_num_threads(args.torch_threads)
                pipes[key] = timed(analyze_slide, uri, p, storage)

        first, second = (run_pipes, run_model) if i % 2 else (run_model, run_pipes)
        first()  # alternate which side goes first, so drifting load hits both alike
        second()
        best = min(alone, key=lambda lay: alone[lay][0])
        walls["model"].append(alone[best][0])
        cpu["model"].append(alone[best][1])
        for key, (wall, used) in pipes.items():
            ratios[key].append(alone[best][0] / wall)
            walls[key].append(wall)
            cpu[key].append(used)
        shown = ", ".join(f"{w}x{t} {s:.1f} s (cpu {c:.1f} s)" for (w, t), (s, c) in alone.items())
        rows = "; ".join(
            f"{k} {s:.1f} s (cpu {c:.1f} s) ratio {alone[best][0] / s:.2f}" for k, (s, c) in pipes.items()
        )
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"round {i}: model alone {shown}; {rows}; load {load:.1f}", flush=True)
    work = float(np.median(cpu["model"]) / np.median(cpu["analysis"]))
    print(f"model CPU seconds / pipeline CPU seconds (medians; load-independent overhead): {work:.2f}")
    report(plan.n_tiles, walls, ratios)


def write_gpu_slide(path: Path, size: int, mpp: float, workers: int, tile: int = 256) -> None:
    """A synthetic slide (seed 0) as a generic pyramidal TIFF whose JPEG tiles PIL encodes, so a GPU
    box without imagecodecs writes it; level 0 at ``mpp`` (the model's resolution: no resampling)."""
    import io
    from collections import deque

    import tifffile
    from PIL import Image

    from pathray.wsi.synth.render import render_rgbx
    from pathray.wsi.synth.scene import generate_geometry

    geometry = generate_geometry(0, size, size, mpp)
    sides = [size]
    while sides[-1] > 1024 or len(sides) < 3:
        sides.append(sides[-1] // 2)

    def encode(pixels: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="JPEG", quality=85)
        return buf.getvalue()

    def tiles(side: int) -> Any:
        """Encoded tiles of one level, row-major; tile rows rendered and encoded on ``workers`` threads."""
        d, n = size / side, -(-side // tile)

        def row(r: int) -> list[bytes]:
            strip = render_rgbx(geometry, 0, r * tile * d, n * tile, tile, d, geometry.seed)
            return [encode(strip[:, c * tile : (c + 1) * tile, :3]) for c in range(n)]

        with ThreadPoolExecutor(workers) as pool:
            pending = deque(pool.submit(row, r) for r in range(min(n, 2 * workers)))
            for r in range(n):
                if r + len(pending) < n:
                    pending.append(pool.submit(row, r + len(pending)))
                yield from pending.popleft().result()

    try:
        tifffile.TIFF.COMPRESSORS[7]
    except KeyError:  # no imagecodecs: tifffile looks its JPEG encoder up even for encoded tiles
        try:
            tifffile.TIFF.COMPRESSORS._codecs[7] = lambda data, **_: encode(data)
        except AttributeError:
            raise SystemExit(
                f"tifffile {tifffile.__version__} writes JPEG tiles only with imagecodecs"
            ) from None
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for k, side in enumerate(sides):
            extra: dict[str, Any] = {"subifds": len(sides) - 1} if k == 0 else {"subfiletype": 1}
            res = 1e4 / (mpp * size / side)
            tif.write(
                tiles(side),
                shape=(side, side, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression="jpeg",
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                **extra,
            )


def bench_gpu(args: argparse.Namespace) -> None:
    """The whole-slide analysis on ``args.device`` against the model alone on tiles already there."""
    import torch

    import pathray.wsi.backends.tifffile_slide  # noqa: F401 - backend="tifffile"
    from pathray.inference.analyze import analyze_slide
    from pathray.inference.config import InferenceConfig
    from pathray.inference.grid import plan_grid
    from pathray.inference.predictor import Predictor
    from pathray.wsi.backends.open import open_slide

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    cpus = os.cpu_count() or 4
    path = cache / f"gpu_{args.size}.tiff"
    if not path.exists():
        t0 = time.perf_counter()
        write_gpu_slide(cache / "gpu.tmp.tiff", args.size, 0.5, cpus)
        (cache / "gpu.tmp.tiff").rename(path)
        print(f"wrote {path} in {time.perf_counter() - t0:.1f} s", flush=True)
    overrides = ["engine.name=foundation", f"engine.model={args.model}", "task.name=segmentation"]
    label = args.model
    if args.depth:
        overrides.append(f"engine.model_kwargs.depth={args.depth}")
        label += f"_depth{args.depth}"
    if args.tile != "engine":  # the engine's own: 224 px at 0.5 µm/px
        size, mpp = args.tile.split("@")
        overrides += [f"data.stream.sampler.size={size}", f"data.stream.sampler.mpps=[{mpp}]"]
        label += f"_{size}_{mpp}"
    package = model_package(cache, overrides, label)
    base: dict[str, Any] = {
        "batch_size": args.batch_size,
        "device": args.device,
        "chunk_tiles": 4 * args.batch_size,
        "read_threads": args.read_threads or cpus,
        "compute_threads": args.compute_threads,
    }
    predictor = Predictor.from_package(package, config=InferenceConfig(**base))
    pipelines = {"analysis": predictor}
    for mode in args.decode:
        pipelines[f"decode_{mode}"] = Predictor(
            predictor.model, predictor.spec, InferenceConfig(**base, decode=mode)
        )
    slide = open_slide(path, backend="tifffile")  # tifffile alone: no tiffslide, zarr or imagecodecs
    plan = plan_grid(slide, predictor.spec, predictor.config)
    cuda = predictor.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    batches = preload(slide, plan, args.batch_size, predictor.device)

    def model_alone() -> None:
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=cuda):
            for x in batches:
                predictor.model(x)
        sync()

    def pipeline(p: Any) -> None:
        analyze_slide(slide, p)
        sync()

    name = torch.cuda.get_device_name() if cuda else "cpu"
    on_device = {k: p.decodes_on_device(slide, plan) for k, p in pipelines.items()}
    print(
        f"{name}: {plan.n_tiles} tiles of {plan.tile_size} px at {plan.tile_mpp} µm/px, {label}, "
        f"batch {args.batch_size}, {base['read_threads']} reader threads, {args.compute_threads} model "
        f"threads; decoded on the device: {on_device}",
        flush=True,
    )
    model_alone()  # warm-up: cuDNN/cuBLAS choices, nvJPEG, page cache
    for p in pipelines.values():
        pipeline(p)
    walls: dict[str, list[float]] = {"model": [], **{k: [] for k in pipelines}}
    ratios: dict[str, list[float]] = {k: [] for k in pipelines}
    for i in range(args.repeat):
        model_s = timed(model_alone)[0]
        pipes = {k: timed(pipeline, p)[0] for k, p in pipelines.items()}
        if i % 2:
            model_s = (model_s + timed(model_alone)[0]) / 2  # the model alone also after the pipelines
        walls["model"].append(model_s)
        for k, s in pipes.items():
            walls[k].append(s)
            ratios[k].append(model_s / s)
        rows = "; ".join(f"{k} {s:.2f} s ({model_s / s:.2f})" for k, s in pipes.items())
        print(f"round {i}: model alone {model_s:.2f} s; {rows}", flush=True)
    report(plan.n_tiles, walls, ratios)


def report(n: int, walls: dict[str, list[float]], ratios: dict[str, list[float]]) -> None:
    """Each row's median ratio and tiles/s, then the last line."""

    def tps(key: str) -> float:
        return n / float(np.median(walls[key]))

    extra = ""
    for key in ratios:
        if key != "analysis":
            print(f"{key}: analysis_vs_model={np.median(ratios[key]):.2f} tiles_per_s={tps(key):.1f}")
            extra += f" {key}_vs_model={np.median(ratios[key]):.2f}"
    print(
        f"analysis_vs_model={np.median(ratios['analysis']):.2f} tiles_per_s={tps('analysis'):.1f} "
        f"model_tiles_per_s={tps('model'):.1f}{extra}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=None, help="slide side in px (CPU 32768, --gpu 16384)")
    parser.add_argument("--cache", default=".bench/wsi_inference", help="where the slide and model are kept")
    parser.add_argument("--engine", default="debug_cnn", help="CPU: engine of the random-weight package")
    parser.add_argument("--model", default="vit_small_patch16_224", help="--gpu: the timm ViT (random init)")
    parser.add_argument("--depth", type=int, default=0, help="--gpu: ViT blocks (0: the model's; 1: dry run)")
    parser.add_argument("--batch-size", type=int, default=None, help="CPU 32, --gpu 256")
    parser.add_argument("--compute-threads", type=int, default=2, help="model threads of the pipeline")
    parser.add_argument("--torch-threads", type=int, default=1, help="CPU: torch threads of the pipeline")
    parser.add_argument(
        "--read-threads", type=int, default=None, help="CPU: the config's; --gpu: one per CPU"
    )
    parser.add_argument(
        "--tile",
        default=None,
        help="tile SIZE@MPP; 'engine': the engine's own (64@2.0 for debug, 224@0.5 for --gpu's ViTs); "
        "default: 128@1.0 on CPU, the engine's with --gpu (whose slide is at 0.5 µm/px)",
    )
    parser.add_argument("--store", default="local", choices=["local", "s3"], help="CPU: where the slide is")
    parser.add_argument("--repeat", type=int, default=5, help="rounds of both sides")
    parser.add_argument(
        "--model-layouts",
        nargs="*",
        default=[],
        type=lambda v: tuple(int(k) for k in v.split("x")),
        help="CPU: more (model threads)x(torch threads) layouts for the model alone, e.g. 1x2; best counts",
    )
    parser.add_argument(
        "--decode",
        nargs="*",
        default=None,
        choices=["cpu", "device"],
        help="a row per inference.decode beside the default (auto); default: device on CPU, cpu with --gpu",
    )
    parser.add_argument(
        "--gpu", action="store_true", help="ViT-S/16 in bf16 on CUDA, Ray- and tiffslide-free"
    )
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="--gpu: cpu for a dry run")
    parser.add_argument(
        "--release-memory",
        action="store_true",
        help="leave the allocator as a user's own process has it (default: as Serve replicas and batch "
        "actors set it, inference.keep_freed_memory)",
    )
    args = parser.parse_args(argv)
    if not args.release_memory:  # this process analyses slides and nothing else, as a replica does
        from pathray.heap import keep_freed_memory

        args.release_memory = not keep_freed_memory()
    args.size = args.size or (16384 if args.gpu else 32768)
    args.batch_size = args.batch_size or (256 if args.gpu else 32)
    args.tile = args.tile or ("engine" if args.gpu else "128@1.0")
    if args.decode is None:
        args.decode = ["cpu"] if args.gpu else ["device"]
    bench_gpu(args) if args.gpu else bench_cpu(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
