"""MongoFeed: collections of a MongoDB database, watched, listed and resumed like tables.

Each watched collection has one change stream for the whole deployment (a `Tailer` over a
`ChangeStreamSource`, leased among processes). The collections are read-only through the
API: documents are written by the application (pymongo, mongosh), as with watched SQL
tables; a write through the API answers 405.

Tokens are the server's resume tokens, checked by Tidings and never handed to the server
on a client's behalf (a server may silently start from now on a token it does not know,
as nx-27017 does): a watch resumes through the hub's history, where every published
change is stored under its token. So a token resumes exactly when the history holds it;
one that is well-formed but not there (older than the history, or never published) gets
the `event: error` of a token too old, and one of another collection is a 400.

Snapshots (`get`, `list`) take their token *before* reading: the newest change the hub
has published for the collection (or `ORIGIN.0` before the first). A change committed
between that token and the read is in the snapshot and is also streamed after the token:
no gap, but, unlike the SQL feeds (whose reads and tokens come from one transaction),
possibly a change seen twice. Each event carries the whole document, so applying events
in order converges; docs/feeds.md states this price.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tidings.errors import BadRequest, NotFound, ServiceUnavailable
from tidings.feeds.base import Page, ResumePoint, Snapshot, Token, WriteResult
from tidings.feeds.catalog import Catalog, read_only
from tidings.feeds.config import CollectionConfig, MongoConfig
from tidings.feeds.errors import TokenTooOld, UnknownToken
from tidings.feeds.events import JSONObject, ResumeToken, StreamToken
from tidings.feeds.mongodb.driver import (
    UNAVAILABLE,
    database_name,
    from_key,
    id_candidates,
    open_client,
    to_document,
    to_key,
)
from tidings.feeds.mongodb.state import open_states
from tidings.feeds.mongodb.stream import ChangeStreamSource
from tidings.feeds.query import FieldFilter, ListQuery
from tidings.feeds.tailer import Tailer
from tidings.hub.hub import EARLIEST, Hub

__all__ = ["MongoFeed"]

log = logging.getLogger(__name__)

_BATCH = 100


@dataclass(frozen=True, slots=True)
class _Shape:
    config: CollectionConfig


class MongoFeed:
    """The ChangeFeed of watched MongoDB collections (see the module doc); their tokens
    are kept in the hub's database `state_url` (`--db`)."""

    def __init__(self, config: MongoConfig, hub: Hub, *, state_url: str) -> None:
        self._url = config.url
        self._db_name = database_name(config.url)
        self._hub = hub
        self._catalog: Catalog[_Shape] = Catalog(
            {name: _Shape(c) for name, c in config.collections.items()})
        self._states = open_states(state_url)
        self._client: Any = None
        self._sources: dict[str, ChangeStreamSource] = {}
        self._tailers: dict[str, Tailer] = {}

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        await self._states.open()
        self._client = open_client(self._url)
        database = self._client[self._db_name]
        for name, config in self.collections.items():
            source = ChangeStreamSource(database, config, db_name=self._db_name,
                                        states=self._states, transport=self._hub.transport)
            tailer = Tailer(source, self._hub, what=f"MongoDB stream {name}", unit="event",
                            batch=_BATCH)
            self._sources[name], self._tailers[name] = source, tailer
            tailer.start()

    async def stop(self) -> None:
        for tailer in self._tailers.values():
            await tailer.stop()
        client, self._client = self._client, None
        if client is not None:
            await client.close()
        await self._states.close()

    @property
    def collections(self) -> Mapping[str, CollectionConfig]:
        return self._catalog.configs

    def collection(self, name: str) -> CollectionConfig:
        return self._catalog.get(name).config

    # -- writes: not through the API ---------------------------------------------------------

    async def insert(self, name: str, document: JSONObject) -> WriteResult:
        raise read_only(self.collection(name))

    async def replace(self, name: str, doc_id: str, document: JSONObject) -> WriteResult:
        raise read_only(self.collection(name))

    async def update(self, name: str, doc_id: str, patch: JSONObject) -> WriteResult:
        raise read_only(self.collection(name))

    async def delete(self, name: str, doc_id: str) -> WriteResult:
        raise read_only(self.collection(name))

    # -- reads -------------------------------------------------------------------------------

    async def _position(self, name: str) -> Token:
        """Where a snapshot read now resumes (see the module doc)."""
        saved = await self._states.load(name)
        source, tailer = self._sources[name], self._tailers[name]
        last = (source.last_id if tailer.leading else None) or saved.last
        return StreamToken(last) if last is not None else ResumeToken(saved.origin, 0)

    def _documents(self, name: str) -> Any:
        self.collection(name)
        if self._client is None:
            raise ServiceUnavailable("the MongoDB feed is not running")
        return self._client[self._db_name][name]

    async def get(self, name: str, doc_id: str) -> Snapshot:
        documents = self._documents(name)
        try:
            token = await self._position(name)
            found = await documents.find_one({"_id": {"$in": id_candidates(doc_id)}})
        except UNAVAILABLE as exc:
            raise ServiceUnavailable(f"cannot read MongoDB: {exc}") from exc
        if found is None:
            raise NotFound(f"no document {doc_id!r} in {name}")
        return Snapshot(to_document(found), token)

    async def list(self, name: str, query: ListQuery) -> Page:
        documents = self._documents(name)
        if query.sort not in ("", "_id"):
            raise BadRequest("a MongoDB collection sorts by _id only (sort=_id or -_id)")
        conditions = [_condition(f) for f in query.filters]
        if query.after is not None:
            conditions.append({"_id": {"$lt" if query.descending else "$gt":
                                       to_key(query.after[1])}})
        where: dict[str, Any] = {}
        if len(conditions) == 1:
            where = conditions[0]
        elif conditions:
            where = {"$and": conditions}
        try:
            token = await self._position(name)
            cursor = documents.find(where).sort("_id", -1 if query.descending else 1)
            found = await cursor.limit(query.limit + 1).to_list()
        except UNAVAILABLE as exc:
            raise ServiceUnavailable(f"cannot read MongoDB: {exc}") from exc
        next_cursor = None
        if len(found) > query.limit:
            found = found[:query.limit]
            next_cursor = query.cursor_after("_id", None, from_key(found[-1]["_id"]))
        return Page(tuple(to_document(d) for d in found), next_cursor, token)

    # -- resuming ----------------------------------------------------------------------------

    async def resolve(self, token: str) -> ResumePoint:
        raise UnknownToken("a MongoDB resume token resumes the watch of its own collection")

    async def resolve_in(self, name: str, token: str) -> ResumePoint:
        config = self.collection(name)
        transport = self._hub.transport
        try:
            origin: ResumeToken | None = ResumeToken.parse(token)
        except UnknownToken:
            origin = None
        if origin is not None:  # a snapshot from before the first change
            saved = await self._states.load(name)
            if origin != ResumeToken(saved.origin, 0):
                raise UnknownToken("the resume token is not from this collection's stream")
            if saved.first is not None and await transport.find(saved.first) is None:
                raise TokenTooOld(f"the hub's history no longer holds the first change of "
                                  f"{name}; load a new snapshot")
            return ResumePoint(origin, EARLIEST)
        parsed = StreamToken.parse(token)
        update = await transport.find(parsed.data)
        if update is None:
            raise TokenTooOld(
                f"the resume token is not in the hub's history (--history-size, "
                f"--history-max-age): older than it, or not a change of {name} this hub "
                f"published; load a new snapshot")
        if config.topic not in update.topics:
            raise UnknownToken("the resume token is from another collection's stream")
        return ResumePoint(parsed, parsed.data)

    async def prune(self) -> int:
        return 0  # the server keeps the changes (its oplog); the hub keeps its history


def _condition(flt: FieldFilter) -> dict[str, Any]:
    """A field filter as a MongoDB query: any of the value's readings (see query.py);
    `_id` also as an ObjectId or an integer of that text."""
    if any(segment.startswith("$") for segment in flt.path):
        raise BadRequest(f"bad field name {flt.field[:80]!r} in a filter")
    values: list[Any] = list(flt.values)
    if flt.field == "_id":
        values = [c for v in flt.values if isinstance(v, str) for c in id_candidates(v)]
    return {flt.field: {"$in": values}}
