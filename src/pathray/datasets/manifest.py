"""Slide manifests (one row per slide) and slide-level stratified splits; pure pandas, no Ray."""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pathray.storage import join_uri

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
    slides: Sequence[SyntheticSlide],
    uri_prefix: str | None = None,
    cohort: str = "synthetic",
    seed: int = 0,
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
) -> pd.DataFrame:
    """A manifest for synthetic slides, split by :func:`stratified_split` over their labels.

    With ``uri_prefix`` (e.g. ``s3://bucket/slides``) URIs point where the files were uploaded,
    else at the local files; the lead's upload step decides, this function only names them.
    """

    def uri(path: Path) -> str:
        return join_uri(uri_prefix, path.name) if uri_prefix else str(Path(path).resolve())

    splits = stratified_split([s.label for s in slides], fractions, seed=seed)
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


class ManifestError(ValueError):
    """Everything wrong with a manifest, reported together, row by row."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        listed = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in the manifest:\n{listed}")


def load_manifest(source: str | Path, storage: Any = None) -> pd.DataFrame:
    """Read a Parquet or CSV manifest from a path or any URI pathray reads slides from."""
    import io

    from pathray.storage import ObjectNotFoundError, StorageError, read_bytes, translate_error

    text = str(source)
    suffix = Path(text.split("?")[0]).suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise ManifestError(text, [f"a manifest ends in .parquet or .csv, not {suffix or 'no suffix'!r}"])
    try:
        data = io.BytesIO(read_bytes(text, storage))  # within the storage deadline, retried
        frame = pd.read_parquet(data) if suffix == ".parquet" else pd.read_csv(data)
    except ObjectNotFoundError:
        raise ManifestError(text, ["no such file"]) from None
    except StorageError as exc:
        raise ManifestError(text, [exc.cause]) from None
    except Exception as exc:  # noqa: BLE001 - a broken file is a manifest problem, said plainly
        raise ManifestError(text, [translate_error(text, exc).cause]) from None
    return frame


def validate_manifest(
    frame: pd.DataFrame,
    source: str = "manifest",
    storage: Any = None,
    check_uris: bool = True,
    workers: int = 8,
) -> pd.DataFrame:
    """Check columns, ids and (optionally) that every slide and annotation URI is reachable.

    All problems are collected and raised together as a ``ManifestError`` naming rows (1-based,
    as a spreadsheet shows them), so one run reports everything to fix.
    """
    problems: list[str] = []
    required = ("slide_id", "uri", "split")
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ManifestError(
            source, [f"missing column(s): {', '.join(missing)} (required: {', '.join(required)})"]
        )
    ids = frame["slide_id"].astype(str)
    for slide_id, rows in frame.groupby(ids).groups.items():
        if len(rows) > 1:
            problems.append(f"rows {', '.join(str(r + 1) for r in rows)}: duplicate slide_id {slide_id!r}")
    for i, row in enumerate(frame.itertuples(index=False), start=1):
        if not isinstance(row.uri, str) or not row.uri.strip():
            problems.append(f"row {i} ({row.slide_id}): empty uri")
        if not isinstance(row.split, str) or not row.split.strip():
            problems.append(f"row {i} ({row.slide_id}): empty split")
    if check_uris:
        problems.extend(_unreachable(frame, storage, workers))
    if problems:
        raise ManifestError(source, problems)
    return frame


def _unreachable(frame: pd.DataFrame, storage: Any, workers: int) -> list[str]:
    """Stat every URI concurrently (object stores answer slowly one by one)."""
    from concurrent.futures import ThreadPoolExecutor

    from pathray.storage import StorageError, parse_uri, stat
    from pathray.wsi.backends import as_slide_error

    checks: list[tuple[int, str, str, str]] = []
    for i, row in enumerate(frame.to_dict("records"), start=1):
        for column in ("uri", "annotations_uri"):
            value = row.get(column)
            if isinstance(value, str) and value.strip():
                checks.append((i, str(row["slide_id"]), column, value))

    def check(item: tuple[int, str, str, str]) -> str | None:
        i, slide_id, column, uri = item
        try:
            stat(parse_uri(uri), storage)
        except StorageError as exc:
            return f"row {i} ({slide_id}): {column} {as_slide_error(exc) if column == 'uri' else exc}"
        return None

    with ThreadPoolExecutor(max(1, workers)) as pool:
        return [p for p in pool.map(check, checks) if p]


TRAINING_FRACTIONS = (0.1, 0.25, 0.5, 1.0)


def assign_fractions(
    frame: pd.DataFrame,
    fractions: Sequence[float] = TRAINING_FRACTIONS,
    seed: int = 0,
    stratify: str = "label",
    split: str | None = "train",
) -> pd.DataFrame:
    """Add ``fraction``: the smallest training fraction whose subset holds the slide.

    Subsets are nested (the 10 % subset lies inside the 25 % one, and so on) and stratified:
    each label is ordered once by a seeded shuffle and every fraction takes its first
    ``ceil(f * n)`` slides, at least one. Slides outside ``split`` get NaN.
    """
    fracs = sorted(float(f) for f in fractions)
    if not fracs or fracs[0] <= 0 or fracs[-1] > 1:
        raise ValueError(f"fractions must lie in (0, 1], got {list(fractions)}")
    out = frame.copy()
    out["fraction"] = np.nan
    pool = out if split is None else out[out["split"] == split]
    labels = pool[stratify].astype(str) if stratify in pool.columns else pd.Series("", index=pool.index)
    for label in sorted(set(labels)):
        index = pool.index[labels == label].to_numpy()
        rng = np.random.default_rng([seed, zlib.crc32(label.encode())])
        index = index[rng.permutation(len(index))]
        for rank, row in enumerate(index):
            for f in fracs:
                if rank < max(1, int(np.ceil(f * len(index) - 1e-9))):
                    out.loc[row, "fraction"] = f
                    break
    return out


def training_subset(
    frame: pd.DataFrame, fraction: float, split: str | None = "train", seed: int = 0
) -> pd.DataFrame:
    """The manifest with only the ``fraction`` subset of its ``split`` slides; other splits stay whole.

    A manifest without a ``fraction`` column gets the standard nested fractions (and ``fraction``
    itself) assigned first, seeded, so 10 % runs see a subset of what 25 % runs see.
    """
    if fraction >= 1.0:
        return frame
    if "fraction" not in frame.columns or frame["fraction"].isna().all():
        frame = assign_fractions(frame, sorted({*TRAINING_FRACTIONS, fraction}), seed=seed, split=split)
    outside = frame if split is None else frame[frame["split"] != split]
    inside = frame if split is None else frame[frame["split"] == split]
    keep = inside[inside["fraction"] <= fraction + 1e-9]
    return pd.concat([keep, outside.drop(index=keep.index, errors="ignore")]).sort_index()


def select_fraction(frame: pd.DataFrame, fraction: float) -> pd.DataFrame:
    """The slides of the ``fraction`` subset (needs ``assign_fractions`` first)."""
    if "fraction" not in frame.columns:
        raise ValueError("the manifest has no 'fraction' column; call assign_fractions first")
    return frame[frame["fraction"] <= fraction + 1e-9]


def write_synthetic_dataset(
    out: Path,
    n: int,
    size: int,
    seed: int = 0,
    uri_prefix: str | None = None,
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    reuse: bool = False,
) -> Path:
    """Synthetic slides, their annotations and ``out/manifest.parquet``; returns the manifest path.

    With ``reuse`` an existing manifest is returned as is (benchmarks rerun on the same slides).
    """
    from pathray.wsi.synth import SynthConfig, write_synthetic_slides

    path = Path(out) / "manifest.parquet"
    if reuse and path.exists():
        return path
    slides = write_synthetic_slides(Path(out), n=n, seed=seed, config=SynthConfig(size=size))
    return write_manifest(synthetic_manifest(slides, uri_prefix, seed=seed, fractions=fractions), path)
