"""The study's report from a results table with known answers (no training: the numbers are set)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from pathray.training.experiment_report import study_report, summary


def table(rows: list[tuple[str, float, int, float, float]]) -> pd.DataFrame:
    """rows of (engine, fraction, seed, macro_f1, seconds_per_slide)."""
    return pd.DataFrame(
        [
            {
                "engine": e,
                "fraction": f,
                "workers": 1,
                "seed": s,
                "macro_f1": m,
                "macro_f1_lo": m - 0.05,
                "macro_f1_hi": m + 0.05,
                "baseline_macro_f1": 0.2,
                "seconds_per_slide": t,
            }
            for e, f, s, m, t in rows
        ]
    )


def test_seeds_give_a_student_t_interval_and_one_run_its_own_bootstrap():
    t = table(
        [("cnn", 1.0, seed, f1, 1.0) for seed, f1 in enumerate([0.50, 0.54, 0.58])]
        + [("foundation", 1.0, 0, 0.70, 2.0)]
    )
    s = summary(t).set_index("engine")
    assert s.loc["cnn", "runs"] == 3 and s.loc["cnn", "macro_f1"] == pytest.approx(0.54)
    half = 4.302652729911275 * 0.04 / math.sqrt(3)  # t(0.975, df=2) x sd / sqrt(n)
    assert s.loc["cnn", "macro_f1_lo"] == pytest.approx(0.54 - half)
    assert s.loc["cnn", "macro_f1_hi"] == pytest.approx(0.54 + half)
    assert (s.loc["foundation", "macro_f1_lo"], s.loc["foundation", "macro_f1_hi"]) == pytest.approx(
        (0.65, 0.75)
    )


def test_the_report_says_which_seed_figures_hold():
    rows = []
    for seed in range(3):
        rows += [
            ("foundation", 0.1, seed, 0.60 + 0.01 * seed, 2.0),
            ("foundation", 1.0, seed, 0.70 + 0.01 * seed, 2.0),
            ("cnn", 0.1, seed, 0.40 + 0.01 * seed, 1.2),
            ("cnn", 1.0, seed, 0.58 + 0.01 * seed, 1.2),
        ]
    report = study_report(table(rows))
    # at 100 %: 0.71 / 0.59 - 1 = +20.3 %, inside the seed's 14-26 %; at 10 %: +48.8 %, outside
    assert "at 100 % of the annotations: +20.3 % (holds, intervals apart)" in report
    assert "at 10 % of the annotations: +48.8 % (same direction, outside the seed's range)" in report
    # foundation at 10 % (0.61) against the CNN at 100 % (0.59): ahead, but the intervals overlap
    assert "(holds on the means; the intervals overlap)" in report.split("## 2.")[1].split("## 3.")[0]
    assert "ratio 0.60 (holds)" in report  # 1.2 / 2.0
    slower = study_report(table([(e, f, s, m, 1.0) for e, f, s, m, _ in rows]))
    assert "ratio 1.00 (does not hold)" in slower


def test_f1_against_iterations_is_the_mean_over_seeds_of_each_checkpoints_val_score():
    from pathray.training.experiment_report import iteration_curves

    t = table([("cnn", 1.0, 0, 0.5, 1.0), ("cnn", 1.0, 1, 0.6, 1.0), ("foundation", 1.0, 0, 0.7, 2.0)])
    t["run_dir"] = ["/runs/c0", "/runs/c1", "/runs/f0"]
    t["chosen_step"] = [20, 10, 20]
    histories = {
        "c0": [{"step": 10, "val/macro_f1": 0.2}, {"step": 10, "loss": 1}, {"step": 20, "val/macro_f1": 0.4}],
        "c1": [{"step": 10, "val/macro_f1": 0.4}, {"step": 20, "val/macro_f1": 0.3}],
        "f0": [{"step": 10, "val/macro_f1": 0.5}, {"step": 20, "val/macro_f1": float("nan")}],
    }
    curves = iteration_curves(t, histories).set_index(["engine", "step"])
    assert curves.loc[("cnn", 10), "f1"] == pytest.approx(0.3) and curves.loc[("cnn", 10), "runs"] == 2
    assert curves.loc[("cnn", 20), "f1"] == pytest.approx(0.35)
    assert ("foundation", 20) not in curves.index  # a checkpoint that scored nothing is left out
    report = study_report(t, curves=iteration_curves(t, histories))
    assert "| cnn | 1 | 0.300 | 0.350 | 20, 10 |" in report
    assert "| foundation | 1 | 0.500 |  | 20 |" in report
    assert "No run scored val slides" in study_report(t, curves=iteration_curves(t, {}))
