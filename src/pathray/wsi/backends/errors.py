"""Errors for people: every slide failure names the URI and the cause.

A ``SlideError`` is a ``StorageError`` too, so code that handles storage failures handles slides;
failures of the storage layer under a slide become their slide flavour (``as_slide_error``).
"""

from __future__ import annotations

from pathray.storage import (
    AccessDeniedError,
    ObjectNotFoundError,
    StorageError,
    StorageUnavailableError,
    UnsupportedSchemeError,
    describe,
)


class SlideError(StorageError):
    """A slide could not be opened or read. ``uri`` and ``cause`` are always set."""

    reason = "cannot open"


class SlideNotFoundError(SlideError, ObjectNotFoundError):
    """The URI points at nothing (no such file, key or bucket)."""

    reason = "no slide at"


class SlideLocationError(SlideError, UnsupportedSchemeError):
    """The URI's scheme is not one pathray can read slides from."""

    reason = "unsupported location"


class SlideAccessError(SlideError, AccessDeniedError):
    """The storage refused access (credentials missing or not allowed)."""

    reason = "access denied to"


class SlideUnavailableError(SlideError, StorageUnavailableError):
    """The storage holding the slide did not answer within its deadline (worth trying again later)."""

    reason = "storage unavailable for"


class SlideFormatError(SlideError):
    """The bytes are not a whole-slide image any reader understands."""

    reason = "cannot open"


class SlideReadError(SlideError):
    """The slide opened, but its metadata or pixels could not be read."""

    reason = "cannot read"


_FLAVOURS: tuple[tuple[type[StorageError], type[SlideError]], ...] = (
    (ObjectNotFoundError, SlideNotFoundError),
    (AccessDeniedError, SlideAccessError),
    (UnsupportedSchemeError, SlideLocationError),
    (StorageUnavailableError, SlideUnavailableError),
)


def as_slide_error(exc: StorageError) -> SlideError:
    """The slide flavour of a storage failure (same URI and cause)."""
    if isinstance(exc, SlideError):
        return exc
    for storage_type, slide_type in _FLAVOURS:
        if isinstance(exc, storage_type):
            return slide_type(exc.uri, exc.cause)
    return SlideReadError(exc.uri, exc.cause)


def storage_failure(exc: BaseException) -> StorageError | None:
    """The storage failure behind a reader's exception, if any (the reader may have wrapped it).

    A TIFF reader that opens a remote file sees its reads fail; that is an outage or a missing
    object, not a malformed slide, and must keep its flavour (retryable, or not found)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, StorageError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def reader_failure(uri: str, reader: str, exc: BaseException) -> StorageError:
    """What a reader's failure to open a slide is: its storage flavour, else a format error."""
    found = storage_failure(exc)
    if found is not None:
        return as_slide_error(found)
    return SlideFormatError(uri, f"{reader} cannot read it ({describe(exc)})")
