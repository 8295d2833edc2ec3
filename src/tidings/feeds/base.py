"""What every change feed offers, whatever the database: the interface the web layer uses.

A *collection* is a table Tidings watches. Triggers (or the database's own mechanism)
append every change, by any writer, to a change log in the same transaction; the feed
tails that log and publishes each change through the hub as a MongoDB-shaped change event
whose SSE id is the change's resume token. The SQLite feed lives in `feeds/sqlite/`,
the PostgreSQL feed (a trigger log cut into batches by transaction snapshots) in
`feeds/postgres/`.

The contract an implementation keeps:

* Positions only grow (never reused, even after the log is pruned empty), so a token
  names one position forever. A transaction's changes are together and in statement
  order, and one that committed before another began comes first (SQLite: commit order).
* The tailer publishes each change with `ResumeToken(epoch, seq)` as the update id and
  data built only from the stored row (`events.change_update`), then saves its cursor
  after the hub acknowledged: a republish after a crash is an identical update, which the
  transport stores once.
* `snapshot` reads (get, list) return the token of the moment they read, from the same
  read transaction, so "snapshot, then changes after its token" has no gap and no double.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeAlias, runtime_checkable

from tidings.feeds.config import CollectionConfig
from tidings.feeds.events import JSONObject, ResumeToken, StreamToken
from tidings.feeds.query import ListQuery

__all__ = [
    "ChangeFeed",
    "CollectionResolver",
    "FeedStatus",
    "Page",
    "ResumePoint",
    "Retention",
    "Snapshot",
    "StatusReporting",
    "Token",
    "WriteResult",
    "resolve_in",
]

# A position a client resumes after: a change log's `EPOCH.SEQ`, or the resume token of a
# database's own change stream (MongoDB).
Token: TypeAlias = ResumeToken | StreamToken


# -- values --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Retention:
    """How much of the change log is kept: the newest `size` changes, and (when
    `max_age_s` > 0) none older than that. Unpublished changes are never pruned."""

    size: int = 100_000
    max_age_s: float = 0.0


@dataclass(frozen=True, slots=True)
class WriteResult:
    """A write through the API: the stored document (before the change, for a delete)
    and the token of the change it made."""

    document: JSONObject
    token: Token


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One document as read, and the token of the moment it was read."""

    document: JSONObject
    token: Token


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a list, the cursor of the next (None: last page) and the token of the
    moment the page was read."""

    documents: tuple[JSONObject, ...]
    next_cursor: str | None
    token: Token


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """Where a watch resumes: the changes after `token`.

    `last_event_id` is what to hand to `Hub.connect` so that its replay starts at or
    before the first change after `token` (the token itself, or `earliest` for the very
    beginning); a watcher drops anything at or below `token.seq` (`floor`; 0 for a
    stream token, which the hub's history resolves exactly).
    """

    token: Token
    last_event_id: str
    floor: int = field(init=False)

    def __post_init__(self) -> None:
        floor = self.token.seq if isinstance(self.token, ResumeToken) else 0
        object.__setattr__(self, "floor", floor)


@dataclass(frozen=True, slots=True)
class FeedStatus:
    """What a feed tells operators (`/metrics`): known without any I/O."""

    backend: str  # "postgresql", "sqlite"
    capture: str  # how it captures changes, e.g. "snapshot-ordered log"
    leading: bool  # this process tails the change log (else another one does)
    published: int  # the newest position this process's tailer published
    # How long the oldest change the tailer has read but not yet published has waited;
    # None when not measured (not leading, or a backend that does not say).
    lag_s: float | None
    # Logical decoding: the bytes of WAL its replication slot holds behind the server's
    # current position (None: no slot, or not this process's to read).
    slot_lag_bytes: int | None = None
    # Logical decoding, this process tailing: whether the slot is streamed over a
    # replication connection (False: read with SQL functions; None: no slot to read).
    slot_streamed: bool | None = None
    # Logical decoding, this process tailing: the steps its tailer made, each a transaction
    # that copies what the slot holds into the log (None: no slot to read).
    slot_steps: int | None = None


@runtime_checkable
class StatusReporting(Protocol):
    """A feed that reports its status (optional, beside `ChangeFeed`)."""

    def status(self) -> FeedStatus: ...


class ChangeFeed(Protocol):
    """A database's collections, their change log, and the tailer that publishes it."""

    async def start(self) -> None:
        """Create what the feed needs (change log, managed tables, triggers) and start
        tailing. Called once, after the hub has started."""
        ...

    async def stop(self) -> None:
        """Stop tailing and close connections. Called before the hub stops."""
        ...

    @property
    def collections(self) -> Mapping[str, CollectionConfig]:
        """Every collection served, managed or watched table, by name."""
        ...

    def collection(self, name: str) -> CollectionConfig:
        """The collection's configuration, or UnknownCollection (404)."""
        ...

    # -- managed collections: writes (each one change in the log) --------------------

    async def insert(self, name: str, document: JSONObject) -> WriteResult:
        """Store a new document; an id is generated when it has none. Conflict (409) when
        the id exists; SchemaViolation (422)."""
        ...

    async def replace(self, name: str, doc_id: str, document: JSONObject) -> WriteResult:
        """Replace the document (a `replace` change). NotFound when absent."""
        ...

    async def update(self, name: str, doc_id: str, patch: JSONObject) -> WriteResult:
        """Merge `patch` into the document (RFC 7396: null removes a field); an `update`
        change with the diff. NotFound when absent."""
        ...

    async def delete(self, name: str, doc_id: str) -> WriteResult:
        """Delete the document; the result carries it as it was. NotFound when absent."""
        ...

    # -- reads (any collection), each with the token of the moment read --------------

    async def get(self, name: str, doc_id: str) -> Snapshot: ...

    async def list(self, name: str, query: ListQuery) -> Page: ...

    # -- resuming and retention ------------------------------------------------------

    async def resolve(self, token: str) -> ResumePoint:
        """Check a client's resume token and say where a watch resumes. UnknownToken (400)
        for malformed or unknown tokens, TokenTooOld when the log or the hub's history no
        longer covers the changes after it. Waits (bounded) until the tailer has
        published the token's change, so a token from a fresh snapshot resumes at once."""
        ...

    async def prune(self) -> int:
        """Apply retention now; returns how many changes were removed."""
        ...


@runtime_checkable
class CollectionResolver(Protocol):
    """A feed whose tokens belong to one collection each (a change stream per collection,
    as MongoDB's): it resolves a token for the collection a watch names."""

    async def resolve_in(self, name: str, token: str) -> ResumePoint: ...


async def resolve_in(feed: ChangeFeed, name: str, token: str) -> ResumePoint:
    """Where a watch of collection `name` resumes after `token` (see `resolve`)."""
    if isinstance(feed, CollectionResolver):
        return await feed.resolve_in(name, token)
    return await feed.resolve(token)
