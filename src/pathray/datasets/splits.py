"""Splits of a manifest: grouped by case, stratified by label, seeded; nested training fractions.

No Ray, pure pandas: ``pathray data split`` and the trainer use the same functions.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

DEFAULT_FRACTIONS: Mapping[str, float] = {"train": 0.6, "val": 0.2, "test": 0.2}


def stratified_split(
    labels: Sequence[str], fractions: Mapping[str, float] = DEFAULT_FRACTIONS, seed: int = 0
) -> list[str]:
    """Assign each slide a split so every label is spread over the splits in ``fractions``.

    Splits are made per slide, never per tile, so no slide leaks between train and test: the
    same as :func:`grouped_split` with every slide its own case.
    """
    return grouped_split(labels, list(range(len(labels))), fractions, seed)


def grouped_split(
    labels: Sequence[str],
    groups: Sequence[Any],
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> list[str]:
    """Assign each slide a split, whole cases at a time, with every label spread over the splits.

    ``groups[i]`` is slide ``i``'s case (patient): all slides of a case land in one split, so no
    case is on two sides. A case counts under its stratum ``labels`` (give each slide its case's
    label, see :func:`case_labels`). Each stratum's cases are shuffled by a Generator seeded from
    (seed, label), so adding cases of one label never reshuffles another. Per stratum, slide counts
    per split come from largest remainders (ties go to the split furthest below its overall share,
    so small labels do not all round towards the same split) and a stratum with two or more slides
    keeps one in ``train``; cases then take their place in shuffled order, each in the split its
    middle slide falls in. With one slide per case the counts are met exactly; otherwise each
    split is off by at most about half a case at each of its borders.
    """
    if len(groups) != len(labels):
        raise ValueError(f"{len(labels)} labels but {len(groups)} groups")
    if not fractions or any(f < 0 for f in fractions.values()) or sum(fractions.values()) <= 0:
        raise ValueError(f"fractions must be non-negative with a positive sum, got {dict(fractions)}")
    names = list(fractions)
    share = np.array([fractions[n] for n in names], float)
    share /= share.sum()
    members: dict[Any, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    out = [""] * len(labels)
    assigned = np.zeros(len(names))
    seen = 0
    for label in sorted({str(lab) for lab in labels}):
        cases = [m for m in members.values() if str(labels[m[0]]) == label]
        rng = np.random.default_rng([seed, zlib.crc32(label.encode())])
        cases = [cases[k] for k in rng.permutation(len(cases))]
        n = sum(len(c) for c in cases)
        exact = share * n
        counts = np.floor(exact).astype(int)
        seen += n
        deficit = share * seen - assigned - counts
        order = sorted(range(len(names)), key=lambda k: (-round(exact[k] - counts[k], 9), -deficit[k], k))
        for k in order[: n - counts.sum()]:
            counts[k] += 1
        if "train" in names and share[names.index("train")] > 0 and n >= 2:
            t = names.index("train")
            if counts[t] == 0:
                counts[int(np.argmax(counts))] -= 1
                counts[t] = 1
        assigned += counts
        bounds = np.cumsum(counts)
        start = 0
        for case in cases:
            k = min(int(np.searchsorted(bounds, start + len(case) / 2, side="right")), len(names) - 1)
            for i in case:
                out[i] = names[k]
            start += len(case)
    return out


def case_keys(frame: pd.DataFrame, group: str | None = "case_id") -> list[Any]:
    """Each row's case: the ``group`` column where it is set, else the row itself (its own case)."""
    if group is None or group not in frame.columns:
        return [("row", i) for i in range(len(frame))]
    return [("row", i) if pd.isna(v) or str(v) == "" else str(v) for i, v in enumerate(frame[group])]


def case_labels(frame: pd.DataFrame, keys: Sequence[Any], stratify: str | None = "label") -> list[str]:
    """Each row's stratum: its case's most common ``stratify`` value (ties: the first in sorted order;
    missing values count as ""), or "" for all rows when the column is absent (unstratified)."""
    if stratify is None or stratify not in frame.columns:
        return [""] * len(frame)
    return _majority(keys, ["" if pd.isna(v) else str(v) for v in frame[stratify]])


def _majority(keys: Sequence[Any], values: Sequence[str]) -> list[str]:
    """Each row's case's most common value (ties: the first in sorted order)."""
    votes: dict[Any, dict[str, int]] = {}
    for key, value in zip(keys, values, strict=True):
        votes.setdefault(key, {})
        votes[key][value] = votes[key].get(value, 0) + 1
    label = {k: min(v, key=lambda lab: (-v[lab], lab)) for k, v in votes.items()}
    return [label[k] for k in keys]


def mixed_cases(
    frame: pd.DataFrame, group: str | None = "case_id", stratify: str | None = "label"
) -> list[str]:
    """Cases whose slides carry more than one ``stratify`` value (they are stratified by the most
    common one)."""
    if group is None or stratify is None or group not in frame.columns or stratify not in frame.columns:
        return []
    sub = frame[[group, stratify]].dropna(subset=[group]).astype(str)
    counts = sub.groupby(group)[stratify].nunique()
    return sorted(counts.index[counts > 1])


def split_manifest(
    frame: pd.DataFrame,
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    group: str | None = "case_id",
    stratify: str | None = "label",
) -> pd.DataFrame:
    """The manifest with a ``split`` column: grouped by ``group`` (absent: each slide is its own
    case), stratified by ``stratify`` (absent: unstratified), seeded (see :func:`grouped_split`)."""
    keys = case_keys(frame, group)
    out = frame.copy()
    out["split"] = grouped_split(case_labels(frame, keys, stratify), keys, fractions, seed)
    return out


