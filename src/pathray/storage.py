"""Where everything lives: URIs -> fsspec filesystems, stat, joins, whole-object reads and writes.

The bottom of the stack (no Ray, nothing above it): slides, annotations, manifests, runs, model
packages and analysis results are all reached through here, on local disk or object storage.

    storage = StorageConfig(endpoint_url="http://127.0.0.1:8333", key_env="MY_KEY", secret_env="MY_SECRET")
    write_bytes(join_uri("s3://bucket/runs", "a", "metrics.json"), b"{}", storage)

Credentials are never persisted: ``key`` and ``secret`` are secrets excluded from every dump, and
dropped when a config is pickled for another process (a Ray worker, actor or replica), which reads
them from the environment variables ``key_env`` and ``secret_env`` instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

from pydantic import Field, SecretStr, field_validator

from pathray.section import Section

SCHEMES = ("file", "s3", "gs", "memory", "http", "https")
AWS_KEY_ENV, AWS_SECRET_ENV = "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"
T = TypeVar("T")

# What signs a request: presigned query strings (SigV2 and SigV4, GCS, Azure SAS), the
# Authorization header's credential and signature, session tokens. None of it may reach a message.
_SECRET_PARAMS = (
    r"AWSAccessKeyId|Signature|X-Amz-[A-Za-z-]+|x-amz-security-token|Expires|GoogleAccessId"
    r"|X-Goog-[A-Za-z-]+|sig|se|sp|sv|sr|st|skoid|sktid|token|access_token"
)
_QUERY = re.compile(r"\?[^\s'\"<>)]*(?:" + _SECRET_PARAMS + r")=[^\s'\"<>)]*", re.IGNORECASE)
_PARAM = re.compile(r"\b(" + _SECRET_PARAMS + r"|Credential|SignedHeaders)=[^\s&,'\"<>)]+", re.IGNORECASE)
_AUTH = re.compile(r"(Authorization['\"]?\s*[:=]\s*b?['\"]?)[^'\"\n]+", re.IGNORECASE)
REDACTED = "<redacted>"


def redact(text: str) -> str:
    """``text`` without signed query strings, signatures, access key ids or session tokens.

    ``http://h/b/k?X-Amz-Credential=...&X-Amz-Signature=...`` becomes ``http://h/b/k?<redacted>``;
    a lone ``Signature=...`` or an Authorization header's value becomes ``<redacted>``. Every
    StorageError's cause goes through here, and so does every failure reason pathray reports.
    """
    if "=" not in text:
        return text
    text = _QUERY.sub("?" + REDACTED, text)
    text = _AUTH.sub(lambda m: m.group(1) + REDACTED, text)
    return _PARAM.sub(lambda m: f"{m.group(1)}={REDACTED}", text)


class _RedactingRecords:
    """A log record factory that redacts every message before any handler sees it (urllib3 logs
    request lines with their query string at DEBUG; botocore logs signed headers)."""

    def __init__(self, inner: Callable[..., logging.LogRecord]) -> None:
        self.inner = inner

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self.inner(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string is the logger's own business
            return record
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return record


def redact_logs() -> None:
    """Redact every log message of this process from now on (idempotent; storage calls it on first use)."""
    factory = logging.getLogRecordFactory()
    if not isinstance(factory, _RedactingRecords):
        logging.setLogRecordFactory(_RedactingRecords(factory))


class StorageError(Exception):
    """Storage could not be reached or refused a request. ``uri`` and ``cause`` are always set."""

    reason = "cannot read"

    def __init__(self, uri: str, cause: str) -> None:
        self.uri = redact(uri)
        self.cause = redact(cause)
        super().__init__(f"{type(self).__name__}: {self.reason} {self.uri}: {self.cause}")

    def __str__(self) -> str:
        return f"{self.reason} {self.uri}: {self.cause}"

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from (uri, cause) in another process: a Ray task's error reaches its caller whole.
        return type(self), (self.uri, self.cause)


class ObjectNotFoundError(StorageError):
    """The URI points at nothing (no such file, key or bucket)."""

    reason = "nothing at"


class AccessDeniedError(StorageError):
    """The storage refused access (credentials missing or not allowed)."""

    reason = "access denied to"


class UnsupportedSchemeError(StorageError):
    """The URI's scheme is not one pathray can read from."""

    reason = "unsupported location"


