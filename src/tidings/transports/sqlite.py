"""The embedded transport: in-process fan-out, history in a SQLite file (WAL mode).

Appends run on the event loop: with WAL and `synchronous=NORMAL` a commit is a write to
the OS page cache (no fsync), a few tens of microseconds, and it survives a crash of the
process, which is the promise of an acknowledged publish. Only one process may write the
file; several workers need a shared bus (Redis or PostgreSQL).

A write that fails (a full disk, a file-size limit, an I/O error) stores nothing: SQLite
rolls the statement back, the publish answers 507 (full disk) or 503 with the reason, and
what was acknowledged before stays. The connection stays open, so the first publish after
space is freed works again, with no restart; the outage is logged when it starts and when
it ends, not per refused publish.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator

from tidings.errors import InsufficientStorage, TransportClosed
from tidings.hub.update import Update
from tidings.outage import Outage, OutageHealth
from tidings.sqlitedb import storage_error

__all__ = ["SQLiteTransport"]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS updates (
    seq        INTEGER PRIMARY KEY,
    id         TEXT NOT NULL,
    topics     TEXT NOT NULL,
    data       TEXT NOT NULL,
    private    INTEGER NOT NULL,
    type       TEXT,
    retry      INTEGER,
    created_at REAL NOT NULL,
    frame      BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS updates_id ON updates (id, seq);
"""
_COLUMNS = "seq, id, topics, data, private, type, retry, created_at, frame"
# Prune in batches rather than on every append: one DELETE per this many appends.
_PRUNE_EVERY = 256


def _row_to_update(row: tuple[object, ...]) -> Update:
    seq, id_, topics, data, private, type_, retry, created_at, frame = row
    return Update(
        topics=tuple(json.loads(str(topics))),
        data=str(data),
        id=str(id_),
        private=bool(private),
        type=None if type_ is None else str(type_),
        retry=None if retry is None else int(str(retry)),
        seq=int(str(seq)),
        created_at=float(str(created_at)),
        frame=bytes(frame),  # type: ignore[call-overload]
    )


class SQLiteTransport(OutageHealth):
    """History in SQLite; `tail` is fed directly by `append` in this process."""

    def __init__(
        self, path: str, *, history_size: int = 100_000, history_max_age_s: float = 0.0
    ) -> None:
        self._path = path
        self._history_size = history_size
        self._history_max_age_s = history_max_age_s
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        if path != ":memory:":
            self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM updates").fetchone()
        self._last_seq: int = int(row[0])
        self._appended: list[Update] = []
        self._wakeup = asyncio.Event()
        self._appends_since_prune = 0
        self._closed = False
        self._outage = Outage(f"the hub's history database {path}")

    async def start(self) -> None:
        pass  # the file is opened in __init__: nothing to connect to

    @property
    def last_seq(self) -> int:
        return self._last_seq

    async def append(self, update: Update) -> Update:
        if self._closed:
            raise TransportClosed("the transport is closed")
        existing = await self.find(update.id)
        if existing is not None and existing.frame == update.frame and (
            existing.topics, existing.private) == (update.topics, update.private):
            return existing  # the same update sent again (a retried publish): store it once
        stored = update.stored(self._last_seq + 1, time.time())
        try:
            self._db.execute(
                f"INSERT INTO updates ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    stored.seq,
                    stored.id,
                    json.dumps(stored.topics),
                    stored.data,
                    int(stored.private),
                    stored.type,
                    stored.retry,
                    stored.created_at,
                    stored.frame,
                ),
            )
        except sqlite3.OperationalError as exc:
            error = storage_error(exc, "the update was not stored: the hub's history database")
            self._outage.failed(exc, consequence=(
                "publishes answer 507 until space is freed on its disk"
                if isinstance(error, InsufficientStorage) else "publishes answer 503"))
            raise error from exc
        self._outage.ok()
        self._last_seq = stored.seq
        self._appended.append(stored)
        self._wakeup.set()
        self._appends_since_prune += 1
        if self._appends_since_prune >= _PRUNE_EVERY:
            try:
                self._prune()
            except sqlite3.OperationalError as exc:
                # The update is stored (and acknowledged); retention catches up later.
                log.warning("pruning %s failed (%s); trying again after %d appends",
                            self._path, exc, _PRUNE_EVERY)
        return stored

    async def prune(self) -> int:
        """Apply retention (count, then age); returns how many updates were removed."""
        return self._prune()

    def _prune(self) -> int:
        self._appends_since_prune = 0
        removed = self._db.execute(
            "DELETE FROM updates WHERE seq <= ?", (self._last_seq - self._history_size,)
        ).rowcount
        if self._history_max_age_s > 0:
            cutoff = time.time() - self._history_max_age_s
            removed += self._db.execute(
                "DELETE FROM updates WHERE created_at < ?", (cutoff,)
            ).rowcount
        return int(removed)

    async def read_after(self, seq: int, limit: int) -> list[Update]:
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM updates WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)
        ).fetchall()
        return [_row_to_update(row) for row in rows]

    async def find(self, update_id: str) -> Update | None:
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM updates WHERE id = ? ORDER BY seq DESC LIMIT 1",
            (update_id,),
        ).fetchone()
        return None if row is None else _row_to_update(row)

    async def first_seq(self) -> int:
        row = self._db.execute("SELECT COALESCE(MIN(seq), 0) FROM updates").fetchone()
        return int(row[0])

    async def tail(self, after: int) -> AsyncIterator[Update]:
        # Anything committed before this process started tailing comes from the table.
        while after < self._last_seq and not self._appended:
            for update in await self.read_after(after, 1000):
                after = update.seq
                yield update
        while not self._closed:
            await self._wakeup.wait()
            self._wakeup.clear()
            batch, self._appended = self._appended, []
            for update in batch:
                if update.seq > after:
                    after = update.seq
                    yield update

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wakeup.set()
        self._db.close()
