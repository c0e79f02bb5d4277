"""An experiment's results: results.parquet, a Markdown table, report.md against the seed's figures,
and F1/throughput plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

COLUMNS = ("engine", "fraction", "workers", "steps", "macro_f1", "dice", "baseline_macro_f1", "images_per_s")
SUMMARY_COLUMNS = (
    "engine",
    "fraction",
    "workers",
    "runs",
    "macro_f1",
    "macro_f1_lo",
    "macro_f1_hi",
    "baseline_macro_f1",
    "seconds_per_slide",
)
# The seed study's published figures (foundation vs CNN engines for Gleason segmentation).
SEED_GAIN = (0.14, 0.26)  # the foundation model's macro F1 is 14-26 % above the CNN's
SEED_TIME_RATIO = (0.50, 0.65)  # CNN inference time is 50-65 % of the foundation model's


def summary(table: Any, level: float = 0.95) -> Any:
    """One row per engine, fraction and workers: the mean over seeds and its interval.

    With several seeds the interval is Student's t over the runs' scores (clipped to [0, 1]: few
    seeds give wide intervals); with one run it is that run's bootstrap interval over its test slides.
    """
    import pandas as pd
    from scipy import stats

    rows = []
    for (engine, fraction, workers), group in table.groupby(["engine", "fraction", "workers"], sort=True):
        f1 = group["macro_f1"].to_numpy(float)
        n, mean = len(f1), float(f1.mean())
        if n > 1:
            half = float(stats.t.ppf(0.5 + level / 2, n - 1) * f1.std(ddof=1) / math.sqrt(n))
            lo, hi = max(0.0, mean - half), min(1.0, mean + half)  # an F1 lies in [0, 1]
        else:
            lo, hi = float(group["macro_f1_lo"].iloc[0]), float(group["macro_f1_hi"].iloc[0])
        rows.append(
            {
                "engine": engine,
                "fraction": float(fraction),
                "workers": int(workers),
                "runs": n,
                "macro_f1": mean,
                "macro_f1_lo": lo,
                "macro_f1_hi": hi,
                "baseline_macro_f1": float(group["baseline_macro_f1"].mean()),
                "seconds_per_slide": float(group["seconds_per_slide"].mean()),
            }
        )
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


def study_report(table: Any, foundation: str = "foundation", cnn: str = "cnn", curves: Any = None) -> str:
    """report.md: the seed's three questions answered from this experiment, beside its figures
    (``curves``: :func:`iteration_curves`, for F1 against iterations)."""
    s = summary(table)
    lines = ["# The seed's study, reproduced", ""]
    lines += [
        "Macro F1 over every annotated region of the test slides (whole-slide predictor), mean over "
        "seeds with a 95 % interval (Student's t over seeds; one seed: bootstrap over test slides).",
        "",
        markdown_table(s, list(SUMMARY_COLUMNS)),
    ]
    if curves is not None:
        lines += curves_section(curves, table)
    engines = set(s["engine"])
    if not {foundation, cnn} <= engines:
        lines.append(f"The comparisons need both a `{foundation}` and a `{cnn}` engine in the grid.")
        return "\n".join(lines) + "\n"
    f = s[s["engine"] == foundation].set_index("fraction")
    c = s[s["engine"] == cnn].set_index("fraction")
    shared = sorted(set(f.index) & set(c.index))
    lines += ["## 1. The foundation model is 14-26 % better than the CNN (seed)", ""]
    for fraction in shared:
        gain = f.loc[fraction, "macro_f1"] / c.loc[fraction, "macro_f1"] - 1
        separated = f.loc[fraction, "macro_f1_lo"] > c.loc[fraction, "macro_f1_hi"]
        verdict = _verdict(SEED_GAIN[0] <= gain <= SEED_GAIN[1], gain > 0, separated)
        lines.append(f"- at {100 * fraction:.0f} % of the annotations: {100 * gain:+.1f} % ({verdict})")
    low, full = min(f.index), max(c.index)
    beats = f.loc[low, "macro_f1"] > c.loc[full, "macro_f1"]
    separated = f.loc[low, "macro_f1_lo"] > c.loc[full, "macro_f1_hi"]
    lines += [
        "",
        f"## 2. The foundation model at {100 * low:.0f} % beats the CNN at {100 * full:.0f} % "
        "(seed: at 10 %)",
        "",
        f"- foundation at {100 * low:.0f} %: {f.loc[low, 'macro_f1']:.3f} "
        f"[{f.loc[low, 'macro_f1_lo']:.3f}, {f.loc[low, 'macro_f1_hi']:.3f}]; CNN at {100 * full:.0f} %: "
        f"{c.loc[full, 'macro_f1']:.3f} [{c.loc[full, 'macro_f1_lo']:.3f}, {c.loc[full, 'macro_f1_hi']:.3f}]"
        f" ({_verdict(beats, beats, separated)})",
    ]
    t_f, t_c = float(f["seconds_per_slide"].mean()), float(c["seconds_per_slide"].mean())
    ratio = t_c / t_f if t_f > 0 else math.nan
    in_range = SEED_TIME_RATIO[0] <= ratio <= SEED_TIME_RATIO[1]
    lines += [
        "",
        "## 3. CNN inference takes 50-65 % of the foundation model's time (seed)",
        "",
        f"- seconds per test slide (evaluation, whole slide): foundation {t_f:.2f}, CNN {t_c:.2f}: "
        f"ratio {ratio:.2f} ({'holds' if in_range else 'does not hold'})",
        "",
        "## Why figures differ here",
        "",
        "- The seed fine-tuned large pretrained models on real prostate biopsies for many epochs. An "
        "experiment here runs the engines and steps its config names, on the slides of its manifest; "
        "the demo's are small synthetic slides, a tiny ViT pretrained for a few DINO steps and a few "
        "dozen fine-tuning steps, so the seed's gains are not expected to appear at that scale.",
        "- An interval that overlaps the other engine's means this experiment cannot tell them apart: "
        "more seeds or more test slides narrow it.",
        "- Inference times depend on the two architectures and the hardware (here: the machine that ran "
        "the evaluation), so the ratio is for these models, not the seed's.",
    ]
    return "\n".join(lines) + "\n"


def iteration_curves(
    table: Any, histories: dict[str, list[dict[str, Any]]], key: str = "val/macro_f1"
) -> Any:
    """F1 against iterations on val: per engine, fraction and checkpoint step, the mean over seeds
    of ``key`` (empty when no run scored val tiles)."""
    import pandas as pd

    rows = []
    for run in table.itertuples():
        for h in histories.get(Path(str(run.run_dir)).name, []):
            if key in h and math.isfinite(float(h[key])):
                rows.append({"engine": run.engine, "fraction": run.fraction, "step": h["step"], "f1": h[key]})
    if not rows:
        return pd.DataFrame(columns=["engine", "fraction", "step", "f1", "runs"])
    frame = pd.DataFrame(rows).groupby(["engine", "fraction", "step"], sort=True)["f1"]
    return frame.agg(f1="mean", runs="count").reset_index()


def curves_section(curves: Any, table: Any) -> list[str]:
    """report.md's answer to "F1 against iterations": val macro F1 at every checkpoint."""
    lines = ["", "## F1 against iterations, on the val slides", ""]
    if curves.empty:
        return [*lines, "No run scored val slides (no `val` split, or `train.val_split` is null)."]
    steps = sorted(set(curves["step"]))
    lines.append("| engine | fraction | " + " | ".join(f"step {s}" for s in steps) + " | kept step |")
    lines.append("|" + "---|" * (len(steps) + 3))
    for (engine, fraction), g in curves.groupby(["engine", "fraction"], sort=True):
        at = dict(zip(g["step"], g["f1"], strict=True))
        cells = [f"{at[s]:.3f}" if s in at else "" for s in steps]
        kept = table[(table["engine"] == engine) & (table["fraction"] == fraction)].get("chosen_step")
        kept_text = ", ".join(str(int(k)) for k in kept) if kept is not None else ""
        lines.append(f"| {engine} | {fraction:g} | " + " | ".join(cells) + f" | {kept_text} |")
    lines += [
        "",
        "Mean over seeds of the macro F1 of fixed val tiles at each checkpoint; each run kept (and was "
        "tested with) the checkpoint of its best val score.",
    ]
    return lines


