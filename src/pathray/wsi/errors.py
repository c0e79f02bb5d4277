"""Errors for people: every slide failure names the URI and the cause."""

from __future__ import annotations


class SlideError(Exception):
    """A slide could not be opened or read. ``uri`` and ``cause`` are always set."""

    reason = "cannot open"

    def __init__(self, uri: str, cause: str) -> None:
        self.uri = uri
        self.cause = cause
        super().__init__(f"{type(self).__name__}: {self.reason} {uri}: {cause}")

    def __str__(self) -> str:
        return f"{self.reason} {self.uri}: {self.cause}"


class SlideNotFoundError(SlideError):
    """The URI points at nothing (no such file, key or bucket)."""

    reason = "no slide at"


class UnsupportedSchemeError(SlideError):
    """The URI's scheme is not one pathray can read from."""

    reason = "unsupported location"


class SlideAccessError(SlideError):
    """The storage refused access (credentials missing or not allowed)."""

    reason = "access denied to"


class SlideFormatError(SlideError):
    """The bytes are not a whole-slide image any reader understands."""

    reason = "cannot open"


class SlideReadError(SlideError):
    """The slide opened, but its metadata or pixels could not be read."""

    reason = "cannot read"
