"""What the review store refuses, importable without its database and crypto libraries (the
server imports these whether or not it keeps a store)."""

from __future__ import annotations


class ReviewKeyError(ValueError):
    """No key, a malformed key, or a key that does not open what the store holds."""


class NotFound(LookupError):
    """No filed document (or page) has this id."""


class Conflict(RuntimeError):
    """The document changed since the reviewer read it (another reviewer saved it)."""
