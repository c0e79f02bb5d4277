"""Slide manifests (one row per slide) and slide-level stratified splits; pure pandas, no Ray."""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from pathray.wsi.synth import SyntheticSlide

MANIFEST_COLUMNS = ("slide_id", "uri", "split", "cohort", "label", "annotations_uri")
DEFAULT_FRACTIONS: Mapping[str, float] = {"train": 0.6, "val": 0.2, "test": 0.2}


def stratified_split(
    labels: Sequence[str], fractions: Mapping[str, float] = DEFAULT_FRACTIONS, seed: int = 0
) -> list[str]:
    """Assign each slide a split so every label is spread over the splits in ``fractions``.

    Splits are made per slide, never per tile, so no slide leaks between train and test.
    Each label is shuffled by a Generator seeded from (seed, label), so adding slides of one
    label never reshuffles another. Counts come from largest remainders; ties go to the split
    furthest below its overall share, so small labels do not all round towards the same split.
    A label with two or more slides always has one in ``train``.
    """
    if not fractions or any(f < 0 for f in fractions.values()) or sum(fractions.values()) <= 0:
        raise ValueError(f"fractions must be non-negative with a positive sum, got {dict(fractions)}")
    names = list(fractions)
    share = np.array([fractions[n] for n in names], float)
    share /= share.sum()
    out = [""] * len(labels)
    assigned = np.zeros(len(names))
    seen = 0
    for label in sorted(set(labels)):
        index = np.array([i for i, lab in enumerate(labels) if lab == label])
        rng = np.random.default_rng([seed, zlib.crc32(str(label).encode())])
        index = index[rng.permutation(len(index))]
        exact = share * len(index)
        counts = np.floor(exact).astype(int)
        seen += len(index)
        deficit = share * seen - assigned - counts
        order = sorted(range(len(names)), key=lambda k: (-round(exact[k] - counts[k], 9), -deficit[k], k))
        for k in order[: len(index) - counts.sum()]:
            counts[k] += 1
        if "train" in names and share[names.index("train")] > 0 and len(index) >= 2:
            t = names.index("train")
            if counts[t] == 0:
                counts[int(np.argmax(counts))] -= 1
                counts[t] = 1
        assigned += counts
        for name, part in zip(names, np.split(index, np.cumsum(counts)[:-1]), strict=True):
            for i in part:
                out[i] = name
    return out


def write_manifest(rows: pd.DataFrame | Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Write a manifest as Parquet or CSV (by suffix) after checking the required columns."""
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(
            f"manifest is missing columns: {', '.join(missing)}; required: {', '.join(MANIFEST_COLUMNS)}"
        )
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise ValueError(f"{path}: manifest must end in .parquet or .csv, not {suffix or 'no suffix'!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)
    return path


def synthetic_manifest(
    slides: Sequence[SyntheticSlide], uri_prefix: str | None = None, cohort: str = "synthetic", seed: int = 0
) -> pd.DataFrame:
    """A manifest for synthetic slides, split by :func:`stratified_split` over their labels.

    With ``uri_prefix`` (e.g. ``s3://bucket/slides``) URIs point where the files were uploaded,
    else at the local files; the lead's upload step decides, this function only names them.
    """

    def uri(path: Path) -> str:
        return f"{uri_prefix.rstrip('/')}/{path.name}" if uri_prefix else str(Path(path).resolve())

    splits = stratified_split([s.label for s in slides], seed=seed)
    rows = [
        {
            "slide_id": s.slide_id,
            "uri": uri(s.path),
            "split": split,
            "cohort": cohort,
            "label": s.label,
            "annotations_uri": uri(s.annotations_path),
        }
        for s, split in zip(slides, splits, strict=True)
    ]
    return pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
