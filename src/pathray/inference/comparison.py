"""A comparison of frozen models: per-seed probe scores, their mean ± std table, a plot, the files.

    comparison.table()                    # one row per model × probe: <metric>_mean/_std, dim, tiles
    write_comparison(comparison, "eval/") # comparison.csv, comparison.md, comparison.png, results.json

``results`` is what ``results.json`` holds (every seed's numbers), so a comparison read back from
that file gives the same table.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from pathray.storage import StorageConfig, join_uri, write_bytes

PROBES = ("linear", "knn")
METRICS = ("accuracy", "balanced_accuracy", "macro_f1")


@dataclass
class Comparison:
    """Per-seed scores of every model × probe (``results``, JSON-able) and their summary table."""

    results: dict[str, Any] = field(default_factory=dict)

    def table(self) -> pd.DataFrame:
        """One row per model × probe: ``<metric>_mean``/``_std`` over seeds, dim, tiles, seconds."""
        rows = []
        for model in self.results["models"]:
            for probe in PROBES:
                runs = [run[probe] for run in model["seeds"]]
                row: dict[str, Any] = {"model": model["model"], "probe": probe}
                for metric in METRICS:
                    values = np.array([run[metric] for run in runs], np.float64)
                    row[f"{metric}_mean"] = float(values.mean())
                    row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
                row["dim"] = model["embed_dim"]
                row["tiles_train"] = float(np.mean([s["tiles"]["train"] for s in model["seeds"]]))
                row["tiles_eval"] = float(np.mean([s["tiles"]["eval"] for s in model["seeds"]]))
                row["seconds"] = float(
                    np.mean(
                        [s["embed_s"] + run["seconds"] for s, run in zip(model["seeds"], runs, strict=True)]
                    )
                )
                rows.append(row)
        return pd.DataFrame(rows)

    def markdown(self) -> str:
        """The table as Markdown, metrics as ``mean ± std``."""
        table = self.table()
        head = ["model", "probe", *METRICS, "dim", "tiles (train/eval)", "seconds"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in table.to_dict("records"):
            scores = [f"{row[f'{m}_mean']:.3f} ± {row[f'{m}_std']:.3f}" for m in METRICS]
            tiles = f"{row['tiles_train']:.0f}/{row['tiles_eval']:.0f}"
            cells = [row["model"], row["probe"], *scores, str(row["dim"]), tiles, f"{row['seconds']:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def plot_comparison(comparison: Comparison) -> bytes:
    """PNG: one panel per metric, a bar per model and probe with the std over seeds as error bar."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    table = comparison.table()
    models = list(dict.fromkeys(table["model"]))
    fig = Figure(figsize=(4 * len(METRICS), 3.5 + 0.1 * len(models)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(METRICS))
    width = 0.8 / len(PROBES)
    x = np.arange(len(models))
    for ax, metric in zip(axes, METRICS, strict=True):
        for j, probe in enumerate(PROBES):
            rows = table[table["probe"] == probe].set_index("model").loc[models]
            ax.bar(
                x + (j - (len(PROBES) - 1) / 2) * width,
                rows[f"{metric}_mean"],
                width,
                yerr=rows[f"{metric}_std"],
                capsize=3,
                label=probe,
            )
        ax.set_title(metric.replace("_", " "))
        ax.set_xticks(x, models, rotation=20, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
    axes[0].legend(title="probe")
    seeds = comparison.results["config"]["seeds"]
    fig.suptitle(f"{comparison.results['eval_split']} split, mean ± std over {seeds} seed(s)")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def write_comparison(
    comparison: Comparison, out: str, storage: StorageConfig | None = None
) -> dict[str, str]:
    """``comparison.csv``, ``comparison.md``, ``comparison.png`` and ``results.json`` under ``out``."""
    files = {
        "comparison.csv": comparison.table().to_csv(index=False).encode(),
        "comparison.md": comparison.markdown().encode(),
        "comparison.png": plot_comparison(comparison),
        "results.json": json.dumps(comparison.results, indent=2, default=str).encode(),
    }
    return {name: write_bytes(join_uri(out, name), data, storage) for name, data in files.items()}