def split_counts(
    frame: pd.DataFrame, group: str | None = "case_id", stratify: str | None = "label"
) -> pd.DataFrame:
    """Per split (train, val, test, any others, then ``total``): slides, cases and slides per label."""
    keys = pd.Series(case_keys(frame, group), index=frame.index, dtype=object)
    seen = set(frame["split"].astype(str))
    splits = [n for n in DEFAULT_FRACTIONS if n in seen] + sorted(seen - set(DEFAULT_FRACTIONS))
    labels = (
        frame[stratify].map(lambda v: "" if pd.isna(v) else str(v))
        if stratify is not None and stratify in frame.columns
        else None
    )
    names = sorted(set(labels)) if labels is not None else []
    rows = []
    for split in [*splits, "total"]:
        sel = frame["split"].astype(str) == split if split != "total" else pd.Series(True, index=frame.index)
        row: dict[str, Any] = {"split": split, "slides": int(sel.sum()), "cases": keys[sel].nunique()}
        for name in names:
            assert labels is not None
            row[name or "(none)"] = int((sel & (labels == name)).sum())
        rows.append(row)
    return pd.DataFrame(rows).set_index("split")


def grouped_folds(labels: Sequence[str], groups: Sequence[Any], k: int, seed: int = 0) -> list[int]:
    """Each slide's fold in ``0..k-1``: whole cases at a time, every label spread over the folds.

    The folds are :func:`grouped_split` into ``k`` equal shares, so the same guarantees hold: no
    case in two folds, each label's slides as evenly over the folds as its cases allow, seeded.
    """
    if k < 2:
        raise ValueError(f"k must be at least 2 folds, got {k}")
    names = grouped_split(labels, groups, {str(i): 1.0 for i in range(k)}, seed)
    return [int(n) for n in names]


def fold_manifest(
    frame: pd.DataFrame,
    k: int = 5,
    seed: int = 0,
    group: str | None = "case_id",
    stratify: str | None = "label",
) -> pd.DataFrame:
    """The manifest with a ``fold`` column (0..k-1) for k-fold cross-validation: grouped by ``group``
    (absent or empty: each slide its own case), stratified by ``stratify`` (a case under its most
    common value)."""
    keys = case_keys(frame, group)
    out = frame.copy()
    out["fold"] = grouped_folds(case_labels(frame, keys, stratify), keys, k, seed)
    return out


TRAINING_FRACTIONS = (0.1, 0.25, 0.5, 1.0)


def assign_fractions(
    frame: pd.DataFrame,
    fractions: Sequence[float] = TRAINING_FRACTIONS,
    seed: int = 0,
    stratify: str = "label",
    split: str | None = "train",
    group: str | None = "case_id",
) -> pd.DataFrame:
    """Add ``fraction``: the smallest training fraction whose subset holds the slide.

    Subsets are nested (the 10 % subset lies inside the 25 % one, and so on), stratified and
    grouped: each label's cases (``group``; absent: each slide its own case; a case counts under
    its most common label) are ordered once by a seeded shuffle and every fraction takes the cases
    whose middle slide lies within its first ``ceil(f * n)`` slides, the first case always. A case
    is never split between subsets. Slides outside ``split`` get NaN.
    """
    fracs = sorted(float(f) for f in fractions)
    if not fracs or fracs[0] <= 0 or fracs[-1] > 1:
        raise ValueError(f"fractions must lie in (0, 1], got {list(fractions)}")
    out = frame.copy()
    out["fraction"] = np.nan
    pool = out if split is None else out[out["split"] == split]
    keys = case_keys(pool, group)
    labels = case_labels(pool, keys, stratify)
    members: dict[Any, list[Any]] = {}
    for key, row in zip(keys, pool.index, strict=True):
        members.setdefault(key, []).append(row)
    label_of = dict(zip(keys, labels, strict=True))
    for label in sorted(set(labels)):
        cases = [rows for key, rows in members.items() if label_of[key] == label]
        rng = np.random.default_rng([seed, zlib.crc32(label.encode())])
        cases = [cases[k] for k in rng.permutation(len(cases))]
        n = sum(len(c) for c in cases)
        start = 0
        for case in cases:
            for f in fracs:
                if start == 0 or start + len(case) / 2 < max(1, int(np.ceil(f * n - 1e-9))):
                    out.loc[case, "fraction"] = f
                    break
            start += len(case)
    return out


def training_subset(
    frame: pd.DataFrame,
    fraction: float,
    split: str | None = "train",
    seed: int = 0,
    group: str | None = "case_id",
) -> pd.DataFrame:
    """The manifest with only the ``fraction`` subset of its ``split`` slides; other splits stay whole.

    A manifest without a ``fraction`` column gets the standard nested fractions (and ``fraction``
    itself) assigned first, seeded, so 10 % runs see a subset of what 25 % runs see.
    """
    if fraction >= 1.0:
        return frame
    if "fraction" not in frame.columns or frame["fraction"].isna().all():
        fractions = sorted({*TRAINING_FRACTIONS, fraction})
        frame = assign_fractions(frame, fractions, seed=seed, split=split, group=group)
    outside = frame if split is None else frame[frame["split"] != split]
    inside = frame if split is None else frame[frame["split"] == split]
    keep = inside[inside["fraction"] <= fraction + 1e-9]
    return pd.concat([keep, outside.drop(index=keep.index, errors="ignore")]).sort_index()


def select_fraction(frame: pd.DataFrame, fraction: float) -> pd.DataFrame:
    """The slides of the ``fraction`` subset (needs ``assign_fractions`` first)."""
    if "fraction" not in frame.columns:
        raise ValueError("the manifest has no 'fraction' column; call assign_fractions first")
    return frame[frame["fraction"] <= fraction + 1e-9]
