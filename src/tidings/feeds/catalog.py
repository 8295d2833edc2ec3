"""The collections a feed serves, and what a write through the API must satisfy first.

Every backend keeps one *shape* per collection (its configuration plus how that database
stores it). The lookups (404 for an unknown collection, 405 for one the API may not write)
and the checks a write makes before it touches the database (the id, the metadata fields
a client cannot set, the JSON Schema) are the same for every database, so they live here
once; the shapes themselves are the backend's.

A catalog is replaced, never changed in place: the tailer learns tables watched while the
server runs and swaps in a new catalog, so a request that holds the old one sees a
consistent set.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from types import MappingProxyType
from typing import Generic, Protocol, TypeVar, cast

from tidings.feeds.config import CollectionConfig, check_document_id, own_fields
from tidings.feeds.errors import MethodNotAllowed, SchemaViolation, UnknownCollection
from tidings.feeds.events import JSONObject

__all__ = [
    "Catalog",
    "Shaped",
    "new_document",
    "parse_document",
    "patch_fields",
    "read_only",
    "replacement",
]


class Shaped(Protocol):
    @property
    def config(self) -> CollectionConfig: ...


S = TypeVar("S", bound=Shaped)


class Catalog(Generic[S]):
    """The shapes of the collections served, by name."""

    def __init__(self, shapes: Mapping[str, S] | None = None) -> None:
        self._shapes: dict[str, S] = dict(shapes or {})
        self._by_lower = {name.lower(): name for name in self._shapes}
        # Built once: a catalog is replaced, never changed, and this is read per request.
        self._configs = MappingProxyType(
            {name: shape.config for name, shape in self._shapes.items()})

    def __contains__(self, name: str) -> bool:
        return name in self._shapes

    def with_shape(self, shape: S) -> Catalog[S]:
        """A new catalog with `shape` added (or replacing one of its name)."""
        return Catalog({**self._shapes, shape.config.name: shape})

    @property
    def configs(self) -> Mapping[str, CollectionConfig]:
        return self._configs

    def find(self, name: str, *, any_case: bool = False) -> S | None:
        """The shape named `name` (`any_case`: however the name is capitalized, as SQLite
        compares table names), or None."""
        if any_case:
            name = self._by_lower.get(name.lower(), name)
        return self._shapes.get(name)

    def get(self, name: str) -> S:
        """The shape of a served collection, or UnknownCollection (404)."""
        shape = self._shapes.get(name)
        if shape is None:
            raise UnknownCollection(f"no collection named {name!r}")
        return shape

    def writable(self, name: str) -> S:
        """The shape of a collection the API may write, or MethodNotAllowed (405)."""
        shape = self.get(name)
        if not shape.config.writable:
            raise read_only(shape.config)
        return shape


def read_only(config: CollectionConfig) -> MethodNotAllowed:
    """The 405 for a write to a collection the API does not write."""
    watched = config.watched
    return MethodNotAllowed(f"{config.name} is read-only through the API" + (
        f" ({watched}: write to it with your application)" if watched else ""))


# -- before a write ------------------------------------------------------------------------


def new_document(config: CollectionConfig, document: JSONObject) -> tuple[str, JSONObject]:
    """An insert's id (the client's, checked, or a new one) and its own fields, valid."""
    doc_id = check_document_id(document["id"]) if "id" in document else uuid.uuid4().hex
    own = own_fields(document)
    config.validate(own)
    return doc_id, own


def replacement(config: CollectionConfig, doc_id: str, document: JSONObject) -> JSONObject:
    """A replace's own fields, valid; the id cannot change."""
    if "id" in document and document["id"] != doc_id:
        raise SchemaViolation("the id cannot change", [{
            "field": "id", "message": "the id in the document differs from the URL's"}])
    own = own_fields(document)
    config.validate(own)
    return own


def patch_fields(doc_id: str, patch: JSONObject) -> JSONObject:
    """A merge patch's own fields; the id cannot change. (The merged document is
    validated by the backend, which reads the current one.)"""
    if "id" in patch and patch["id"] != doc_id:
        raise SchemaViolation("the id cannot change", [{
            "field": "id", "message": "the id in the patch differs from the URL's"}])
    return own_fields(patch)


def parse_document(text: object) -> JSONObject:
    """A document as the database returned it (JSON text of an object)."""
    value = json.loads(str(text))
    if not isinstance(value, dict):
        raise ValueError("a document is not a JSON object")
    return cast(JSONObject, value)
