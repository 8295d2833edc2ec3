"""Collections defined at run time on PostgreSQL, for the feed (`PUT` / `DELETE
/api/collections/NAME`) and for `tidings collection`.

What the registry promises is `feeds/definitions.py`'s. Here: a definition and its table
change in one transaction that also NOTIFYs every process (`registry.py`); the registry's
capture trigger logs the change. Each runs after `ChangeLog.ensure`, whose setup lock
serializes definitions (two `CREATE TABLE IF NOT EXISTS` of one name at once fail).

Dropping locks the collection's table (ACCESS EXCLUSIVE) before it changes the registry,
whose trigger takes the change log's order lock: a writer of the table holds the table's
lock and then waits for the order lock, so taking them in the other order could deadlock
with it. The lock also waits for the table's writers to commit: their changes are in the
log before the `drop`.
"""

from __future__ import annotations

import asyncio
import json

from tidings.feeds.config import CollectionConfig
from tidings.feeds.definitions import stored
from tidings.feeds.errors import ConfigError, NameTaken, UnknownCollection
from tidings.feeds.postgres.capture import ChangeLog
from tidings.feeds.postgres.registry import defined, ensure_registry, notify, registry_table
from tidings.feeds.postgres.schema import managed_shape
from tidings.feeds.postgres.watch import cli_connection, current_log
from tidings.feeds.sqltext import ident
from tidings.pgdb import Connection

__all__ = [
    "create_collection",
    "define",
    "defined_collections",
    "drop_collection",
    "undefine",
]


async def _watched(conn: Connection, log: ChangeLog, name: str) -> bool:
    return bool(await conn.fetchval(f"SELECT 1 FROM {log.watched} WHERE name = $1", name))


async def define(conn: Connection, log: ChangeLog, config: CollectionConfig) -> bool:
    """Create the collection (table, triggers, registry row) or replace its settings, in
    the caller's transaction, after `log.ensure`; True when it is new."""
    await ensure_registry(conn, log)
    table = registry_table(log)
    row = await conn.fetchrow(f"SELECT read, write, schema::text FROM {table} "
                              f"WHERE name = $1 FOR UPDATE", config.name)
    if row is not None and (row[0], row[1]) == (config.read, config.write) and (
            (None if row[2] is None else json.loads(str(row[2]))) == config.schema):
        return False  # nothing changes: no change in the log either
    if await _watched(conn, log, config.name):
        raise NameTaken(f"{config.name} is a watched table "
                        f"(tidings watch {config.name} --stop first)")
    try:
        shape = await managed_shape(conn, log.schema, config)
    except ConfigError as exc:  # a table of that name that is not a collection
        raise NameTaken(exc.message) from None
    await log.capture(conn, shape)
    await conn.execute(
        f"INSERT INTO {table} (name, read, write, schema) VALUES ($1, $2, $3, $4::jsonb) "
        f"ON CONFLICT (name) DO UPDATE SET read = excluded.read, write = excluded.write, "
        f"schema = excluded.schema", *stored(config))
    await notify(conn, log)
    return row is None


async def undefine(conn: Connection, log: ChangeLog, name: str) -> None:
    """Drop a defined collection (registry row, logged: the `drop` event; its table) in
    the caller's transaction, after `log.ensure`."""
    await ensure_registry(conn, log)
    table = registry_table(log)
    if not await conn.fetchval(f"SELECT 1 FROM {table} WHERE name = $1", name):
        if await _watched(conn, log, name):
            raise NameTaken(f"{name} is a watched table: stop watching it with "
                            f"tidings watch {name} --stop")
        raise UnknownCollection(f"no collection named {name!r} is defined")
    collection = f"{ident(log.schema)}.{ident(name)}"
    exists = await conn.fetchval("SELECT to_regclass($1)", collection) is not None
    if exists:
        await conn.execute(f"LOCK TABLE {collection} IN ACCESS EXCLUSIVE MODE")
    await conn.execute(f"DELETE FROM {table} WHERE name = $1", name)
    if exists:
        await conn.execute(f"DROP TABLE {collection}")
    await notify(conn, log)


# -- `tidings collection` ----------------------------------------------------------------


async def _create(db_url: str, config: CollectionConfig) -> bool:
    async with cli_connection(db_url) as conn:
        log = await current_log(conn)
        async with conn.transaction():
            await log.ensure(conn)
            return await define(conn, log, config)


async def _drop(db_url: str, name: str) -> None:
    async with cli_connection(db_url) as conn:
        log = await current_log(conn)
        async with conn.transaction():
            await log.ensure(conn)
            await undefine(conn, log, name)


async def _list(db_url: str) -> list[CollectionConfig]:
    async with cli_connection(db_url) as conn:
        return await defined(conn, await current_log(conn))


def create_collection(db_url: str, config: CollectionConfig) -> bool:
    """`tidings collection create` (synchronous, for the CLI): True when new."""
    return asyncio.run(_create(db_url, config))


def drop_collection(db_url: str, name: str) -> None:
    """`tidings collection drop`."""
    asyncio.run(_drop(db_url, name))


def defined_collections(db_url: str) -> list[CollectionConfig]:
    """`tidings collection list`."""
    return asyncio.run(_list(db_url))
