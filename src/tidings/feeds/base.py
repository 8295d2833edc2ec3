"""What every change feed offers, whatever the database: the interface the web layer uses.

A *collection* is a table Tidings watches. Triggers (or the database's own mechanism)
append every change, by any writer, to a change log in the same transaction; the feed
tails that log and publishes each change through the hub as a MongoDB-shaped change event
whose SSE id is the change's resume token. The SQLite feed lives in `feeds/sqlite.py`,
the PostgreSQL feed (triggers + LISTEN/NOTIFY as a wake-up) in `feeds/postgres.py`.

The contract an implementation keeps:

* Change-log order is commit order, and `seq` only grows (never reused, even after the
  log is pruned empty), so a token names one position forever.
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
from typing import Protocol

from tidings.feeds.config import CollectionConfig
from tidings.feeds.events import JSONObject, ResumeToken
from tidings.feeds.query import ListQuery

__all__ = ["ChangeFeed", "Page", "ResumePoint", "Retention", "Snapshot", "WriteResult"]


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
    token: ResumeToken


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One document as read, and the token of the moment it was read."""

    document: JSONObject
    token: ResumeToken


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a list, the cursor of the next (None: last page) and the token of the
    moment the page was read."""

    documents: tuple[JSONObject, ...]
    next_cursor: str | None
    token: ResumeToken


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """Where a watch resumes: the changes after `token`.

    `last_event_id` is what to hand to `Hub.connect` so that its replay starts at or
    before the first change after `token` (the token itself, or `earliest` for the very
    beginning); a watcher drops anything at or below `token.seq` (`floor`).
    """

    token: ResumeToken
    last_event_id: str
    floor: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "floor", self.token.seq)


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
