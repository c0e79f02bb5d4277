"""What a run leaves behind: config.yaml, history.jsonl, metrics.json and curves.png."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, BinaryIO

import yaml

from pathray.storage import join_uri, write_bytes, write_text
from pathray.training.config import ProjectConfig

HISTORY_FILE = "history.jsonl"


def write_run_outputs(
    run_dir: str | Path, config: ProjectConfig, history: list[dict[str, Any]], metrics: dict[str, Any]
) -> dict[str, str]:
    """Write the run's files into ``run_dir`` (a folder or an object-storage prefix); their URIs by name.

    ``config.yaml`` is the resolved project (credentials are never part of a dump).
    """
    run_dir, storage = str(run_dir), config.storage
    resolved = config.model_dump(mode="json", include=set(ProjectConfig.model_fields))
    rows = "".join(json.dumps(row, default=float) + "\n" for row in history)
    curves = io.BytesIO()
    plot_curves(history, metrics, curves, title=f"{config.engine.name} / {config.task.name}")
    return {
        "config": write_text(
            join_uri(run_dir, "config.yaml"), yaml.safe_dump(resolved, sort_keys=False), storage
        ),
        "history": write_text(join_uri(run_dir, HISTORY_FILE), rows, storage),
        "metrics": write_text(
            join_uri(run_dir, "metrics.json"), json.dumps(metrics, indent=2, default=float), storage
        ),
        "curves": write_bytes(join_uri(run_dir, "curves.png"), curves.getvalue(), storage),
    }


KEY_METRICS = ("macro_f1", "f1", "dice", "pq", "rankme", "odcorr")


def plot_curves(
    history: list[dict[str, Any]], metrics: dict[str, Any], path: Path | BinaryIO, title: str = ""
) -> None:
    """Loss and key metrics against iteration; test scores (and a constant predictor's) at the end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in history if "loss" in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot([r["step"] for r in rows], [r["loss"] for r in rows], color="#c0392b", marker=".")
    axes[0].set_xlabel("iteration")
    axes[0].set_ylabel("training loss")
    axes[0].grid(alpha=0.3)
    last = max((r["step"] for r in rows), default=0)
    for i, name in enumerate(k for k in KEY_METRICS if any(f"train/{k}" in r for r in rows)):
        colour = f"C{i}"
        pts = [(r["step"], r[f"train/{name}"]) for r in rows if f"train/{name}" in r]
        axes[1].plot(
            [p[0] for p in pts], [p[1] for p in pts], color=colour, marker=".", label=f"train {name}"
        )
        if f"test/{name}" in metrics:
            axes[1].scatter(
                [last], [metrics[f"test/{name}"]], color=colour, marker="*", s=120, label=f"test {name}"
            )
        if f"baseline/{name}" in metrics:
            axes[1].axhline(
                metrics[f"baseline/{name}"], color=colour, ls="--", lw=1, label=f"constant {name}"
            )
    axes[1].set_xlabel("iteration")
    axes[1].set_ylabel("metric")
    axes[1].grid(alpha=0.3)
    if axes[1].lines or axes[1].collections:
        axes[1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
