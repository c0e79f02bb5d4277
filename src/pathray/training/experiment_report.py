"""An experiment's results: results.parquet, a Markdown table, and F1/throughput plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLUMNS = ("engine", "fraction", "workers", "steps", "macro_f1", "dice", "baseline_macro_f1", "images_per_s")


def markdown_table(table: Any) -> str:
    """The table a person reads: one row per run, scores to three places."""
    cols = [c for c in COLUMNS if c in table.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in table[cols].itertuples(index=False):
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(table: Any, histories: dict[str, list[dict[str, Any]]], root: Path) -> dict[str, str]:
    """Write the table (Parquet + Markdown) and the three plots; returns their paths by name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {
        "results": root / "results.parquet",
        "table": root / "results.md",
        "f1_vs_fraction": root / "f1_vs_fraction.png",
        "f1_vs_iteration": root / "f1_vs_iteration.png",
        "throughput_vs_workers": root / "throughput_vs_workers.png",
    }
    table.to_parquet(paths["results"], index=False)
    paths["table"].write_text(markdown_table(table))

    fig, ax = plt.subplots(figsize=(5, 4))
    for engine, group in table.groupby("engine"):
        g = group.groupby("fraction")["macro_f1"].mean()
        ax.plot(100 * g.index, g.values, marker="o", label=engine)
    base = table.groupby("fraction")["baseline_macro_f1"].mean()
    ax.plot(100 * base.index, base.values, ls="--", color="grey", label="constant predictor")
    ax.set(xlabel="annotated training slides (%)", ylabel="test macro F1", title="F1 vs training fraction")
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths["f1_vs_fraction"], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, history in histories.items():
        points = [(h["step"], h["train/macro_f1"]) for h in history if "train/macro_f1" in h]
        if points:
            ax.plot(*zip(*points, strict=True), label=name)
    for row in table.itertuples():
        ax.scatter([row.steps], [row.macro_f1], marker="*", s=80)
    ax.set(
        xlabel="iteration", ylabel="macro F1 (lines: training batches; stars: test)", title="F1 vs iteration"
    )
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(paths["f1_vs_iteration"], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    for engine, group in table.groupby("engine"):
        g = group.groupby("workers")["images_per_s"].mean()
        ax.plot(g.index, g.values, marker="o", label=engine)
    ax.set(xlabel="workers", ylabel="training images/s", title="throughput vs workers")
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths["throughput_vs_workers"], dpi=100)
    plt.close(fig)
    return {k: str(v) for k, v in paths.items()}
