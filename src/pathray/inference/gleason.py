"""Gleason primary and secondary pattern and score from the area of each pattern.

The rule (biopsy convention): the primary pattern is the one with the most area; the secondary is
the one with the next most (any amount, no 5 % cut-off); with a single pattern the score is twice
it (3 alone: 3+3=6). Equal areas go to the higher pattern (the safer call). Patterns with less than
``min_area_mm2`` count as absent, so a few stray pixels do not make a secondary pattern.
ISUP grade groups: <=6 -> 1, 3+4 -> 2, 4+3 -> 3, 8 -> 4, 9-10 -> 5.
"""

from __future__ import annotations

from typing import Any

PATTERN_CLASSES = {"G3": 3, "G4": 4, "G5": 5}


def grade_group(primary: int, secondary: int) -> int:
    score = primary + secondary
    if score <= 6:
        return 1
    if score == 7:
        return 2 if primary == 3 else 3
    return 4 if score == 8 else 5


def gleason_score(areas_mm2: dict[str, float], min_area_mm2: float = 0.0) -> dict[str, Any] | None:
    """``{primary, secondary, score, grade_group, pattern_areas_mm2}``; None when the model has no
    Gleason classes; primary/secondary/score None when it found no tumour."""
    if not any(name in areas_mm2 for name in PATTERN_CLASSES):
        return None
    found = {PATTERN_CLASSES[n]: a for n, a in areas_mm2.items() if n in PATTERN_CLASSES and a > min_area_mm2}
    out: dict[str, Any] = {
        "primary": None,
        "secondary": None,
        "score": None,
        "grade_group": None,
        "pattern_areas_mm2": {n: float(areas_mm2.get(n, 0.0)) for n in PATTERN_CLASSES},
    }
    if not found:
        return out
    ranked = sorted(found, key=lambda p: (found[p], p), reverse=True)
    primary = ranked[0]
    secondary = ranked[1] if len(ranked) > 1 else primary
    out.update(
        primary=primary,
        secondary=secondary,
        score=primary + secondary,
        grade_group=grade_group(primary, secondary),
    )
    return out
