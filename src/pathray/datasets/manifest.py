"""Slide manifests (one row per slide): read, check, write, synthesise; pure pandas, no Ray."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from pathray.datasets.splits import (  # noqa: F401 - re-exported: callers import them from here
    DEFAULT_FRACTIONS,
    assign_fractions,
    select_fraction,
    stratified_split,
    training_subset,
)
from pathray.storage import join_uri

if TYPE_CHECKING:
    from pathray.wsi.synth import SyntheticSlide

MANIFEST_COLUMNS = ("slide_id", "uri", "split", "cohort", "label", "annotations_uri")


def manifest_mpp(value: Any) -> float | None:
    """A manifest's ``mpp`` cell as a level-0 µm/px override: None when empty, unparsable or not > 0."""
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        return None
    return mpp if math.isfinite(mpp) and mpp > 0 else None


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


def save_manifest(frame: pd.DataFrame, uri: str | Path, storage: Any = None) -> str:
    """Write a manifest as Parquet or CSV (by suffix) to a path or any storage URI, as one object."""
    import io

    from pathray.storage import write_bytes

    text = str(uri)
    suffix = Path(text.split("?")[0]).suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise ManifestError(text, [f"a manifest ends in .parquet or .csv, not {suffix or 'no suffix'!r}"])
    if suffix == ".parquet":
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        data = buffer.getvalue()
    else:
        data = frame.to_csv(index=False).encode()
    return write_bytes(text, data, storage)


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
