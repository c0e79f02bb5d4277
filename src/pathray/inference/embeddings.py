"""Tile embeddings of one slide as one Parquet file: what ``pathray embed`` writes and MIL reads.

    write_slide_embeddings(join_uri(out, "case-01.parquet"), table, storage)
    table = read_slide_embeddings(join_uri(out, "case-01.parquet"), storage)

Columns: ``slide_id`` (string), ``x``, ``y`` (int64, the tile's level-0 top-left corner), ``mpp``
(float32, µm/px the tile was read at), ``size`` (int32, tile side in px at that mpp), ``tissue``
(float32, the tile's tissue fraction) and ``embedding`` (a fixed-size list of float16).
The file's metadata (``pathray.*`` keys) says what made it: ``EmbeddingSource``. A file is written
whole or not at all (one put on object storage; a temporary file renamed on local disk), so a file
that exists is complete: that is what a resumed run skips.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pathray.storage import (
    ObjectNotFoundError,
    StorageConfig,
    call,
    join_uri,
    parse_uri,
    read_bytes,
    stat,
    write_bytes,
)

FORMAT_VERSION = 1
META_PREFIX = "pathray."
COLUMNS = ("slide_id", "x", "y", "mpp", "size", "tissue", "embedding")


class EmbeddingFileError(ValueError):
    """An embedding file that is not one pathray wrote, or was written by another model."""

    def __init__(self, uri: str, cause: str) -> None:
        super().__init__(f"embeddings at {uri}: {cause}")
        self.uri, self.cause = uri, cause


@dataclass(frozen=True)
class EmbeddingSource:
    """What produced a slide's embeddings: enough to refuse mixing two models in one folder.

    Attributes:
        model: the name the user gave (a preset, a package URI or a timm name).
        weights_sha256: digest of the model's weights as loaded ("" never: random weights have one too).
        embed_dim: the embedding's length.
        preset: the preset's facts (architecture, normalisation, pooling), empty for other models.
        random_init: True when no weights were loaded (pipeline tests only).
    """

    model: str
    weights_sha256: str
    embed_dim: int
    preset: dict[str, Any] = field(default_factory=dict)
    random_init: bool = False

    def same_model(self, other: EmbeddingSource) -> bool:
        return (self.weights_sha256, self.embed_dim) == (other.weights_sha256, other.embed_dim)


@dataclass
class SlideEmbeddings:
    """One slide's tiles and their embeddings (``embeddings``: ``(N, D)`` float16)."""

    slide_id: str
    x: np.ndarray
    y: np.ndarray
    mpp: np.ndarray
    size: np.ndarray
    tissue: np.ndarray
    embeddings: np.ndarray
    source: EmbeddingSource

    def __len__(self) -> int:
        return len(self.x)

    def __post_init__(self) -> None:
        n = len(self.x)
        for name in ("y", "mpp", "size", "tissue", "embeddings"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{self.slide_id}: {name} has {len(getattr(self, name))} rows, x has {n}")
        if self.embeddings.ndim != 2 or self.embeddings.shape[1] != self.source.embed_dim:
            raise ValueError(
                f"{self.slide_id}: embeddings of shape {self.embeddings.shape}, "
                f"expected (N, {self.source.embed_dim})"
            )


def slide_embeddings_uri(out_uri: str, slide_id: str) -> str:
    """Where ``slide_id``'s embeddings live under an output folder or bucket prefix."""
    return join_uri(out_uri, f"{slide_id}.parquet")


def _metadata(source: EmbeddingSource) -> dict[bytes, bytes]:
    fields = {"format_version": FORMAT_VERSION, **asdict(source)}
    return {f"{META_PREFIX}{k}".encode(): json.dumps(v).encode() for k, v in fields.items()}


def _source(uri: str, meta: dict[bytes, bytes] | None) -> EmbeddingSource:
    values = {
        k.decode()[len(META_PREFIX) :]: json.loads(v)
        for k, v in (meta or {}).items()
        if k.decode(errors="replace").startswith(META_PREFIX)
    }
    if values.pop("format_version", None) != FORMAT_VERSION:
        raise EmbeddingFileError(uri, f"not a pathray embedding file (format {FORMAT_VERSION} expected)")
    try:
        return EmbeddingSource(**values)
    except TypeError as exc:
        raise EmbeddingFileError(uri, f"unreadable metadata ({exc})") from None


def to_parquet(table: SlideEmbeddings) -> bytes:
    """The Parquet bytes of one slide's embeddings, with its source in the file metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, dim = table.embeddings.shape
    flat = pa.array(np.ascontiguousarray(table.embeddings, dtype=np.float16).reshape(-1), pa.float16())
    arrow = pa.table(
        {
            "slide_id": pa.array([table.slide_id] * n, pa.string()),
            "x": pa.array(np.asarray(table.x, np.int64)),
            "y": pa.array(np.asarray(table.y, np.int64)),
            "mpp": pa.array(np.asarray(table.mpp, np.float32)),
            "size": pa.array(np.asarray(table.size, np.int32)),
            "tissue": pa.array(np.asarray(table.tissue, np.float32)),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
        }
    ).replace_schema_metadata(_metadata(table.source))
    sink = io.BytesIO()
    pq.write_table(arrow, sink)
    return sink.getvalue()


def from_parquet(data: bytes, uri: str = "<bytes>") -> SlideEmbeddings:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        arrow = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as exc:
        raise EmbeddingFileError(uri, f"not a Parquet file ({exc})") from None
    source = _source(uri, arrow.schema.metadata)
    missing = [c for c in COLUMNS if c not in arrow.column_names]
    if missing:
        raise EmbeddingFileError(uri, f"columns {missing} missing")
    column = arrow.column("embedding").combine_chunks()
    flat = column.flatten().to_numpy(zero_copy_only=False)
    ids = arrow.column("slide_id").to_pylist()
    return SlideEmbeddings(
        slide_id=str(ids[0]) if ids else parse_uri(uri).path.rsplit("/", 1)[-1].removesuffix(".parquet"),
        x=arrow.column("x").to_numpy(),
        y=arrow.column("y").to_numpy(),
        mpp=arrow.column("mpp").to_numpy(),
        size=arrow.column("size").to_numpy(),
        tissue=arrow.column("tissue").to_numpy(),
        embeddings=np.asarray(flat, np.float16).reshape(len(arrow), source.embed_dim),
        source=source,
    )


def write_slide_embeddings(uri: str, table: SlideEmbeddings, storage: StorageConfig | None = None) -> str:
    """Write one slide's file whole (``write_bytes`` is atomic on local disk and object storage)."""
    return write_bytes(uri, to_parquet(table), storage)


def read_slide_embeddings(uri: str, storage: StorageConfig | None = None) -> SlideEmbeddings:
    """Read one slide's embeddings.

    Raises:
        StorageError: nothing there, or the storage refused.
        EmbeddingFileError: the bytes are not a pathray embedding file.
    """
    return from_parquet(read_bytes(uri, storage), uri)


def read_source(uri: str, storage: StorageConfig | None = None) -> EmbeddingSource | None:
    """The source recorded in an existing file, None when there is none.

    Reads only the Parquet footer (two ranged reads), so checking a finished cohort is cheap."""
    import pyarrow.parquet as pq

    location = parse_uri(uri)
    try:
        size = int(stat(location, storage)["size"])
    except ObjectNotFoundError:
        return None
    try:
        if size < 12:
            raise ValueError(f"{size} bytes")
        tail = call(location, storage, "cat_file", location.path, start=size - 8, end=size)
        if tail[4:] != b"PAR1":
            raise ValueError("no Parquet footer")
        length = int.from_bytes(tail[:4], "little") + 8
        footer = call(location, storage, "cat_file", location.path, start=max(0, size - length), end=size)
        meta = pq.read_schema(io.BytesIO(b"PAR1" + footer) if size > length else io.BytesIO(footer)).metadata
    except Exception as exc:  # noqa: BLE001 - any unreadable footer is a bad file
        raise EmbeddingFileError(uri, f"not a Parquet file ({exc})") from None
    return _source(uri, meta)


def is_complete(uri: str, source: EmbeddingSource, storage: StorageConfig | None = None) -> bool:
    """True when ``uri`` already holds this model's embeddings (a resumed run skips the slide).

    Raises:
        EmbeddingFileError: the file there came from another model: mixing two models' embeddings
            in one folder would silently corrupt every slide-level model trained on it.
    """
    found = read_source(uri, storage)
    if found is None:
        return False
    if not found.same_model(source):
        raise EmbeddingFileError(
            uri,
            f"written by model {found.model!r} (weights {found.weights_sha256[:12]}, dim {found.embed_dim}), "
            f"not {source.model!r} (weights {source.weights_sha256[:12]}, dim {source.embed_dim}): "
            "use another --out",
        )
    return True
