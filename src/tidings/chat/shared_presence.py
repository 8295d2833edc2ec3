"""Presence across processes: each process's connections mirrored into the chat's
PostgreSQL database, and a room's online set computed from the rows of live processes.

The process keeps its own `PresenceRegistry` (pure, as on one process) and writes each
change to `chat_cluster_presence`: a row per connection, inserted when the stream opens and
deleted `grace_s` after it closes (a page that reconnects, to this process or another,
within the grace period never shows offline). A room's online set is the distinct users of
the rows of live processes (`cluster.py`: heartbeat younger than its expiry). A killed
process's rows are deleted by the sweep, which announces the rooms it had people in.

Announcing is a compare-and-set in one transaction per room: under the room's advisory
lock, compute the set, compare it with the last one announced (`chat_cluster_announced`),
publish through the hub only when it changed, and record it. The lock is held across the
publish, so two processes never announce the same change twice nor two changes out of
order. A process killed between its publish and its commit leaves the record behind what
windows saw; it is also a process whose rows the sweep removes, and the sweep's
announcement is unconditional, so the record and the windows agree again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from tidings import pgdb
from tidings.chat.cluster import Cluster, Expired
from tidings.chat.presence import Connection, PresenceRegistry
from tidings.errors import ServiceUnavailable
from tidings.tasks import cancel_and_wait

__all__ = ["SharedPresence"]

log = logging.getLogger(__name__)

Announce = Callable[[str | None, list[str]], Awaitable[None]]

_LIVE = ("JOIN chat_cluster_processes s USING (process) "
         "WHERE s.seen_at >= now() - make_interval(secs => $1)")
_BATCH = 500


class SharedPresence:
    def __init__(self, cluster: Cluster, announce: Announce, grace_s: float = 2.0) -> None:
        self.registry = PresenceRegistry()
        self._cluster = cluster
        self._announce = announce
        self._grace_s = grace_s
        # Writes waiting for the writer task: connections to insert, ids to delete.
        self._inserts: dict[int, Connection] = {}
        self._deletes: dict[int, Connection] = {}
        self._wake = asyncio.Event()
        self._handles: set[asyncio.TimerHandle] = set()
        self._task: asyncio.Task[None] | None = None
        cluster.on_expired(self._expired)
        cluster.on_rejoined(self._rewrite)

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._writer(), name="tidings-chat-presence")

    async def close(self) -> None:
        for handle in self._handles:
            handle.cancel()
        self._handles.clear()
        task, self._task = self._task, None
        await cancel_and_wait(task)

    # -- the local side (called from the presence gate, no await) -------------------------

    def connect(self, user: str, rooms: Iterable[str]) -> Connection:
        connection = self.registry.connect(user, rooms)
        self._inserts[connection.id] = connection
        self._wake.set()
        return connection

    def disconnect(self, connection: Connection) -> None:
        if not self.registry.disconnect(connection):
            return
        if self._inserts.pop(connection.id, None) is not None:
            return  # never written: nothing to take back, nobody saw it
        handle: asyncio.TimerHandle | None = None

        def later() -> None:
            if handle is not None:
                self._handles.discard(handle)
            self._deletes[connection.id] = connection
            self._wake.set()

        handle = asyncio.get_running_loop().call_later(self._grace_s, later)
        self._handles.add(handle)

    def _rewrite(self) -> None:
        """Write every local connection again (this process's rows were swept)."""
        for connection in self.registry.connections():
            self._inserts[connection.id] = connection
        self._wake.set()

    # -- reading ------------------------------------------------------------------------

    async def who(self, room: str | None = None) -> list[str]:
        async with self._cluster.connection() as conn:
            return await self._online(conn, room)

    async def _online(self, conn: pgdb.Connection, room: str | None) -> list[str]:
        where = "" if room is None else " AND $2 = ANY(p.rooms)"
        args: tuple[object, ...] = (self._cluster.config.expiry_s,)
        if room is not None:
            args += (room,)
        rows = await conn.fetch(
            f"SELECT DISTINCT p.username FROM chat_cluster_presence p {_LIVE}{where} "
            "ORDER BY 1", *args)
        return [str(r[0]) for r in rows]

    async def online_among(self, users: Iterable[str]) -> set[str]:
        names = list(users)
        if not names:
            return set()
        async with self._cluster.connection() as conn:
            rows = await conn.fetch(
                f"SELECT DISTINCT p.username FROM chat_cluster_presence p {_LIVE} "
                "AND p.username = ANY($2::text[])", self._cluster.config.expiry_s, names)
        return {str(r[0]) for r in rows}

    # -- writing and announcing -------------------------------------------------------------

    async def _writer(self) -> None:
        failures = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                rooms = await self._write()
                await self.announce(rooms)
                failures = 0
            except ServiceUnavailable as exc:
                failures += 1
                log.warning("chat presence: cannot write to the database (%r); retrying",
                            exc)
                await asyncio.sleep(min(5.0, 0.2 * 2 ** failures))
                self._wake.set()

    async def _write(self) -> set[str | None]:
        inserts = list(self._inserts.values())[:_BATCH]
        deletes = list(self._deletes.values())[:_BATCH]
        if not inserts and not deletes:
            return set()
        process = self._cluster.process
        async with self._cluster.connection() as conn, conn.transaction():
            if deletes:
                await conn.execute(
                    "DELETE FROM chat_cluster_presence WHERE process = $1 AND "
                    "connection = ANY($2::bigint[])", process, [c.id for c in deletes])
            if inserts:
                await conn.execute(
                    "INSERT INTO chat_cluster_presence SELECT $1, c, u, r::text[] FROM "
                    "unnest($2::bigint[], $3::text[], $4::text[]) AS t (c, u, r) "
                    "ON CONFLICT DO NOTHING",
                    process, [c.id for c in inserts], [c.user for c in inserts],
                    # One text per connection: its rooms, parsed back into an array.
                    ["{" + ",".join(sorted(c.rooms)) + "}" for c in inserts])
        for connection in inserts:
            if self._inserts.get(connection.id) is connection:
                del self._inserts[connection.id]
        for connection in deletes:
            self._deletes.pop(connection.id, None)
        if self._inserts or self._deletes:
            self._wake.set()  # more than one batch was waiting
        rooms: set[str | None] = {None}
        for connection in (*inserts, *deletes):
            rooms.update(connection.rooms)
        return rooms

    async def _expired(self, leftovers: Expired) -> None:
        await self.announce({room or None for room in leftovers.rooms}, always=True)

    async def announce(self, rooms: Iterable[str | None], *, always: bool = False) -> None:
        """Publish the online set of each room whose set changed since it was last
        announced (by any process), or of each room (`always`). The global list (None)
        first, then rooms by name."""
        for room in sorted(rooms, key=lambda r: (r is not None, r or "")):
            key = self._cluster.lock_key(f"presence:{room or ''}")
            async with self._cluster.connection() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", key)
                online = await self._online(conn, room)
                before = await conn.fetchval(
                    "SELECT online FROM chat_cluster_announced WHERE room = $1", room or "")
                if not always and list(before or []) == online:  # type: ignore[call-overload]
                    continue
                await conn.execute(
                    "INSERT INTO chat_cluster_announced VALUES ($1, $2) ON CONFLICT (room) "
                    "DO UPDATE SET online = excluded.online", room or "", online)
                try:
                    await self._announce(room, online)
                except Exception as exc:  # the hub is shutting down: best effort
                    log.debug("presence of %s not announced: %r", room, exc)
