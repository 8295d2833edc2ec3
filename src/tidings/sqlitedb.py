"""How Tidings' embedded stores (change feeds, chat, the hub's history) use SQLite: one
file in WAL mode, writes on one worker thread, and a database that cannot be used right
now (busy, a full disk, an I/O error) reported as 503, or 507 for a full disk, rather than
a 500: `storage_error` says which."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from tidings.errors import InsufficientStorage, ServiceUnavailable

__all__ = ["BUSY_TIMEOUT_S", "connect", "create", "lock_file", "run_on", "storage_error",
           "transaction"]

T = TypeVar("T")

log = logging.getLogger(__name__)

# How long a writer waits for another process's write lock before giving up.
BUSY_TIMEOUT_S = 5.0


def connect(path: str) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, no fsync per
    commit: a commit survives a crash of the process, which is what an ack promises."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                         timeout=BUSY_TIMEOUT_S)
    if path != ":memory:":
        _enter_wal(db)
    db.execute("PRAGMA synchronous=NORMAL")
    return db


def _enter_wal(db: sqlite3.Connection) -> None:
    """WAL mode, waiting (up to BUSY_TIMEOUT_S) while other connections hold the file:
    switching a new file to WAL answers "database is locked" at once, without the busy
    timeout, when several processes open it together."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            busy = (exc.sqlite_errorcode & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
            if not busy or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def storage_error(exc: sqlite3.OperationalError, what: str) -> ServiceUnavailable:
    """What to answer when `what` (a database) failed with `exc`: 507 when its disk is full
    (SQLITE_FULL), 503 with the reason otherwise (busy, locked, an I/O error such as a
    file-size limit, a read-only file). SQLite rolls back the statement either way, so the
    connection stays usable and works again once the cause is gone."""
    code = exc.sqlite_errorcode & 0xFF  # the primary result code
    if code == sqlite3.SQLITE_FULL:
        return InsufficientStorage(f"{what} is full ({exc}): free space on its disk")
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return ServiceUnavailable(f"{what} is busy: {exc}")
    return ServiceUnavailable(f"{what} cannot be used: {exc}")


@contextlib.contextmanager
def transaction(db: sqlite3.Connection, kind: str = "IMMEDIATE") -> Iterator[None]:
    try:
        db.execute(f"BEGIN {kind}")
    except sqlite3.OperationalError as exc:
        raise storage_error(exc, "the database") from exc
    try:
        yield
    except BaseException:
        # Some errors (a full disk, an I/O error) end the transaction themselves; a
        # ROLLBACK then would raise and hide them.
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def create(db: sqlite3.Connection, script: str, state_table: str) -> str:
    """Run a schema `script` (`CREATE ... IF NOT EXISTS` statements separated by `;`) and
    give `state_table` (name, value) an `epoch` (random, once) and a `cursor` at 0, in one
    transaction; returns the epoch. (`executescript` would commit on its own.)"""
    with transaction(db):
        for statement in script.split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute(f"INSERT OR IGNORE INTO {state_table} VALUES ('epoch', ?)",
                   (secrets.token_hex(4),))
        db.execute(f"INSERT OR IGNORE INTO {state_table} VALUES ('cursor', '0')")
        epoch = db.execute(f"SELECT value FROM {state_table} WHERE name = 'epoch'").fetchone()
    return str(epoch[0])


async def run_on(
    executor: concurrent.futures.Executor | None, what: str, fn: Callable[..., T], *args: object
) -> T:
    """Run `fn` on the store's thread; `what` names the store when it is not running."""
    if executor is None:
        raise ServiceUnavailable(f"{what} is not running")
    try:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
    except sqlite3.OperationalError as exc:
        raise storage_error(exc, "the database") from exc


async def lock_file(path: str, *, waiting: str) -> int | None:
    """Hold an exclusive advisory lock on `path` (created if need be), waiting while another
    process holds it (logging `waiting` once); returns the descriptor, whose closing
    releases the lock (so does the process's end, however it ends). None where there is
    no flock (Windows): one process is assumed."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock (Windows)
        return None
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        log.info("%s", waiting)
    loop = asyncio.get_running_loop()
    acquired = loop.create_future()

    def wait() -> None:  # a daemon thread: it must not keep the process alive
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            return

        def done() -> None:
            if not acquired.done():
                acquired.set_result(None)

        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(done)

    threading.Thread(target=wait, name="tidings-lock", daemon=True).start()
    try:
        await acquired
    except BaseException:
        os.close(fd)  # cancelled while standing by: the thread's flock fails and ends
        raise
    return fd
