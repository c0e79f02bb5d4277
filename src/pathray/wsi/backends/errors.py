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
