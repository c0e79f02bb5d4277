"""Embedding throughput of the foundation presets: images/s at 224 px, on CPU, or bf16 on a GPU.

    python benchmarks/foundation.py                               # CPU: presets up to 320M parameters
    python benchmarks/foundation.py --presets uni kaiko_vits16 --n 16
    python benchmarks/foundation.py --gpu                         # CUDA, bf16 autocast: every preset

Each preset is built by ``pathray.models.load_foundation`` with RANDOM weights (throughput does not
depend on the values, and no checkpoint is needed) and embeds uint8 tiles the way a user calls it:
``model.embed(tiles)`` (normalisation, forward, the preset's pooling), ``--batch`` tiles a call,
after ``--warmup`` calls; the time of ``--n`` tiles gives images/s. Parameters are counted on the
meta device first, so presets over ``--max-params`` are left out of the CPU default without being
built. Nothing here imports Ray (checked at the end): a GPU box needs torch and timm only.

Last line: ``images_per_s name=X ...`` for every preset measured.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any


def measure(name: str, device: str, n: int, batch: int, warmup: int, size: int) -> dict[str, Any]:
    """Build preset ``name`` (random init) on ``device`` and time ``model.embed`` over ``n`` tiles."""
    import numpy as np
    import torch

    from pathray.models.foundation import load_foundation, random_init_expected

    torch.manual_seed(0)
    t0 = time.perf_counter()
    with random_init_expected():
        model = load_foundation(name, device=device)
    build_s = time.perf_counter() - t0
    tiles = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), np.uint8))
    tiles = tiles.to(device)
    cuda = device.startswith("cuda")

    def run(calls: int) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                out = model.embed(tiles, batch_size=batch)
            assert out.shape == (batch, model.info.dim)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    if warmup:
        run(warmup)
    calls = max(1, -(-n // batch))
    seconds = run(calls)
    row = {
        "name": name,
        "params_m": model.info.params / 1e6,
        "dim": model.info.dim,
        "device": device,
        "images": calls * batch,
        "images_per_s": calls * batch / seconds,
        "build_s": build_s,
    }
    if cuda:
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=None, help="default: every preset that fits")
    parser.add_argument("--gpu", action="store_true", help="CUDA in bf16 autocast instead of the CPU")
    parser.add_argument("--n", type=int, default=None, help="timed tiles per preset (CPU 8, GPU 512)")
    parser.add_argument("--batch", type=int, default=None, help="tiles per embed call (CPU 4, GPU 64)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (CPU 1, GPU 3)")
    parser.add_argument("--size", type=int, default=224, help="tile side in px")
    parser.add_argument(
        "--max-params", type=float, default=320e6, help="CPU default: presets up to this many parameters"
    )
    args = parser.parse_args(argv)

    import torch

    from pathray.models.foundation import count_parameters
    from pathray.models.presets import preset_names

    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu: torch sees no CUDA device")
    device = "cuda" if args.gpu else "cpu"
    n = args.n or (512 if args.gpu else 8)
    batch = args.batch or (64 if args.gpu else 4)
    warmup = args.warmup if args.warmup is not None else (3 if args.gpu else 1)
    names = args.presets or preset_names()
    unknown = sorted(set(names) - set(preset_names()))
    if unknown:
        parser.error(f"unknown presets {unknown}; known: {', '.join(preset_names())}")
    params = {name: count_parameters(name) for name in names}
    if args.presets is None and not args.gpu:
        skipped = [name for name in names if params[name] > args.max_params]
        names = [name for name in names if params[name] <= args.max_params]
        if skipped:
            print(
                f"left out (over {args.max_params / 1e6:.0f}M parameters; name them with --presets): "
                f"{', '.join(skipped)}"
            )
    where = (
        torch.cuda.get_device_name()
        if args.gpu
        else f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs"
    )
    precision = "bf16 autocast" if args.gpu else "fp32"
    print(
        f"embed throughput at {args.size} px, {device} ({where}), {precision}; torch {torch.__version__}; "
        "weights: RANDOM init (throughput only, no checkpoint read)",
        flush=True,
    )
    header = f"{'preset':14s} {'params':>8s} {'dim':>5s} {'batch':>5s} {'images':>6s} {'images/s':>9s} "
    header += f"{'build s':>7s}"
    print(header + (f" {'peak GiB':>8s}" if args.gpu else ""), flush=True)
    rows = []
    for name in names:
        row = measure(name, device, n, batch, warmup, args.size)
        rows.append(row)
        if args.gpu:  # the model is gone: the next preset starts from an empty GPU
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        line = (
            f"{name:14s} {row['params_m']:7.1f}M {row['dim']:5d} {batch:5d} {row['images']:6d} "
            f"{row['images_per_s']:9.2f} {row['build_s']:7.1f}"
        )
        print(line + (f" {row['peak_gib']:8.2f}" if args.gpu else ""), flush=True)
    ray_loaded = any(m == "ray" or m.startswith("ray.") for m in sys.modules)
    print(f"ray imported: {'YES' if ray_loaded else 'no'}")
    print("images_per_s " + " ".join(f"{r['name']}={r['images_per_s']:.2f}" for r in rows))
    return 1 if ray_loaded else 0


if __name__ == "__main__":
    sys.exit(main())
