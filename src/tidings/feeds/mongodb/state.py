"""Where each watched collection's change stream resumes, kept in the hub's database.

Like the SQL feeds' cursor (`tidings_feed_state`), the resume token is saved in the
database `--db` names (a table `tidings_mongo_state` in the SQLite file or the PostgreSQL
schema; in memory for `memory://`), only after the hub acknowledged the change it names.
And like the SQL feeds, one process among those sharing that database holds a collection's
stream: the same leases, a file lock beside the SQLite file (the SQLite feed's tailer
lock) or a session advisory lock on a PostgreSQL connection of its own (the PostgreSQL
feed's). Either is released when its process ends, however it ends, and another process
waiting for it takes over from the saved token.

Per collection: `token` (the server's resume token after the last published change; None
before the stream was ever opened), `start_after` (the stream was invalidated: open the
next one with startAfter, as MongoDB requires), `origin` (made once: a snapshot taken
before any change is `ORIGIN.0`), `first` (the update id of the first change published,
to tell whether the hub's history still holds them all) and `last` (the newest one: where
a snapshot read by a process that does not hold the stream resumes).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import secrets
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from typing import Protocol
from urllib.parse import urlsplit

from tidings.errors import BadRequest

__all__ = ["CREATE_TABLE", "TABLE", "Saved", "StreamStates", "new_origin", "open_states", "saved"]

TABLE = "tidings_mongo_state"
_COLUMNS = "token, start_after, origin, first_id, last_id"
# One definition for both databases: SQLite reads `boolean` and `false` as PostgreSQL does.
CREATE_TABLE = (f"CREATE TABLE IF NOT EXISTS {TABLE} (coll text PRIMARY KEY, token text, "
                "start_after boolean NOT NULL DEFAULT false, origin text NOT NULL, "
                "first_id text, last_id text)")


@dataclass(frozen=True, slots=True)
class Saved:
    """One collection's saved state (see the module doc)."""

    origin: str
    token: str | None = None
    start_after: bool = False
    first: str | None = None
    last: str | None = None


class StreamStates(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def load(self, collection: str) -> Saved:
        """The saved state, created (with a new origin) the first time."""
        ...

    async def save(self, collection: str, token: str, *, start_after: bool,
                   first: str | None = None, last: str | None = None) -> None:
        """Resume after `token` from now on; `first` and `last` are the ids of the oldest
        and newest update published since the last save, if any."""
        ...

    def lease(self, collection: str) -> AbstractAsyncContextManager[asyncio.Event]:
        """Hold the collection's stream among processes (waiting while another does); the
        event is set if the lease is lost meanwhile (a PostgreSQL session that ended)."""
        ...


def open_states(db_url: str) -> StreamStates:
    """The state store of the hub's database `db_url` (its scheme picks it)."""
    scheme = urlsplit(db_url).scheme
    if scheme == "sqlite":
        path = db_url.split("sqlite:///", 1)[-1]
        if path and path != ":memory:":
            return _SQLiteStates(path)
    if scheme == "memory":
        return _MemoryStates()
    if scheme in ("postgresql", "postgres"):
        from tidings.feeds.mongodb.pgstate import PostgresStates

        return PostgresStates(db_url)
    raise BadRequest(f"MongoDB streams keep their tokens in --db: cannot use {db_url!r}")


def new_origin() -> str:
    return secrets.token_hex(4)


def saved(row: Sequence[object]) -> Saved:
    """A state row `(token, start_after, origin, first_id, last_id)`."""
    token, start_after, origin, first, last = row

    def text(value: object) -> str | None:
        return None if value is None else str(value)

    return Saved(str(origin), text(token), bool(start_after), text(first), text(last))


class _MemoryStates:
    """One process, nothing kept: `--db memory://`."""

    def __init__(self) -> None:
        self._saved: dict[str, Saved] = {}

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def load(self, collection: str) -> Saved:
        return self._saved.setdefault(collection, Saved(new_origin()))

    async def save(self, collection: str, token: str, *, start_after: bool,
                   first: str | None = None, last: str | None = None) -> None:
        saved = await self.load(collection)
        self._saved[collection] = replace(saved, token=token, start_after=start_after,
                                          first=saved.first or first, last=last or saved.last)

    @contextlib.asynccontextmanager
    async def lease(self, collection: str) -> AsyncIterator[asyncio.Event]:
        yield asyncio.Event()


class _SQLiteStates:
    """The table in the SQLite file; statements on a thread of their own (a write may wait
    for another process's write lock)."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._db: sqlite3.Connection | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    async def open(self) -> None:
        from tidings.sqlitedb import connect

        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="tidings-mongo-state")
        self._db = connect(self._path)
        await self._run(self._db.execute, CREATE_TABLE)

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        if self._db is not None:
            self._db.close()
            self._db = None

    async def _run(self, fn: object, *args: object) -> list[tuple[object, ...]]:
        from tidings.sqlitedb import run_on

        def call() -> list[tuple[object, ...]]:
            cursor = fn(*args)  # type: ignore[operator]
            return [tuple(row) for row in cursor.fetchall()]

        return await run_on(self._executor, "the MongoDB stream state", call)

    async def load(self, collection: str) -> Saved:
        db = self._db
        if db is None:
            raise RuntimeError("the MongoDB stream state is closed")
        await self._run(db.execute,
                        f"INSERT OR IGNORE INTO {TABLE} (coll, origin) VALUES (?, ?)",
                        (collection, new_origin()))
        rows = await self._run(db.execute,
                               f"SELECT {_COLUMNS} FROM {TABLE} WHERE coll = ?", (collection,))
        return saved(rows[0])

    async def save(self, collection: str, token: str, *, start_after: bool,
                   first: str | None = None, last: str | None = None) -> None:
        db = self._db
        if db is None:
            raise RuntimeError("the MongoDB stream state is closed")
        await self._run(db.execute,
                        f"UPDATE {TABLE} SET token = ?, start_after = ?, "
                        "first_id = coalesce(first_id, ?), last_id = coalesce(?, last_id) "
                        "WHERE coll = ?", (token, int(start_after), first, last, collection))

    @contextlib.asynccontextmanager
    async def lease(self, collection: str) -> AsyncIterator[asyncio.Event]:
        from tidings.sqlitedb import lock_file

        fd = await lock_file(
            f"{self._path}.tidings-mongo-{collection}.lock",
            waiting=f"MongoDB stream {collection}: another process holds it; this one "
                    "stands by")
        try:
            yield asyncio.Event()  # a file lock is held until closed
        finally:
            if fd is not None:
                os.close(fd)  # releases the lease
