"""Level selection: (available mpps, requested mpp) -> level and scale."""

from __future__ import annotations

import pytest

from pathray.wsi.backends.levels import plausible_mpp, select_level

SVS_2X = [0.25, 0.5, 1.0, 2.0, 4.0]
SVS_4X = [0.25, 1.0, 4.0, 16.0]


@pytest.mark.parametrize(
    ("mpps", "target", "level", "scale"),
    [
        (SVS_2X, 0.25, 0, 1.0),  # exact level 0
        (SVS_2X, 0.5, 1, 1.0),  # exact level 1
        (SVS_2X, 0.7, 1, 1.4),  # between levels: read the finer, shrink
        (SVS_2X, 2.0, 3, 1.0),
        (SVS_2X, 8.0, 4, 2.0),  # coarser than the last level: shrink the last
        (SVS_2X, 0.125, 0, 0.5),  # finer than level 0: enlarge level 0
        (SVS_4X, 0.5, 0, 2.0),  # no 0.5 level: read level 0, halve
        (SVS_4X, 2.0, 1, 2.0),
        (SVS_4X, 0.99, 1, 1.0),  # within 2 %: read as is
        (SVS_4X, 0.97, 0, 3.88),  # 3 % off: the finer level, shrunk
        ([0.2282, 0.4564, 0.9128, 1.8256], 0.5, 1, 0.5 / 0.4564),  # NDPI-like
        ([0.499], 0.5, 0, 1.0),  # CMU at 0.5: as is
        ([0.499], 1.0, 0, 1.0 / 0.499),
    ],
)
def test_select_level(mpps, target, level, scale):
    choice = select_level(mpps, target)
    assert choice.level == level
    assert choice.scale == pytest.approx(scale, rel=1e-6)
    assert choice.resample == (scale != 1.0)


def test_select_level_rejects_nonsense():
    with pytest.raises(ValueError):
        select_level([], 0.5)
    with pytest.raises(ValueError):
        select_level([0.25], 0)


@pytest.mark.parametrize(
    ("raw", "mpp"),
    [
        (0.499, 0.499),
        ("0.2282", 0.2282),
        (None, None),
        ("", None),
        (352.78, None),
        (1000.0, None),
        (0, None),
        (-1, None),
    ],
)
def test_plausible_mpp(raw, mpp):
    assert plausible_mpp(raw) == mpp
