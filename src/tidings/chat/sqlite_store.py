"""The chat's tables in SQLite (`--db sqlite:///FILE`, or memory with `memory://`).

All SQL runs on one thread with one connection: writes wait for SQLite's write lock
there, never on the event loop, and the order of the outbox's AUTOINCREMENT `seq` is the
order of commits (SQLite has one writer at a time). The tables live in the `--db` file
beside the hub's history. The chat on SQLite serves one process, so its relay has no
other process to defer to, and every write wakes it in-process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import secrets
import sqlite3
from collections.abc import AsyncIterator
from typing import TypeVar

from tidings.chat.migrations import SQLITE, VERSION_TABLE
from tidings.chat.model import now_iso
from tidings.chat.sql import NO_ROWS, Kind, Op, Result, Steps
from tidings.errors import ServiceUnavailable
from tidings.sqlitedb import connect, run_on, transaction

__all__ = ["SQLiteDatabase", "path_of"]

T = TypeVar("T")


def path_of(db_url: str) -> str:
    """The SQLite file of `--db`, or `:memory:` for anything else (memory://)."""
    if db_url.startswith("sqlite:"):
        path = db_url.split("sqlite:///", 1)[-1]
        if path and path != ":memory:":
            return path
    return ":memory:"


def _drive(db: sqlite3.Connection, steps: Steps[T]) -> T:
    sql = steps.send(None)
    while sql is not None:
        if not sql.text:  # PostgreSQL's alone
            sql = steps.send(NO_ROWS)
            continue
        cursor = db.execute(sql.text, sql.args)
        sql = steps.send(Result(cursor.fetchall(), cursor.rowcount))
    return steps.value


def migrate(db: sqlite3.Connection) -> str:
    """Apply the migrations `db` lacks, in one transaction whose write lock makes another
    process starting now wait (and then find them applied); returns the epoch."""
    with transaction(db):  # BEGIN IMMEDIATE: the write lock, taken before any read
        db.execute(f"CREATE TABLE IF NOT EXISTS {VERSION_TABLE} ("
                   "version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
        current = int(db.execute(f"SELECT COALESCE(MAX(version), 0) FROM {VERSION_TABLE}")
                      .fetchone()[0])
        for version, script in enumerate(SQLITE[current:], start=current + 1):
            for statement in script.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"INSERT INTO {VERSION_TABLE} VALUES (?, ?)", (version, now_iso()))
        db.execute("INSERT OR IGNORE INTO chat_state VALUES ('epoch', ?)",
                   (secrets.token_hex(4),))
        db.execute("INSERT OR IGNORE INTO chat_state VALUES ('cursor', '0')")
        return str(db.execute("SELECT value FROM chat_state WHERE name = 'epoch'")
                   .fetchone()[0])


class SQLiteDatabase:
    """A `ChatDatabase` on one SQLite connection and one thread (see the module doc)."""

    standby_poll_s = 10.0  # the relay is in this process and wakes its readers
    calls = False  # in-process calls cost no round trip: no functions (`Kind` "call")
    emit_args = ()

    def __init__(self, db_url: str) -> None:
        self.path = path_of(db_url)
        self.ephemeral = self.path == ":memory:"
        self.epoch = ""
        self._db: sqlite3.Connection | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    async def open(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="tidings-chat")
        self.epoch = await run_on(self._executor, "the chat", self._open)

    def _open(self) -> str:
        self._db = connect(self.path)
        return migrate(self._db)

    async def close(self) -> None:
        if self._executor is None:
            return
        with contextlib.suppress(Exception):
            await run_on(self._executor, "the chat", self._close)
        self._executor.shutdown(wait=True)
        self._executor = None

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def run(self, kind: Kind, op: Op[T]) -> T:
        return await run_on(self._executor, "the chat", self._run, kind, op)

    def _run(self, kind: Kind, op: Op[T]) -> T:
        db = self._db
        if db is None:
            raise ServiceUnavailable("the chat's database is not open")
        steps = Steps(op)
        if kind == "call":
            raise ValueError("SQLite has no chat functions to call")
        if kind == "read":
            return _drive(db, steps)
        with transaction(db, "IMMEDIATE" if kind == "write" else "DEFERRED"):
            value = _drive(db, steps)
            if steps.emitted:
                db.executemany("INSERT INTO chat_outbox (topic, data) VALUES (?, ?)",
                               [(out.topic, out.data) for out in steps.emitted])
            return value

    async def run_leading(self, op: Op[T], kind: Kind = "write") -> T:
        return await self.run(kind, op)

    @contextlib.asynccontextmanager
    async def lead(self, wake: asyncio.Event) -> AsyncIterator[None]:
        yield  # one process: nobody else relays

    async def wait(self, wake: asyncio.Event, found: bool) -> None:
        await wake.wait()  # set by every write through the store
