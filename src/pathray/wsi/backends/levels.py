"""Pyramid level choice: a request in microns per pixel -> the level to read and the scale to apply."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Above this a "resolution" is a scanner-free TIFF's 72-dpi tag (352.8 µm/px), not a microscope's.
MAX_PLAUSIBLE_MPP = 20.0


@dataclass(frozen=True)
class LevelChoice:
    """Read ``level``; one output pixel covers ``scale`` pixels of that level (>1: downsample)."""

    level: int
    scale: float

    @property
    def resample(self) -> bool:
        return self.scale != 1.0


def plausible_mpp(value: object) -> float | None:
    """A microscope mpp, or None when absent, unparsable or meaningless (e.g. 72-dpi tags)."""
    try:
        mpp = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if not (0.0 < mpp <= MAX_PLAUSIBLE_MPP):
        return None
    return mpp


def select_level(level_mpps: Sequence[float], target_mpp: float, tolerance: float = 0.02) -> LevelChoice:
    """Pick the coarsest level that is at least as fine as ``target_mpp``.

    Reading a finer level and shrinking keeps detail, and the coarsest such level touches the
    fewest bytes. A level within ``tolerance`` (relative) of the target is read as is, so a
    slide scanned at 0.2499 µm/px serves 0.25 µm/px without resampling. A target finer than
    level 0 reads level 0 and enlarges it (scale < 1).
    """
    if not level_mpps:
        raise ValueError("a slide has at least one level")
    if target_mpp <= 0:
        raise ValueError(f"target mpp must be positive, got {target_mpp}")
    best = 0
    for i, mpp in enumerate(level_mpps):
        if mpp <= target_mpp * (1.0 + tolerance) and mpp >= level_mpps[best]:
            best = i
    scale = target_mpp / level_mpps[best]
    if abs(scale - 1.0) <= tolerance:
        scale = 1.0
    return LevelChoice(best, scale)
