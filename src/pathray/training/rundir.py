"""Where a run lives: a local folder or an object-storage prefix, reached with the project's StorageConfig.

Ray Train writes checkpoints through a pyarrow filesystem; pathray writes the rest of the run
(outputs, model package, digests) through fsspec. Both are built from the same ``StorageConfig``
(endpoint, keys, region), so a custom endpoint such as SeaweedFS on 127.0.0.1 works for both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pathray.wsi.storage import StorageConfig, filesystem, parse_uri


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def join_uri(base: str, *names: str) -> str:
    return "/".join([base.rstrip("/"), *(n.strip("/") for n in names)])


def absolute(storage_path: str) -> str:
    """A local storage path made absolute (Ray resolves relative ones against its own cwd); URIs stay."""
    return storage_path if is_remote(storage_path) else str(Path(storage_path).expanduser().absolute())


def arrow_storage(storage_path: str, storage: StorageConfig | None = None) -> tuple[str, Any]:
    """``RunConfig(storage_path=..., storage_filesystem=...)`` for a run storage path.

    Local paths need no filesystem. ``s3://bucket/prefix`` becomes ``("bucket/prefix",
    pyarrow S3FileSystem)`` with the endpoint, keys and region of ``storage`` (each falling back
    to the usual AWS environment variables), since Ray's own S3 resolution knows no custom endpoint.
    """
    if not is_remote(storage_path):
        return absolute(storage_path), None
    parsed = urlparse(storage_path)
    if parsed.scheme != "s3":
        return storage_path, None  # gs:// etc.: Ray resolves these from the environment
    from pyarrow import fs as pafs

    storage = storage or StorageConfig()
    kwargs: dict[str, Any] = {
        "region": storage.region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        "anonymous": storage.anon,
    }
    env = os.environ
    endpoint = storage.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        url = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = url.netloc
        kwargs["scheme"] = url.scheme
    if storage.key and storage.secret:
        kwargs["access_key"], kwargs["secret_key"] = storage.key, storage.secret
    return f"{parsed.netloc}{parsed.path}".rstrip("/"), pafs.S3FileSystem(**kwargs)


def checkpoint_uri(checkpoint: Any, storage_path: str) -> str:
    """A Ray checkpoint's location as a URI (Ray gives ``bucket/key`` paths on object storage)."""
    path = str(checkpoint.path)
    if is_remote(storage_path) and "://" not in path:
        return f"{urlparse(storage_path).scheme}://{path}"
    return path


def write_bytes(uri: str, data: bytes, storage: StorageConfig | None = None) -> str:
    """Write one whole file of the run (parent folders made on local disk); returns ``uri``.

    A whole-object put: s3fs refuses to open files for writing with the small read block size
    that tile reads want (``StorageConfig.block_size``).
    """
    location = parse_uri(uri)
    fs = filesystem(location, storage)
    if location.is_local:
        fs.makedirs(location.path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(location.path, data)
    return uri


def write_text(uri: str, text: str, storage: StorageConfig | None = None) -> str:
    return write_bytes(uri, text.encode(), storage)
