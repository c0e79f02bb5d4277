"""What a run leaves behind: config.yaml, history.jsonl, metrics.json and curves.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pathray.config import PathrayConfig, dump_config


def write_run_outputs(
    run_dir: Path, config: PathrayConfig, history: list[dict[str, Any]], metrics: dict[str, Any]
) -> dict[str, str]:
    """Write the run's files; returns their paths by name."""
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "config": run_dir / "config.yaml",
        "history": run_dir / "history.jsonl",
        "metrics": run_dir / "metrics.json",
        "curves": run_dir / "curves.png",
    }
    paths["config"].write_text(dump_config(config))
    with paths["history"].open("w") as fh:
        for row in history:
            fh.write(json.dumps(row, default=float) + "\n")
    paths["metrics"].write_text(json.dumps(metrics, indent=2, default=float))
    plot_curves(history, metrics, paths["curves"], title=f"{config.engine.name} / {config.task.name}")
    return {k: str(v) for k, v in paths.items()}


def plot_curves(history: list[dict[str, Any]], metrics: dict[str, Any], path: Path, title: str = "") -> None:
    """Loss (and any evaluated metric) against iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history if "loss" in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot(steps, [r["loss"] for r in history if "loss" in r], color="#c0392b")
    axes[0].set_xlabel("iteration")
    axes[0].set_ylabel("training loss")
    axes[0].grid(alpha=0.3)
    metric_keys = sorted({k for r in history for k in r if k.startswith("eval/")})
    for key in metric_keys:
        pts = [(r["step"], r[key]) for r in history if key in r]
        axes[1].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key.removeprefix("eval/"))
    if metric_keys:
        axes[1].legend(fontsize=8)
    final = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    text = "\n".join(f"{k}: {v:.3f}" for k, v in list(final.items())[:8])
    axes[1].text(0.02, 0.98, text, transform=axes[1].transAxes, va="top", fontsize=8, family="monospace")
    axes[1].set_xlabel("iteration")
    axes[1].set_ylabel("test metric")
    axes[1].grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
