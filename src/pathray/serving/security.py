"""Request checks as pure functions: slide URIs under allowed prefixes, bearer tokens, safe ids.

A slide URI from a request is never opened before ``check_slide_uri`` accepts it, so a client
cannot make the service read ``/etc/passwd``, another bucket or an internal host.
"""

from __future__ import annotations

import hmac
import os
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

MAX_URI_CHARS = 2048
SCHEMES = ("file", "s3", "gs", "memory", "http", "https")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")
_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class UriRejected(ValueError):
    """A slide URI the service refuses: ``status`` is 422 (malformed) or 403 (not allowed)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class _Parts:
    scheme: str
    host: str
    path: str  # percent-decoded, always starting with "/"


def _split(uri: str, what: str = "slide") -> _Parts:
    """Scheme, host and decoded path of ``uri``, or UriRejected(422) when it is malformed."""
    if not isinstance(uri, str) or not uri.strip():
        raise UriRejected(422, f"the {what} URI is empty")
    if len(uri) > MAX_URI_CHARS:
        raise UriRejected(422, f"the {what} URI is longer than {MAX_URI_CHARS} characters")
    if uri != uri.strip() or _CONTROL.search(uri):
        raise UriRejected(422, f"the {what} URI has control characters, backslashes or outer spaces")
    text = f"file://{uri}" if uri.startswith("/") else uri
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if not scheme or "://" not in text:
        raise UriRejected(422, f"{uri!r} is not a URI: use scheme://... or an absolute path")
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        raise UriRejected(422, f"{uri!r}: query strings and fragments are not accepted")
    if "@" in parts.netloc:
        raise UriRejected(403, f"{uri!r}: credentials in the URI are not allowed")
    path = unquote(parts.path)
    if _ESCAPE.search(path):
        raise UriRejected(422, f"{uri!r}: doubly percent-encoded characters are not accepted")
    if _CONTROL.search(path):
        raise UriRejected(422, f"{uri!r}: encoded control characters or backslashes are not accepted")
    path = path if path.startswith("/") else "/" + path
    return _Parts(scheme, parts.netloc.lower(), path)


def _segments_ok(uri: str, path: str) -> None:
    segments = path.split("/")[1:]
    if any(s in (".", "..") for s in segments):
        raise UriRejected(403, f"{uri!r}: '.' and '..' path segments are not allowed")
    if any(s == "" for s in segments[:-1]):
        raise UriRejected(422, f"{uri!r}: empty path segments ('//') are not accepted")


def normalise_prefix(prefix: str) -> str:
    """An allowed prefix as ``scheme://host/path/`` (absolute paths become file:// prefixes)."""
    parts = _split(prefix, "allowed prefix")
    _segments_ok(prefix, parts.path)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"allowed prefix {prefix!r}: scheme must be one of {', '.join(SCHEMES)}")
    if parts.scheme not in ("file",) and not parts.host:
        raise ValueError(f"allowed prefix {prefix!r} needs a bucket or host")
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    return f"{parts.scheme}://{parts.host}{path}"


def check_slide_uri(uri: str, allowed_prefixes: list[str], resolve_links: bool = True) -> str:
    """The URI to open if ``uri`` lies under an allowed prefix; otherwise UriRejected.

    Nothing is read: only the string is parsed, and for ``file://`` the path's symlinks are
    resolved (``os.path.realpath``) so a link inside an allowed folder cannot point outside it.

    Args:
        uri: the slide URI from the request (``s3://b/k``, ``file:///p``, an absolute path, ...).
        allowed_prefixes: normalised prefixes (see ``normalise_prefix``).
        resolve_links: resolve symlinks of local paths (off only for tests of the string rules).

    Returns:
        The URI to hand to ``open_slide``, percent-decoded as it was checked; for local files
        the resolved absolute path.

    Raises:
        UriRejected: 422 for malformed URIs, 403 for URIs outside every allowed prefix.
    """
    parts = _split(uri)
    _segments_ok(uri, parts.path)
    if parts.scheme not in SCHEMES:
        raise UriRejected(403, f"{uri!r}: scheme {parts.scheme!r} is not allowed")
    if parts.scheme == "file" and parts.host not in ("", "localhost"):
        raise UriRejected(403, f"{uri!r}: file URIs must not name a host ({parts.host!r})")
    if parts.scheme != "file" and not parts.host:
        raise UriRejected(422, f"{uri!r}: a {parts.scheme}:// URI needs a bucket or host")
    if not allowed_prefixes:
        raise UriRejected(403, "no slide locations are allowed (serve.security.allowed_prefixes is empty)")
    allowed = [_split(p, "allowed prefix") for p in allowed_prefixes]
    host = "" if parts.scheme == "file" else parts.host
    same_scheme = [p for p in allowed if p.scheme == parts.scheme]
    if not same_scheme:
        schemes = sorted({p.scheme for p in allowed})
        raise UriRejected(403, f"{uri!r}: scheme {parts.scheme!r} is not allowed (allowed: {schemes})")
    same_host = [p for p in same_scheme if ("" if p.scheme == "file" else p.host) == host]
    if not same_host:
        raise UriRejected(403, f"{uri!r}: {parts.scheme} host or bucket {parts.host!r} is not allowed")
    under = [p for p in same_host if parts.path.startswith(p.path) and parts.path != p.path]
    if not under:
        raise UriRejected(403, f"{uri!r} is not under an allowed prefix")
    if parts.scheme != "file":
        return f"{parts.scheme}://{parts.host}{parts.path}"  # what was checked is what gets opened
    if not resolve_links:
        return parts.path
    real = os.path.realpath(parts.path)
    for prefix in under:
        root = os.path.realpath(prefix.path.rstrip("/") or "/")
        if real.startswith(root.rstrip("/") + "/"):
            return real
    raise UriRejected(403, f"{uri!r} resolves (through a link) to a path outside the allowed prefixes")


def token_matches(header: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <token>`` (constant-time compare)."""
    if not header:
        return False
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


def is_safe_id(value: str) -> bool:
    """Model and analysis ids become path segments: letters, digits, '.', '_', '-' only."""
    return bool(SAFE_ID.match(value)) and value not in (".", "..")
