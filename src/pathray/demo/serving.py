"""The demo's serving stage: the better model behind Ray Serve, a held-out slide analysed over HTTP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pathray.storage import StorageConfig


def demo_serve_config(models: Path, output: Path, slides_prefix: str, storage: StorageConfig) -> Any:
    """A Serve app on 127.0.0.1 (a free port) that may read only the demo's slides."""
    from pathray.serving.app import load_app_config

    prefix = slides_prefix if "://" in slides_prefix else Path(slides_prefix).absolute().as_uri()
    return load_app_config(
        {
            "storage": storage.model_dump(mode="json", exclude_none=True),
            "inference": {"chunk_tiles": 64, "batch_size": 32},
            "serve": {
                "models": str(models),
                "output": str(output),
                "http": {"host": "127.0.0.1", "port": 0},
                "model": {
                    "num_cpus": 1,
                    "max_ongoing_requests": 4,
                    "autoscaling": {"min_replicas": 1, "max_replicas": 1},
                },
                "ingress": {"num_cpus": 0.25},
                "security": {"allowed_prefixes": [prefix.rstrip("/") + "/"]},
            },
        }
    )


def serve_and_analyze(
    out: Path, models: Path, model_id: str, slide_uri: str, slides_prefix: str, storage: StorageConfig,
    console: Console,
) -> dict[str, Any]:  # fmt: skip
    """Serve ``model_id`` from ``models``, analyse ``slide_uri`` over HTTP, take the service down."""
    from pathray.serving.client import analyze_remote
    from pathray.serving.run import start_app, stop_app

    cfg = demo_serve_config(models, out / "serve-results", slides_prefix, storage)
    with console.status("starting Ray Serve (ingress + model replica) on 127.0.0.1"):
        url = start_app(cfg)
    console.print(f"serving {model_id} at {url}  (API docs: {url}/docs)")
    try:
        columns = [TextColumn("analysing over HTTP"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task("tiles", total=None)

            def advance(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)

            summary = analyze_remote(url, slide_uri, model_id, out / "analysis", progress=advance)
    finally:
        stop_app(cfg, ray_ends=True)  # the demo's Ray is shut down next
    summary["endpoint"] = url
    return summary


def print_summary(summary: dict[str, Any], console: Console) -> None:
    """Areas per class, the Gleason score when there is one, and where the files are."""
    from rich.table import Table

    table = Table(title=f"analysis of {summary.get('slide')} ({summary.get('tiles')} tiles)")
    table.add_column("class")
    table.add_column("area mm²", justify="right")
    for name, area in summary.get("areas_mm2", {}).items():
        table.add_row(name, f"{area:.3f}")
    console.print(table)
    gleason = summary.get("gleason") or {}
    if gleason.get("score") is not None:
        console.print(
            f"Gleason score {gleason['score']} "
            f"(primary {gleason.get('primary')}, secondary {gleason.get('secondary')})"
        )
