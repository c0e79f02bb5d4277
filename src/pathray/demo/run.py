"""``pathray demo``: synthetic slides into the embedded object store, streamed back, masks out."""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from pathray.storage import StorageConfig


def demo_splits(n: int) -> list[str]:
    """Scarce annotations, as in the seed's setting: a sixth of the slides (one at least) is held out
    for the whole-slide test, a twelfth (one at least) is the val split that chooses each run's
    checkpoint, a third (one at least) is labelled for fine-tuning, and DINO pretrains on the rest,
    unlabelled. The synthetic labels cycle, so each consecutive run spans the classes."""
    test = max(1, round(n / 6))
    val = max(1, round(n / 12))
    train = max(1, round(n / 3))
    unlabelled = max(0, n - test - val - train)
    return ["unlabelled"] * unlabelled + ["train"] * train + ["val"] * val + ["test"] * test


@dataclass(frozen=True)
class DemoOptions:
    """What the demo does; the CLI fills it from flags."""

    out: Path
    store: str = "s3"
    n: int = 24
    size: int = 4096
    seed: int = 0
    steps: int = 40
    seeds: int = 2
    dashboard: bool = False  # start the local Ray dashboard (127.0.0.1) and print its URL


@contextlib.contextmanager
def demo_storage(options: DemoOptions, console: Console) -> Iterator[tuple[str, StorageConfig, object]]:
    """Yield (URI prefix, storage config, uploader) for the chosen store; stop it afterwards."""
    if options.store == "local":
        root = (options.out / "store").absolute()
        root.mkdir(parents=True, exist_ok=True)

        def copy(local: Path, rel: str) -> str:
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local, target)
            return str(target)

        yield str(root), StorageConfig(), copy
        return
    from pathray.cluster.local import LocalObjectStore

    with console.status("starting the embedded S3 endpoint (SeaweedFS on 127.0.0.1)"):
        store = LocalObjectStore().start()
    console.print(f"object store: {store.endpoint_url}  bucket s3://{store.bucket}")
    try:

        def upload(local: Path, rel: str) -> str:
            return store.upload_file(local, store.url_for(rel))

        yield f"s3://{store.bucket}", store.storage_config(), upload
    finally:
        store.stop()


def overlay(thumb: np.ndarray, mask: np.ndarray) -> Image.Image:
    """Thumbnail with tissue tinted green and glass dimmed, beside the mask."""
    m = (
        np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((thumb.shape[1], thumb.shape[0])))
        > 127
    )
    tinted = thumb.astype(np.float32)
    tinted[m] = 0.6 * tinted[m] + 0.4 * np.array([40, 200, 80])
    tinted[~m] *= 0.5
    side = np.repeat((m * 255).astype(np.uint8)[..., None], 3, axis=2)
    return Image.fromarray(np.concatenate([thumb, tinted.astype(np.uint8), side], axis=1))


def run_demo(options: DemoOptions, console: Console | None = None) -> dict[str, object]:
    """Synthesise slides, put them in storage, open them back from there, write tissue masks."""
    from pathray.datasets.manifest import synthetic_manifest
    from pathray.wsi.backends.open import open_slide
    from pathray.wsi.patching.tissue import compute_tissue_mask
    from pathray.wsi.synth import SynthConfig, write_synthetic_slides

    console = console or Console()
    out = options.out.absolute()
    (out / "slides").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with console.status(f"writing {options.n} synthetic slides of {options.size}x{options.size} px"):
        slides = write_synthetic_slides(
            out / "slides", n=options.n, seed=options.seed, config=SynthConfig(size=options.size)
        )
    console.print(f"wrote {len(slides)} synthetic slides to {out / 'slides'}")
    rows = []
    with demo_storage(options, console) as (prefix, storage, put):
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("uploading", total=len(slides))
            for s in slides:
                put(s.path, f"slides/{s.path.name}")
                put(s.annotations_path, f"slides/{s.annotations_path.name}")
                progress.advance(task)
        manifest = synthetic_manifest(slides, uri_prefix=f"{prefix}/slides", seed=options.seed)
        manifest["split"] = demo_splits(len(manifest))
        manifest_path, kept_path = demo_manifests(manifest, out, options.store)
        table = Table(title=f"slides read back from {prefix}")
        for col in ("slide", "label", "split", "reader", "size", "levels", "mpp", "tissue", "read"):
            table.add_column(col)
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("reading slides back and segmenting tissue", total=len(manifest))
            for row in manifest.itertuples():
                t0 = time.perf_counter()
                slide = open_slide(row.uri, storage, cache=False)
                mask = compute_tissue_mask(slide)
                thumb = slide.thumbnail(max_size=512)
                png = out / "masks" / f"{row.slide_id}.png"
                overlay(thumb, mask.mask).save(png)
                rows.append({"slide_id": row.slide_id, "uri": row.uri, "mask_png": str(png)})
                table.add_row(
                    row.slide_id,
                    row.label,
                    row.split,
                    slide.backend,
                    f"{slide.dimensions[0]}x{slide.dimensions[1]}",
                    str(slide.level_count),
                    f"{slide.mpp}",
                    f"{100 * mask.tissue_fraction_total:.0f}%",
                    f"{slide.bytes_read / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s",
                )
                slide.close()
                progress.advance(task)
        console.print(table)
        trained: dict[str, Any] = {}
        if options.steps > 0:
            trained = train_in_demo(
                out,
                manifest,
                manifest_path,
                storage,
                console,
                options.steps,
                prefix,
                options.seeds,
                dashboard=options.dashboard,
            )
    console.print(f"{'manifest:':28s} {kept_path}")
    if kept_path != manifest_path:
        console.print(
            f"{'bucket manifest:':28s} {manifest_path} (what the demo streamed; needs the endpoint)"
        )
    console.print(f"{'tissue masks:':28s} {out / 'masks'}")
    for label, path in output_paths(trained).items():
        console.print(f"{label + ':':28s} {path}")
    console.print(f"done in {time.perf_counter() - started:.0f} s")
    return {"manifest": str(kept_path), "bucket_manifest": str(manifest_path), "slides": rows, **trained}


