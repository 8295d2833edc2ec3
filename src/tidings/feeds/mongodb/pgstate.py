"""The MongoDB streams' state in PostgreSQL (`--db postgresql://`): see `state.py`.

The table lives in the URL's schema (its `search_path`), beside the hub's history. A
collection's lease is a session-level advisory lock held on a connection of its own, as
the PostgreSQL feed's tailer holds its schema's: when the process dies its session ends,
and the server grants the lock to the process waiting in `pg_advisory_lock`. So does a
process that stops running (`pgdb.leading`: PostgreSQL ends a leading session idle for
the limit), which is why the lease keeps its connection alive while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from tidings.feeds.mongodb.state import CREATE_TABLE, TABLE, Saved, new_origin, saved
from tidings.pgdb import (
    LEADER_IDLE_LIMIT_S,
    Pool,
    advisory_key,
    close_pool,
    leading,
    open_pool,
    setting_up,
    split_url,
)

__all__ = ["PostgresStates"]

log = logging.getLogger(__name__)


class PostgresStates:
    def __init__(self, url: str, *, idle_limit_s: float = LEADER_IDLE_LIMIT_S) -> None:
        self._dsn = split_url(url)[0]
        self._idle_limit_s = idle_limit_s
        self._pool: Pool | None = None
        self._schema = ""

    def _open_pool(self) -> Pool:
        if self._pool is None:
            raise RuntimeError("the MongoDB stream state is closed")
        return self._pool

    async def open(self) -> None:
        pool = await open_pool(self._dsn, application_name="tidings-mongo")
        with setting_up(pool, "the MongoDB stream state cannot use PostgreSQL"):
            async with pool.acquire() as conn:
                self._schema = str(await conn.fetchval("SELECT current_schema()"))
                await conn.execute(CREATE_TABLE)
        self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await close_pool(pool)

    async def load(self, collection: str) -> Saved:
        async with self._open_pool().acquire() as conn:
            await conn.execute(f"INSERT INTO {TABLE} (coll, origin) VALUES ($1, $2) "
                               "ON CONFLICT (coll) DO NOTHING", collection, new_origin())
            row = await conn.fetchrow(
                f"SELECT token, start_after, origin, first_id, last_id FROM {TABLE} "
                "WHERE coll = $1", collection)
        if row is None:  # pragma: no cover - inserted just above
            raise RuntimeError(f"no state for {collection}")
        return saved(row)

    async def save(self, collection: str, token: str, *, start_after: bool,
                   first: str | None = None, last: str | None = None) -> None:
        async with self._open_pool().acquire() as conn:
            await conn.execute(
                f"UPDATE {TABLE} SET token = $1, start_after = $2, "
                "first_id = coalesce(first_id, $3), last_id = coalesce($4, last_id) "
                "WHERE coll = $5", token, start_after, first, last, collection)

    @contextlib.asynccontextmanager
    async def lease(self, collection: str) -> AsyncIterator[asyncio.Event]:
        lost = asyncio.Event()  # set when the session ends: the lease is gone
        async with leading(
            self._dsn, advisory_key(f"tidings-mongo:{self._schema}:{collection}"), None,
            lost, application_name=f"tidings-mongo-stream:{collection}",
            standing_by=f"MongoDB stream {collection}: another process holds it; this one "
                        "stands by",
            idle_limit_s=self._idle_limit_s, keep_alive=True,
        ):
            yield lost
