"""Annotation classes: names, QuPath-like colours and the channel index each task predicts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class AnnotationClass:
    """One class of an annotation scheme.

    ``index`` is the output channel a model predicts for the class, so class maps,
    targets and GeoJSON names stay consistent across training and serving.
    """

    name: str
    color: tuple[int, int, int]
    index: int


GLEASON_CLASSES: tuple[AnnotationClass, ...] = (
    AnnotationClass("Background", (180, 180, 180), 0),
    AnnotationClass("Benign", (150, 200, 150), 1),
    AnnotationClass("G3", (255, 200, 0), 2),
    AnnotationClass("G4", (255, 128, 0), 3),
    AnnotationClass("G5", (200, 0, 0), 4),
)
"""Tissue classes of prostate Gleason grading; Background is everything not annotated."""

NUCLEUS_CLASSES: tuple[AnnotationClass, ...] = (
    AnnotationClass("Stromal", (112, 112, 225), 0),
    AnnotationClass("Epithelial", (160, 90, 160), 1),
    AnnotationClass("Tumor", (200, 0, 60), 2),
)
"""Cell classes for detection: one centre heatmap channel each, no background channel."""


def class_by_name(name: str, classes: Sequence[AnnotationClass] = GLEASON_CLASSES) -> AnnotationClass:
    """The class called ``name``; a KeyError lists the known names so a typo is obvious."""
    for cls in classes:
        if cls.name == name:
            return cls
    known = ", ".join(c.name for c in classes)
    raise KeyError(f"unknown annotation class {name!r}; known classes: {known}")


_PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


def class_color(name: str, index: int = 0) -> tuple[int, int, int]:
    """The colour of a known class (as QuPath shows it), else the ``index``-th of a fixed palette."""
    for cls in (*GLEASON_CLASSES, *NUCLEUS_CLASSES):
        if cls.name == name:
            return cls.color
    return _PALETTE[index % len(_PALETTE)]
