"""Metrics against hand-computed values: RankMe, ODCorr, F1/Dice from confusion matrices, probes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pathray.models.metrics import (
    CountAccumulator,
    balanced_accuracy,
    class_report,
    confusion_matrix,
    f1_per_class,
    foreground_dice,
    linear_probe,
    macro_f1,
    odcorr,
    rankme,
)


def test_rankme_identity_is_full_rank():
    assert rankme(torch.eye(8)) == pytest.approx(8.0, rel=1e-5)
    assert rankme(3 * torch.eye(16)[:, :10]) == pytest.approx(10.0, rel=1e-5)


def test_rankme_rank_one_is_one():
    x = torch.outer(torch.arange(1.0, 33.0), torch.randn(12, generator=torch.Generator().manual_seed(0)))
    assert rankme(x) == pytest.approx(1.0, abs=1e-4)


def test_rankme_two_by_two_by_hand():
    # singular values 3 and 1: p = (0.75, 0.25), H = -(0.75 ln 0.75 + 0.25 ln 0.25)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert rankme(torch.tensor([[3.0, 0.0], [0.0, 1.0]])) == pytest.approx(math.exp(h), rel=1e-5)
    assert math.exp(h) == pytest.approx(1.7548, abs=1e-4)


def test_odcorr_independent_columns_near_zero():
    x = torch.randn(20000, 6, generator=torch.Generator().manual_seed(0))
    assert odcorr(x) < 0.02


def test_odcorr_duplicated_columns_is_one():
    col = torch.randn(100, 1, generator=torch.Generator().manual_seed(1))
    assert odcorr(torch.cat([col, col, -2 * col], 1)) == pytest.approx(1.0, abs=1e-9)


def test_odcorr_by_hand():
    # a = (1,-1,1,-1), b = (1,1,-1,-1), c = a: corr(a,b)=0, corr(a,c)=1, corr(b,c)=0 -> mean |.| = 2/6
    a = torch.tensor([1.0, -1, 1, -1])
    b = torch.tensor([1.0, 1, -1, -1])
    assert odcorr(torch.stack([a, b, a], 1)) == pytest.approx(1 / 3)
    assert odcorr(torch.stack([a, b, torch.ones(4)], 1)) == pytest.approx(0.0)  # constant column left out


def test_confusion_matrix_and_f1_by_hand():
    target = torch.tensor([0, 0, 1, 1, 1, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 2])
    cm = confusion_matrix(target, pred, 3)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 2, 1], [0, 0, 1]])
    # class 0: tp1 fp0 fn1 -> 2/3; class 1: tp2 fp1 fn1 -> 4/6; class 2: tp1 fp1 fn0 -> 2/3
    np.testing.assert_allclose(f1_per_class(cm), [2 / 3, 2 / 3, 2 / 3])
    assert balanced_accuracy(cm) == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)


def test_macro_f1_skips_absent_classes_and_excluded_background():
    cm = np.array([[50, 0, 0, 0], [0, 3, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]], float)
    # f1: bg 1, c1 = 6/8, c2 = 0 (present in targets and predictions), c3 absent everywhere
    assert macro_f1(cm) == pytest.approx((1 + 0.75 + 0) / 3)
    assert macro_f1(cm, exclude=(0,)) == pytest.approx(0.75 / 2)
    assert math.isnan(macro_f1(np.diag([5.0, 0, 0]), exclude=(0,)))


def test_foreground_dice_by_hand():
    # rows true, cols pred: fg->fg 6 (whatever the class), fg->bg 2, bg->fg 2
    cm = np.array([[10, 1, 1], [1, 3, 1], [1, 1, 1]], float)
    assert foreground_dice(cm) == pytest.approx(2 * 6 / (8 + 8))


def test_class_report_names_and_accumulator_merge():
    a = CountAccumulator(confusion=np.zeros((2, 2)))
    b = CountAccumulator(confusion=np.zeros((2, 2)))
    a.add(confusion=[[3, 1], [0, 2]])
    b.add(confusion=[[1, 0], [1, 1]])
    a.merge(b.state())
    np.testing.assert_array_equal(a.counts["confusion"], [[4, 1], [1, 3]])
    report = class_report(a.counts["confusion"], ["Background", "G3"])
    assert report["f1/G3"] == pytest.approx(6 / 8)
    assert report["accuracy"] == pytest.approx(7 / 9)
    absent = class_report(np.diag([2.0, 0.0]), ["Background", "G3"])
    assert absent["f1/Background"] == 1.0 and np.isnan(absent["f1/G3"])


def test_linear_probe_separable_and_chance():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    centres = torch.tensor([[4.0, 0, 0, 0], [0, 4, 0, 0], [0, 0, 4, 0]])
    x = centres[y] + torch.randn(300, 4, generator=g)
    out = linear_probe(x[:200], y[:200], x[200:], y[200:])
    assert out["accuracy"] > 0.95 and out["macro_f1"] > 0.95
    noise = torch.randn(300, 4, generator=g)
    assert linear_probe(noise[:200], y[:200], noise[200:], y[200:])["accuracy"] < 0.6