def demo_manifests(manifest: Any, out: Path, store: str) -> tuple[Path, Path]:
    """``(the manifest the demo streams from, the one it leaves for what a user runs next)``.

    The embedded endpoint (``s3``) stops with the demo, so the bucket's manifest
    (``manifest.s3.parquet``) is dead once it ends; ``manifest.parquet``, which every shipped
    config defaults to, names the same slides' local copies under ``slides/`` (same ids, splits
    and labels), so ``pathray train configs/dinov2-pretrain.yaml`` runs on them afterwards. A
    ``local`` store is a folder that stays: its manifest serves both.
    """
    from pathray.datasets.manifest import write_manifest

    kept = out / "manifest.parquet"
    if store == "local":
        write_manifest(manifest, kept)
        return kept, kept

    def local(uris: Any) -> list[str]:
        return [str(out / "slides" / str(u).rsplit("/", 1)[-1]) for u in uris]

    write_manifest(
        manifest.assign(uri=local(manifest["uri"]), annotations_uri=local(manifest["annotations_uri"])), kept
    )
    return write_manifest(manifest, out / "manifest.s3.parquet"), kept


def output_paths(trained: dict[str, Any]) -> dict[str, str]:
    """What a user opens next: curves and metrics, the experiment's table and plots, the analysis."""
    paths: dict[str, str] = {}
    if "dino" in trained:
        paths["DINO curves"] = trained["dino"].paths.get("curves", "")
    if "experiment" in trained:
        exp = trained["experiment"]
        for key in ("table", "f1_vs_fraction", "f1_vs_iteration", "throughput_vs_workers"):
            paths[f"experiment {key.replace('_', ' ')}"] = exp.paths[key]
        run_dir = Path(trained["best"]["run_dir"])
        paths["best model metrics"] = str(run_dir / "metrics.json")
        paths["best model curves"] = str(run_dir / "curves.png")
    for name, path in (trained.get("analysis") or {}).get("files", {}).items():
        paths[f"analysis {name}"] = path
    return paths


def train_in_demo(
    out: Path,
    manifest: Any,
    manifest_path: Path,
    storage: StorageConfig,
    console: Console,
    steps: int,
    prefix: str,
    seeds: int = 1,
    dashboard: bool = False,
) -> dict[str, Any]:
    """Train, then serve the better model and analyse a held-out slide over HTTP, on a local Ray
    that is stopped afterwards (nothing left behind)."""
    import ray

    from pathray.cluster.ray_local import ensure_ray
    from pathray.demo.serving import print_summary, serve_and_analyze
    from pathray.demo.training import run_demo_training

    started_here = not ray.is_initialized()
    with console.status("starting a local Ray (127.0.0.1)"):
        url = ensure_ray(log_to_driver=False, dashboard=dashboard)
    if url:
        console.print(f"Ray dashboard: {url}")
    for name in ("ray.data", "ray.serve", "ray.train"):  # the demo shows its own progress
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        trained = run_demo_training(out, manifest, str(manifest_path), storage, console, steps, seeds)
        best = trained["best"]
        held_out = manifest[manifest["split"] == "test"].iloc[0]
        summary = serve_and_analyze(
            out,
            Path(trained["experiment"].out) / "runs",
            Path(best["run_dir"]).name,
            str(held_out["uri"]),
            f"{prefix}/slides",
            storage,
            console,
        )
        print_summary(summary, console)
        return {**trained, "analysis": summary}
    finally:
        if started_here:
            ray.shutdown()
