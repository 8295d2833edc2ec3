"""The PostgreSQL feed's registries, and how every process hears that they changed.

Two registries live in the feed's schema: `tidings_watched` (`tidings watch`, created by
`capture.py`'s setup) and `tidings_collections` (collections defined at run time,
`feeds/definitions.py`), which this module creates and captures like a watched table, so
its changes are rows of the change log. A transaction that changes either registry
NOTIFYs the schema's catalog channel (delivered at its commit, never for a rollback);
every Tidings process LISTENs on it (`feed.py`) and rereads the registries.
"""

from __future__ import annotations

import hashlib

from tidings.feeds.config import CollectionConfig
from tidings.feeds.definitions import REGISTRY, REGISTRY_CAPTURE, from_stored
from tidings.feeds.postgres.capture import ChangeLog
from tidings.feeds.postgres.schema import table_shape
from tidings.feeds.sqltext import ident
from tidings.pgdb import Connection

__all__ = ["catalog_channel", "defined", "ensure_registry", "notify", "registry_table"]


def registry_table(log: ChangeLog) -> str:
    """The defined collections' registry, qualified and quoted."""
    return f"{ident(log.schema)}.{REGISTRY}"


def catalog_channel(log: ChangeLog) -> str:
    """The channel a registry change NOTIFYs (an identifier: 63 bytes at most)."""
    name = f"tidings_catalog.{log.schema}"
    if len(name.encode()) > 63:
        name = "tidings_catalog." + hashlib.blake2b(
            log.schema.encode(), digest_size=8).hexdigest()
    return name


async def notify(conn: Connection, log: ChangeLog) -> None:
    """Tell every process, at this transaction's commit, that a registry changed."""
    await conn.execute("SELECT pg_notify($1, '')", catalog_channel(log))


async def ensure_registry(conn: Connection, log: ChangeLog) -> None:
    """Create the registry of defined collections and capture it. In the caller's
    transaction, after `log.ensure` (whose setup lock serializes this)."""
    await conn.execute(f"""CREATE TABLE IF NOT EXISTS {registry_table(log)} (
        name   text PRIMARY KEY,
        read   text NOT NULL,
        write  text NOT NULL,
        schema jsonb
    )""")
    await log.capture(conn, await table_shape(conn, log.schema, REGISTRY_CAPTURE))


async def defined(conn: Connection, log: ChangeLog) -> list[CollectionConfig]:
    """The collections defined in the schema ([] when none ever was)."""
    table = registry_table(log)
    if await conn.fetchval("SELECT to_regclass($1)", table) is None:
        return []
    rows = await conn.fetch(f"SELECT name, read, write, schema::text FROM {table} "
                            f"ORDER BY name")
    return [config for config in map(from_stored, rows) if config is not None]
