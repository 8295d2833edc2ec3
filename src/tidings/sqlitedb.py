"""How Tidings' embedded stores (change feeds, chat) use SQLite: one file in WAL mode,
writes on one worker thread, a busy database reported as 503 rather than a 500."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from typing import TypeVar

from tidings.errors import ServiceUnavailable

__all__ = ["BUSY_TIMEOUT_S", "connect", "run_on", "transaction"]

T = TypeVar("T")

# How long a writer waits for another process's write lock before giving up.
BUSY_TIMEOUT_S = 5.0


def connect(path: str) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, no fsync per
    commit: a commit survives a crash of the process, which is what an ack promises."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                         timeout=BUSY_TIMEOUT_S)
    if path != ":memory:":
        db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    return db


@contextlib.contextmanager
def transaction(db: sqlite3.Connection, kind: str = "IMMEDIATE") -> Iterator[None]:
    try:
        db.execute(f"BEGIN {kind}")
    except sqlite3.OperationalError as exc:
        raise ServiceUnavailable(f"the database is busy: {exc}") from exc
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


async def run_on(
    executor: concurrent.futures.Executor | None, what: str, fn: Callable[..., T], *args: object
) -> T:
    """Run `fn` on the store's thread; `what` names the store when it is not running."""
    if executor is None:
        raise ServiceUnavailable(f"{what} is not running")
    try:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
    except sqlite3.OperationalError as exc:
        raise ServiceUnavailable(f"the database is busy: {exc}") from exc
