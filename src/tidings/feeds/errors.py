"""The feeds' errors, in the tree of `tidings.errors`; each carries its HTTP status.

    NotFound            404  UnknownCollection
    BadRequest          400  UnknownToken (malformed, other database, from the future),
                             ConfigError (a bad collections configuration)
    MethodNotAllowed    405  writing to a watched table through the API
    Conflict            409  inserting an id that exists
    └── NameTaken       409  defining or dropping a name the configuration file declares,
                             or one that is a table of another kind
    TokenTooOld         410  a resume token older than the retained change log
    SchemaViolation     422  a document the collection's JSON Schema refuses
    └── InvalidDefinition 422  a collection definition (read, write, schema) that is not one
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tidings.errors import BadRequest, NotFound, TidingsError

__all__ = [
    "ConfigError",
    "Conflict",
    "InvalidDefinition",
    "MethodNotAllowed",
    "NameTaken",
    "SchemaViolation",
    "TokenTooOld",
    "UnknownCollection",
    "UnknownToken",
]


class ConfigError(BadRequest):
    """The collections configuration (file or `tidings watch`) cannot be used."""


class UnknownCollection(NotFound):
    """No collection (managed or watched table) of that name is configured."""


class Conflict(TidingsError, status_hint=409):
    """A document with that id already exists."""


class MethodNotAllowed(TidingsError, status_hint=405):
    """Writing through the API to a collection that does not allow it (a watched table)."""


class SchemaViolation(TidingsError, status_hint=422):
    """The document does not satisfy the collection's JSON Schema."""

    def __init__(self, message: str, errors: Sequence[Mapping[str, str]]) -> None:
        super().__init__(message)
        # [{"field": "username", "message": "..."}]: one entry per failing field.
        self.errors = tuple(errors)


class UnknownToken(BadRequest):
    """A resume token that is malformed, from another database, or from the future."""


class TokenTooOld(TidingsError, status_hint=410):
    """A well-formed token whose position the retained change log no longer covers.

    The watch endpoint sends it as an `event: error` on the stream (not a 4xx): the client
    must reload a snapshot."""


class NameTaken(Conflict):
    """A collection name a definition may not take or drop: the configuration file declares
    it (the file wins), or it names a watched table or a table of the user's own."""


class InvalidDefinition(SchemaViolation):
    """A collection definition whose read or write rule or JSON Schema is not valid."""