class StorageUnavailableError(StorageError):
    """The storage did not answer in time, refused connections or kept failing (5xx) until the
    deadline: worth trying again later, unlike a missing object or a refusal."""

    reason = "storage unavailable for"


class StorageConfig(Section):
    """How to reach object storage. Without credentials, the usual AWS chain (environment, profile,
    instance role) applies."""

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. http://127.0.0.1:8333")
    key: SecretStr | None = Field(
        None, exclude=True, description="access key id; never written anywhere (prefer key_env)"
    )
    secret: SecretStr | None = Field(
        None, exclude=True, description="secret access key; never written anywhere (prefer secret_env)"
    )
    key_env: str = Field(AWS_KEY_ENV, description="environment variable holding the access key id")
    secret_env: str = Field(AWS_SECRET_ENV, description="environment variable holding the secret key")
    region: str | None = Field(None, description="region (default: AWS_DEFAULT_REGION)")
    anon: bool = False
    block_size: int = Field(2**18, description="readahead block for metadata reads; tiles use exact ranges")
    cache_dir: str | None = Field(None, description="local copies of slides only OpenSlide can read")
    coalesce_gap: int = Field(
        2**20,
        ge=0,
        description="remote reads: ranges this close become one request (requests cost more than bytes: a "
        "gap pays while it transfers in less than a request's time to first byte)",
    )
    presigned_reads: bool = Field(
        True,
        description="s3: fetch tile ranges over a presigned URL with a plain HTTP pool (less CPU)",
    )
    presign_expires_s: int = Field(3600, gt=60, description="lifetime of presigned URLs; renewed at 80 %")
    # Ranged reads (wsi/backends/ranges.py): how many requests, how large, and what is kept.
    read_concurrency: int = Field(
        16, ge=1, le=256, description="remote reads: range requests in flight at once per process"
    )
    max_request_bytes: int = Field(
        2**23,
        ge=0,
        description="remote reads: merged ranges are cut into requests of at most about this size (each "
        "is held whole while it arrives, several at once, and spread over connections); 0: no limit",
    )
    block_cache_bytes: int = Field(
        0,
        ge=0,
        description="remote reads: bytes of fetched blocks kept in memory per process (least recently "
        "used dropped; concurrent readers of a block wait for one request); 0: off, exact ranges only",
    )
    block_cache_block: int = Field(
        2**16, ge=4096, description="remote reads with the block cache: the aligned block fetched and kept"
    )
    connect_timeout_s: float = Field(5.0, gt=0, description="per request: time to open a connection")
    read_timeout_s: float = Field(20.0, gt=0, description="per request: time without a byte from the server")
    retries: int = Field(
        4, ge=0, le=20, description="retries of a request after timeouts, refused connections or 5xx"
    )
    retry_backoff_s: float = Field(
        0.25, ge=0, description="wait before the first retry; doubles each time, at most 4 s"
    )
    deadline_s: float = Field(
        60.0, gt=0, description="per read, retries included: a hung or dead endpoint fails by then"
    )
    cache_max_bytes: int = Field(
        20 * 2**30,
        gt=0,
        description="local copies of slides only OpenSlide reads: the least recently used go beyond this",
    )

    process_local = ("key", "secret")  # another process reads key_env / secret_env

    @field_validator("key", "secret", mode="after")
    @classmethod
    def _empty_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is not None and value.get_secret_value() else None

    def credentials(self) -> tuple[str, str] | None:
        """``(key, secret)`` given in the config or in ``key_env``/``secret_env``; None: the SDK's own
        chain (the standard AWS variables, profiles, roles), which also knows session tokens."""
        if self.key is not None and self.secret is not None:
            return self.key.get_secret_value(), self.secret.get_secret_value()
        if (self.key_env, self.secret_env) == (AWS_KEY_ENV, AWS_SECRET_ENV):
            return None
        key, secret = os.environ.get(self.key_env), os.environ.get(self.secret_env)
        return (key, secret) if key and secret else None

    def export_env(self) -> None:
        """Put literal credentials into ``key_env``/``secret_env`` of this process, so the processes
        it starts (a local Ray's workers) read them from there. Call before starting them."""
        if self.key is not None and self.secret is not None:
            os.environ[self.key_env] = self.key.get_secret_value()
            os.environ[self.secret_env] = self.secret.get_secret_value()

    def identity(self) -> str:
        """A cache key for handles opened with this config: its settings and a digest of the credentials."""
        digest = hashlib.sha256(repr(self.credentials()).encode()).hexdigest()[:16]
        return f"{self.model_dump_json()}|{digest}"

    def endpoint(self) -> str | None:
        env = os.environ
        return self.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")

    def options_for(self, protocol: str) -> dict[str, Any]:
        """fsspec storage options for ``protocol``."""
        if protocol != "s3":
            return {}
        # No filesystem-wide block size: s3fs writes need blocks of >= 5 MB; slide reads pass
        # ``block_size`` themselves.
        # One attempt per botocore call, bounded by the timeouts; ``retrying`` retries and keeps the deadline.
        config: dict[str, Any] = {
            "connect_timeout": self.connect_timeout_s,
            "read_timeout": self.read_timeout_s,
            "retries": {"max_attempts": 1, "mode": "standard"},
        }
        opts: dict[str, Any] = {"anon": self.anon, "config_kwargs": config}
        if self.endpoint():
            opts["client_kwargs"] = {"endpoint_url": self.endpoint()}
        creds = self.credentials()
        if creds is not None:
            opts["key"], opts["secret"] = creds
        if self.region:
            config["region_name"] = self.region
        return opts

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (0-based)."""
        return min(self.retry_backoff_s * 2**retry, 4.0)


@dataclass(frozen=True)
class Location:
    """A parsed URI: the protocol and the path fsspec understands."""

    uri: str
    protocol: str
    path: str

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]


def cache_root() -> Path:
    """Where pathray keeps local copies and derived data: ``$PATHRAY_CACHE`` or ~/.cache/pathray."""
    return Path(os.environ.get("PATHRAY_CACHE", Path.home() / ".cache" / "pathray")).expanduser()


def parse_uri(uri: str | os.PathLike[str]) -> Location:
    """Split a URI into protocol and path; plain paths are local files."""
    text = os.fspath(uri)
    parsed = urlparse(text)
    scheme = parsed.scheme.lower()
    if scheme == "" or (len(scheme) == 1 and os.name == "nt"):
        return Location(text, "file", str(Path(text).expanduser().absolute()))
    if scheme not in SCHEMES:
        raise UnsupportedSchemeError(
            text, f"scheme {scheme!r} is not supported (use one of {', '.join(SCHEMES)})"
        )
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise UnsupportedSchemeError(text, f"file URIs must not name a host ({parsed.netloc!r})")
        return Location(text, "file", unquote(parsed.path))
    if scheme in ("http", "https"):
        return Location(text, scheme, text)
    if not parsed.netloc:
        raise UnsupportedSchemeError(text, f"a {scheme}:// URI needs a bucket name")
    return Location(text, scheme, f"{parsed.netloc}{parsed.path}")


def is_remote(uri: str) -> bool:
    """Whether ``uri`` names object storage (anything but a plain path or ``file://``)."""
    return "://" in uri and not uri.startswith("file://")


def absolute(uri: str) -> str:
    """A local path made absolute (Ray resolves relative ones against its own cwd); URIs stay."""
    return uri if is_remote(uri) else str(Path(uri).expanduser().absolute())


def join_uri(base: str, *names: str) -> str:
    """``base/name/...`` for folders and bucket prefixes alike."""
    return "/".join([base.rstrip("/"), *(n.strip("/") for n in names)])


_FS_LOCK = threading.Lock()


def filesystem(location: Location, storage: StorageConfig | None = None) -> Any:
    """The fsspec filesystem for ``location`` (instances are cached by fsspec per options).

    Each of its requests is bounded by the config's timeouts and made once: call it through
    ``retrying`` (as every read here does) for retries with backoff and an overall deadline.
    """
    import fsspec

    storage = storage or StorageConfig()
    redact_logs()
    try:
        with _FS_LOCK:
            fs = fsspec.filesystem(location.protocol, **storage.options_for(location.protocol))
    except ImportError as exc:
        raise UnsupportedSchemeError(
            location.uri, f"the {location.protocol} filesystem is not installed ({exc.name})"
        ) from None
    if location.protocol == "s3":
        fs.retries = 1  # s3fs retries 5 times on its own by default: ``retrying`` does it, once
    return fs


# Exceptions (by class name anywhere in their MRO or cause chain) that mean "the storage did not
# answer", as opposed to "the storage answered no": timeouts, refused or dropped connections.
_TRANSIENT_TYPES = frozenset(
    {
        "TimeoutError",
        "FSTimeoutError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ConnectionError",
        "ClientConnectionError",
        "ClientPayloadError",
        "ServerDisconnectedError",
        "ProtocolError",
        "NewConnectionError",
        "IncompleteRead",
        "RemoteDisconnected",
        "TransientHTTPError",
    }
)
_TRANSIENT_TEXT = re.compile(
    r"SlowDown|ServiceUnavailable|InternalError|RequestTimeout|\b50[0234]\b|Service Unavailable",
    re.IGNORECASE,
)


class TransientHTTPError(Exception):
    """A 5xx answer: the server is there but failing; worth a retry."""


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` says the storage did not answer in time or failed on its side (retry it)."""
    seen: set[int] = set()
    item: BaseException | None = exc
    while item is not None and id(item) not in seen:
        seen.add(id(item))
        if isinstance(item, StorageUnavailableError):
            return True
        if isinstance(item, StorageError):
            return False
        if any(cls.__name__ in _TRANSIENT_TYPES for cls in type(item).__mro__):
            return True
        if isinstance(item, OSError) and _TRANSIENT_TEXT.search(str(item)):
            return True
        item = item.__cause__ or item.__context__
    return False


def describe(exc: BaseException) -> str:
    """One line for people: the exception's type and first line, redacted."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return redact(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def retrying(uri: str, storage: StorageConfig | None, attempt: Callable[[float], T]) -> T:
    """``attempt(seconds_left)`` until it succeeds, retried on transient failures within the deadline.

    ``attempt`` gets the seconds left before ``storage.deadline_s`` and must not take (much)
    longer; it is retried up to ``storage.retries`` times with doubling backoff while the failure
    is transient (``is_transient``). Any other failure is translated at once.

    Raises:
        StorageUnavailableError: the deadline passed or the retries ran out on transient failures.
        StorageError: another failure (ObjectNotFoundError, AccessDeniedError, ...).
    """
    storage = storage or StorageConfig()
    start = time.monotonic()
    deadline = start + storage.deadline_s
    tries = 0
    while True:
        tries += 1
        try:
            return attempt(max(deadline - time.monotonic(), 0.001))
        except Exception as exc:  # noqa: BLE001 - every failure is translated or retried
            if not is_transient(exc):
                raise translate_error(uri, exc) from None
            last = exc
        left = deadline - time.monotonic()
        wait = storage.backoff(tries - 1)
        if tries > storage.retries or left <= wait:
            break
        time.sleep(wait)
    raise StorageUnavailableError(
        uri,
        f"no answer after {tries} attempt(s) in {time.monotonic() - start:.1f} s "
        f"(deadline {storage.deadline_s:g} s; last: {describe(last)})",
    ) from None


def call(location: Location, storage: StorageConfig | None, method: str, *args: Any, **kwargs: Any) -> Any:
    """``filesystem(location).method(*args, **kwargs)`` within the deadline, retried (see ``retrying``).

    Async filesystems (s3, gs, http) are also cut off when the seconds left run out.
    """
    fs = filesystem(location, storage)

    def attempt(left: float) -> Any:
        return getattr(fs, method)(*args, **kwargs, **time_limit(fs, left))

    return retrying(location.uri, storage, attempt)


def time_limit(fs: Any, left: float) -> dict[str, float]:
    """The keyword that cuts an fsspec call off after ``left`` seconds: async filesystems (s3, gs,
    http) take ``timeout``; the others have no such keyword (their own requests are bounded)."""
    return {"timeout": left} if getattr(fs, "async_impl", False) else {}


def translate_error(uri: str, exc: BaseException) -> StorageError:
    """Map a storage library's exception onto the StorageError a person can act on."""
    if isinstance(exc, StorageError):
        return exc
    if is_transient(exc):
        return StorageUnavailableError(uri, describe(exc))
    text = describe(exc)
    low = text.lower()
    if isinstance(exc, FileNotFoundError) or "nosuchkey" in low or "nosuchbucket" in low or "404" in low:
        detail = f" ({redact(str(exc))})" if str(exc) else ""
        return ObjectNotFoundError(uri, "no such file or object" + detail)
    if isinstance(exc, PermissionError) or "accessdenied" in low or "access denied" in low or "403" in low:
        return AccessDeniedError(uri, f"the storage refused access; check the credentials ({text})")
    if isinstance(exc, IsADirectoryError):
        return ObjectNotFoundError(uri, "is a directory, not a file")
    return StorageError(uri, text)


def stat(location: Location, storage: StorageConfig | None = None) -> dict[str, Any]:
    """Size and version tag (ETag or mtime) of the object: the cache key for derived data."""
    info = call(location, storage, "info", location.path)
    if info.get("type") == "directory":
        raise ObjectNotFoundError(location.uri, "is a directory, not a file")
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return {"size": int(info.get("size") or 0), "tag": str(tag).strip('"')}


def read_bytes(uri: str, storage: StorageConfig | None = None) -> bytes:
    """One whole object's bytes.

    Raises:
        StorageError: ObjectNotFoundError when nothing is there, AccessDeniedError, ...
    """
    location = parse_uri(uri)
    return call(location, storage, "cat_file", location.path)


def write_bytes(uri: str, data: bytes, storage: StorageConfig | None = None) -> str:
    """Write one whole object, replacing any earlier version (parent folders made on local disk).

    Atomic: one PUT on object storage, a renamed temporary file on local disk. A whole-object
    put, since s3fs refuses to open files for writing with the small read block size that tile
    reads want (``StorageConfig.block_size``). Returns ``uri``.
    """
    location = parse_uri(uri)
    if location.is_local:  # a temporary file renamed into place: a reader never sees half a file
        tmp = f"{location.path}.tmp-{os.getpid()}-{threading.get_ident()}"
        try:
            os.makedirs(location.path.rsplit("/", 1)[0], exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, location.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise translate_error(uri, exc) from None
        return uri
    call(location, storage, "pipe_file", location.path, data)  # one PUT: whole or nothing
    return uri


def write_text(uri: str, text: str, storage: StorageConfig | None = None) -> str:
    return write_bytes(uri, text.encode(), storage)


def arrow_filesystem(uri: str, storage: StorageConfig | None = None) -> tuple[str, Any]:
    """``(path, pyarrow filesystem)`` for ``uri``: what Ray Train's ``RunConfig`` writes runs through.

    Local paths need no filesystem. ``s3://bucket/prefix`` becomes ``("bucket/prefix",
    pyarrow S3FileSystem)`` with the endpoint, credentials and region of ``storage`` (each falling
    back to the usual AWS environment), since Ray's own S3 resolution knows no custom endpoint.
    """
    if not is_remote(uri):
        return absolute(uri), None
    parsed = urlparse(uri)
    if parsed.scheme != "s3":
        return uri, None  # gs:// etc.: Ray resolves these from the environment
    from pyarrow import fs as pafs

    storage = storage or StorageConfig()
    kwargs: dict[str, Any] = {
        "region": storage.region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        "anonymous": storage.anon,
    }
    endpoint = storage.endpoint()
    if endpoint:
        url = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = url.netloc
        kwargs["scheme"] = url.scheme
    creds = storage.credentials()
    if creds is not None:
        kwargs["access_key"], kwargs["secret_key"] = creds
    kwargs["connect_timeout"] = storage.connect_timeout_s
    kwargs["request_timeout"] = storage.read_timeout_s
    kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=storage.retries + 1)
    return f"{parsed.netloc}{parsed.path}".rstrip("/"), pafs.S3FileSystem(**kwargs)
