"""`pathray embed` (Ray Data: grid -> reader actors -> model actors -> files) against the model alone.

    python benchmarks/embed.py                       # CPU: ViT-S/16 with 1 block, 64 px at 1 µm/px
    python benchmarks/embed.py --slides 2 --slide-size 2048 --tile 32 --repeat 1     # a dry run
    python benchmarks/embed.py --gpu                 # the Ray-free GPU path: benchmarks/embed_model.py
    python benchmarks/embed.py --gpu --device cpu --depth 1 --size 32 --batch 4 --batches 8 --producers 1

CPU: ``embed_slides`` embeds ``--slides`` synthetic slides into a fresh folder on a local Ray of
``--cpus`` CPUs (``--readers`` reader actors, one model actor of one CPU), RANDOM weights (timm
``--model`` with ``--depth`` blocks). Its tiles/s are those after the first batch came back, over
the time from then to the last file written (the start-up before it, actors and model loading,
is printed apart: a cohort pays it once). The model alone is the same embedder on the same tiles,
read beforehand and held in memory, in batches of ``--batch``, with one torch thread (the model
actor's one CPU); the median of ``--repeat`` runs. X = pipeline tiles/s over the model alone's;
the loader wait is the share of the model actor's time spent waiting for tiles.

``--gpu`` runs ``benchmarks/embed_model.py`` with the other arguments (process readers feeding one
GPU model, no Ray); see its docstring.

Last line: ``embed_vs_model=X tiles_per_s=Y loader_wait=Z``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
try:
    import pathray  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`: use its src/
    sys.path.insert(0, str(HERE.parent / "src"))


def gpu_benchmark(argv: list[str]) -> int:
    """``benchmarks/embed_model.py`` (Ray-free, its own arguments), imported from this folder."""
    if str(HERE) not in sys.path:
        sys.path.append(str(HERE))
    return int(importlib.import_module("embed_model").main(argv))


def synthetic_slides(cache: Path, n: int, size: int) -> list[str]:
    """``n`` synthetic slides of ``size`` px (seeds 0..n-1), written once into ``cache``."""
    from pathray.wsi.synth import SynthConfig, write_synthetic_slide

    paths = []
    for seed in range(n):
        path = cache / f"embed_{size}_{seed}.svs"
        if not path.exists():
            tmp = cache / f"embed_{size}_{seed}.tmp.svs"
            write_synthetic_slide(tmp, seed=seed, config=SynthConfig(size=size, workers=os.cpu_count() or 2))
            tmp.rename(path)
            tmp.with_suffix(".geojson").rename(path.with_suffix(".geojson"))
        paths.append(str(path))
    return paths


def model_alone(embedder: Any, tiles: Any, batch: int, repeat: int) -> float:
    """Median seconds of the embedder over ``tiles`` (in memory) in batches of ``batch``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the model actor's one CPU
    try:
        embedder.embed(tiles[:batch], batch)  # warm
        runs = []
        for _ in range(repeat):
            start = time.perf_counter()
            embedder.embed(tiles, batch)
            runs.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(runs)


def run(args: argparse.Namespace) -> dict[str, float]:
    import numpy as np
    import pandas as pd

    from pathray.cluster.ray_local import ensure_ray
    from pathray.inference.embedder import load_embedder
    from pathray.inference.embeddings import read_slide_embeddings, slide_embeddings_uri
    from pathray.serving.embed import embed_slides
    from pathray.wsi.backends.open import open_slide

    args.cache.mkdir(parents=True, exist_ok=True)
    slides = synthetic_slides(args.cache, args.slides, args.slide_size)
    frame = pd.DataFrame({"uri": slides})
    kwargs = {"depth": args.depth} if args.depth else None
    ensure_ray(num_cpus=args.cpus, log_to_driver=False)
    out = Path(tempfile.mkdtemp(prefix="embed-bench-"))
    try:
        report = embed_slides(
            frame,
            args.model,
            str(out),
            tile_size=args.tile,
            mpp=args.mpp,
            model_kwargs=kwargs,
            batch_size=args.batch,
            readers=args.readers,
            gpus_per_actor=0.0,
        )
        failed = report.slides[report.slides["status"] != "written"]
        if len(failed):
            raise SystemExit(f"slides failed: {failed[['slide_id', 'reason']].to_dict('records')}")
        tables = [read_slide_embeddings(slide_embeddings_uri(str(out), s)) for s in report.slides["slide_id"]]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    embedder = load_embedder(
        args.model, device="cpu", precision="fp32", tile_size=args.tile, mpp=args.mpp, model_kwargs=kwargs
    )
    tiles = np.concatenate(
        [
            np.stack(open_slide(uri).read_batch(list(zip(t.x, t.y, strict=True)), args.tile, args.mpp))
            for uri, t in zip(slides, tables, strict=True)
        ]
    )
    model_s = model_alone(embedder, tiles, args.batch, args.repeat)
    n = len(tiles)
    extra = report.extra
    steady = float(extra.get("steady_tiles_per_s", report.tiles_per_s))
    print(
        f"{args.model} (depth {args.depth or 'full'}), {args.tile} px at {args.mpp} µm/px, batch "
        f"{args.batch}; {args.slides} slides of {args.slide_size} px, {n} tiles; {extra['readers']} "
        f"readers, {extra['actors']} model actor",
        flush=True,
    )
    print(
        f"pathray embed: {report.summary()} ({report.seconds:.1f} s: {extra.get('startup_s', 0):.1f} s to "
        f"the first batch, then {steady:.1f} tiles/s)",
        flush=True,
    )
    print(f"model alone: {n / model_s:.1f} tiles/s ({model_s:.2f} s)", flush=True)
    return {
        "embed_vs_model": steady / (n / model_s),
        "tiles_per_s": steady,
        "loader_wait": report.model_wait_share,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--gpu" in argv:
        return gpu_benchmark([a for a in argv if a != "--gpu"])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="run benchmarks/embed_model.py instead")
    parser.add_argument("--model", default="vit_small_patch16_224", help="the timm model (random init)")
    parser.add_argument("--depth", type=int, default=1, help="ViT blocks (0: the model's)")
    parser.add_argument("--tile", type=int, default=64, help="tile side in px")
    parser.add_argument("--mpp", type=float, default=1.0, help="tile resolution, µm/px")
    parser.add_argument("--batch", type=int, default=32, help="tiles per forward pass")
    parser.add_argument("--slides", type=int, default=4)
    parser.add_argument("--slide-size", type=int, default=8192)
    parser.add_argument("--cpus", type=int, default=max(2, os.cpu_count() or 2), help="CPUs of the local Ray")
    parser.add_argument("--readers", type=int, default=None, help="reader actors (default: the CPUs left)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of the model alone (median)")
    parser.add_argument("--cache", type=Path, default=Path(".bench"), help="where slides are kept")
    args = parser.parse_args(argv)
    row = run(args)
    print(
        f"embed_vs_model={row['embed_vs_model']:.2f} tiles_per_s={row['tiles_per_s']:.1f} "
        f"loader_wait={row['loader_wait']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