def _verdict(holds: bool, direction: bool, separated: bool) -> str:
    if holds and separated:
        return "holds, intervals apart"
    if holds:
        return "holds on the means; the intervals overlap"
    if direction:
        return "same direction, outside the seed's range"
    return "does not hold"


def markdown_table(table: Any, columns: list[str] | None = None) -> str:
    """The table a person reads: one row per run (or per cell of a summary), scores to three places."""
    cols = [c for c in (columns or COLUMNS) if c in table.columns]
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
        "report": root / "report.md",
        "f1_vs_fraction": root / "f1_vs_fraction.png",
        "f1_vs_iteration": root / "f1_vs_iteration.png",
        "throughput_vs_workers": root / "throughput_vs_workers.png",
    }
    table.to_parquet(paths["results"], index=False)
    paths["table"].write_text(
        markdown_table(table) + "\n" + markdown_table(summary(table), list(SUMMARY_COLUMNS))
    )
    curves = iteration_curves(table, histories)
    paths["report"].write_text(study_report(table, curves=curves))

    fig, ax = plt.subplots(figsize=(5, 4))
    for engine, g in summary(table).groupby("engine"):
        g = g.groupby("fraction").mean(numeric_only=True)
        x = 100 * g.index.to_numpy(float)
        ax.plot(x, g["macro_f1"], marker="o", label=engine)
        ax.fill_between(x, g["macro_f1_lo"], g["macro_f1_hi"], alpha=0.2)
    base = table.groupby("fraction")["baseline_macro_f1"].mean()
    ax.plot(100 * base.index, base.values, ls="--", color="grey", label="constant predictor")
    ax.set(xlabel="annotated training slides (%)", ylabel="test macro F1", title="F1 vs training fraction")
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths["f1_vs_fraction"], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    source = "val slides"
    if curves.empty:  # no val split: the training batches' F1 is all there is
        curves, source = iteration_curves(table, histories, "train/macro_f1"), "training batches"
    for (engine, fraction), g in curves.groupby(["engine", "fraction"], sort=True):
        ax.plot(g["step"], g["f1"], marker="o", label=f"{engine} {100 * fraction:.0f} %")
    for row in table.itertuples():
        ax.scatter([row.chosen_step], [row.macro_f1], marker="*", s=80)
    ax.set(
        xlabel="iteration",
        ylabel=f"macro F1 (lines: {source}, mean over seeds; stars: test)",
        title="F1 vs iteration",
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
