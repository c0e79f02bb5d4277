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
