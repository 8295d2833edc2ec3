"""Which tables the PostgreSQL feed captures, and `tidings watch` / `unwatch`.

The server's setup and `tidings watch` share these steps: find the feed's schema (the
connection's current one), create a collection's table or check a watched one, install
its triggers, and read or change the registry of watched tables. `tidings watch` works
while a server runs: the triggers capture changes from the moment they commit, and every
server process learns the table at once (a NOTIFY, `registry.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from tidings.errors import ServiceUnavailable
from tidings.feeds.config import CollectionConfig, validate_name
from tidings.feeds.errors import ConfigError
from tidings.feeds.postgres.capture import CAPTURE, ChangeLog
from tidings.feeds.postgres.decoding import LOGICAL
from tidings.feeds.postgres.registry import ensure_registry, notify, registry_table
from tidings.feeds.postgres.schema import Shape, managed_shape, table_shape
from tidings.feeds.sqltext import ident
from tidings.pgdb import UNAVAILABLE, Connection, close_quietly, connect, describe, split_url

__all__ = [
    "capture_of",
    "cli_connection",
    "current_log",
    "install",
    "unwatch_table",
    "watch_table",
    "watched",
]


async def current_log(conn: Connection) -> ChangeLog:
    """The change log of the connection's current schema (where the feed lives)."""
    schema = await conn.fetchval("SELECT current_schema()")
    if not isinstance(schema, str):
        raise ConfigError("no schema to keep the change log in: none of the search_path's "
                          "schemas exists (create it, or set ?search_path=SCHEMA)")
    return ChangeLog.of(schema)


async def install(conn: Connection, log: ChangeLog, config: CollectionConfig) -> Shape:
    """Create a managed collection's table, or check a watched one; capture its changes.
    Returns its shape."""
    if config.kind == "managed":
        shape = await managed_shape(conn, log.schema, config)
    else:
        shape = await table_shape(conn, log.schema, config)
    await log.capture(conn, shape)
    return shape


async def watched(conn: Connection, log: ChangeLog) -> list[CollectionConfig]:
    """The tables `tidings watch` registered ([] when none ever was)."""
    if await conn.fetchval("SELECT to_regclass($1)", log.watched) is None:
        return []
    rows = await conn.fetch(f"SELECT name, key, read FROM {log.watched} ORDER BY name")
    return [CollectionConfig(str(name), "table", str(key),
                             "public" if read == "public" else "private", "none")
            for name, key, read in rows]


@contextlib.asynccontextmanager
async def cli_connection(db_url: str) -> AsyncIterator[Connection]:
    """One plain connection (for `tidings watch`, `tidings collection`); failures are
    ServiceUnavailable."""
    dsn, _ = split_url(db_url)
    conn = await connect(dsn)
    try:
        yield conn
    except UNAVAILABLE as exc:
        raise ServiceUnavailable(f"PostgreSQL at {describe(dsn)}: {exc}") from exc
    finally:
        await close_quietly(conn)


@contextlib.asynccontextmanager
async def _registry_change(db_url: str, table: str,
                           refusal: str) -> AsyncIterator[tuple[Connection, ChangeLog]]:
    """A transaction that changes the watched-table registry: the log and the registries
    exist, and `table` is not a managed collection (else ConfigError, ending `refusal`)."""
    async with cli_connection(db_url) as conn:
        log = await current_log(conn)
        await log.upgrade(conn)
        async with conn.transaction():
            await log.ensure(conn)
            await ensure_registry(conn, log)
            if await conn.fetchval(f"SELECT 1 FROM {registry_table(log)} WHERE name = $1",
                                   table):
                raise ConfigError(f"{table} is a managed collection{refusal}")
            yield conn, log


async def _watch_table(db_url: str, table: str, key: str, read: str) -> str:
    validate_name(table, "table")
    if read not in ("public", "private"):
        raise ConfigError("read must be public or private")
    async with _registry_change(db_url, table, " (tidings collection)") as (conn, log):
        shape = await install(conn, log, CollectionConfig(
            table, "table", key, "public" if read == "public" else "private", "none"))
        await conn.execute(
            f"INSERT INTO {log.watched} (name, key, read) VALUES ($1, $2, $3) "
            f"ON CONFLICT (name) DO UPDATE SET key = excluded.key, read = excluded.read",
            table, shape.config.key, read)
        await notify(conn, log)
        return shape.config.key


async def _unwatch_table(db_url: str, table: str) -> bool:
    refusal = f": tidings collection drop {table} drops it"
    async with _registry_change(db_url, table, refusal) as (conn, log):
        await notify(conn, log)
        qualified = f"{ident(log.schema)}.{ident(table)}"
        if await conn.fetchval("SELECT to_regclass($1)", qualified) is not None:
            await log.release(conn, qualified)
        status = await conn.execute(f"DELETE FROM {log.watched} WHERE name = $1", table)
        return status != "DELETE 0"


def watch_table(db_url: str, table: str, *, key: str = "", read: str = "private") -> str:
    """`tidings watch TABLE`: install the triggers and remember the table. Returns its key.

    Synchronous, for the CLI (not from a running event loop). Works while a server runs:
    the triggers capture changes from the moment they commit, and every server process
    picks the table up at once."""
    return asyncio.run(_watch_table(db_url, table, key, read))


async def _capture_of(db_url: str) -> str:
    async with cli_connection(db_url) as conn:
        log = await current_log(conn)
        return LOGICAL if await log.stored_mode(conn) == "logical" else CAPTURE


def capture_of(db_url: str) -> str:
    """How the feed of `db_url` captures changes now (`tidings watch` says it)."""
    return asyncio.run(_capture_of(db_url))


def unwatch_table(db_url: str, table: str) -> bool:
    """Drop a table's triggers and forget it; False when it was not watched."""
    return asyncio.run(_unwatch_table(db_url, table))
