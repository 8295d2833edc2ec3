"""The feeds' errors, in the tree of `tidings.errors`; each carries its HTTP status.

    NotFound            404  UnknownCollection
    BadRequest          400  UnknownToken (malformed, other database, from the future),
                             ConfigError (a bad collections configuration)
    MethodNotAllowed    405  writing to a watched table through the API
    Conflict            409  inserting an id that exists
    TokenTooOld         410  a resume token older than the retained change log
    SchemaViolation     422  a document the collection's JSON Schema refuses
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tidings.errors import BadRequest, NotFound, TidingsError

__all__ = [
    "ConfigError",
    "Conflict",
    "MethodNotAllowed",
    "SchemaViolation",
    "TokenTooOld",
    "UnknownCollection",
    "UnknownToken",
]


class ConfigError(BadRequest):
    """The collections configuration (file or `tidings watch`) cannot be used."""


class UnknownCollection(NotFound):
    """No collection (managed or watched table) of that name is configured."""


class Conflict(TidingsError):
    """A document with that id already exists."""

    status_hint = 409


class MethodNotAllowed(TidingsError):
    """Writing through the API to a collection that does not allow it (a watched table)."""

    status_hint = 405


class SchemaViolation(TidingsError):
    """The document does not satisfy the collection's JSON Schema."""

    status_hint = 422

    def __init__(self, message: str, errors: Sequence[Mapping[str, str]]) -> None:
        super().__init__(message)
        # [{"field": "username", "message": "..."}]: one entry per failing field.
        self.errors = tuple(errors)


class UnknownToken(BadRequest):
    """A resume token that is malformed, from another database, or from the future."""


class TokenTooOld(TidingsError):
    """A well-formed token whose position the retained change log no longer covers.

    The watch endpoint sends it as an `event: error` on the stream (not a 4xx): the client
    must reload a snapshot."""

    status_hint = 410
