"""Gleason rules on known areas: primary = most area, secondary = next, one pattern counts twice."""

from __future__ import annotations

import pytest

from pathray.inference.gleason import gleason_score


@pytest.mark.parametrize(
    ("areas", "primary", "secondary", "score", "group"),
    [
        ({"G3": 2.0, "G4": 1.0, "G5": 0.0}, 3, 4, 7, 2),
        ({"G3": 1.0, "G4": 2.0, "G5": 0.0}, 4, 3, 7, 3),
        ({"G3": 0.0, "G4": 3.0, "G5": 0.0}, 4, 4, 8, 4),  # one pattern: twice it
        ({"G3": 0.5, "G4": 0.0, "G5": 0.0}, 3, 3, 6, 1),
        ({"G3": 0.1, "G4": 0.2, "G5": 3.0}, 5, 4, 9, 5),  # a third pattern is not in the score
        ({"G3": 1.0, "G4": 1.0, "G5": 0.0}, 4, 3, 7, 3),  # a tie goes to the higher pattern
        ({"G3": 3.0, "G4": 0.0, "G5": 0.2}, 3, 5, 8, 4),
    ],
)
def test_primary_secondary_and_score(areas, primary, secondary, score, group):
    out = gleason_score({"Background": 5.0, "Benign": 9.0, **areas})
    assert (out["primary"], out["secondary"], out["score"], out["grade_group"]) == (
        primary,
        secondary,
        score,
        group,
    )


def test_no_tumour_and_no_gleason_classes():
    out = gleason_score({"Benign": 1.0, "G3": 0.0, "G4": 0.0, "G5": 0.0})
    assert out is not None and out["score"] is None and out["primary"] is None
    assert gleason_score({"Background": 1.0, "Foreground": 2.0}) is None


def test_patterns_below_the_least_area_are_absent():
    out = gleason_score({"G3": 1.0, "G4": 0.001, "G5": 0.0}, min_area_mm2=0.0025)
    assert (out["primary"], out["secondary"], out["score"]) == (3, 3, 6)
