"""The chat's processes, as they see each other through its PostgreSQL database.

Several `tidings serve` processes (or `--workers N`) share the chat's tables; what each one
kept in memory alone (who is connected to it, its rate-limit counters, the assistant
replies it is streaming, the exports it is running) must be seen by all. This module is
the common ground, in tables of their own (`chat_cluster_*`) beside the chat's:

* each process has a row in `chat_cluster_processes`, refreshed every `heartbeat_s`: it is
  live while that row is younger than `expiry_s` (2 heartbeats). A process killed with
  SIGKILL stops refreshing, and within a heartbeat of its expiry one live process (the
  one that wins a transaction-level advisory lock that round) deletes it, with its
  presence rows and its claims, and hands what it left to the callbacks (`on_expired`):
  presence is announced again, its streaming replies end as failed, its exports run
  again elsewhere. No leader is elected: every process tries each round, one does it.
* a claim (`chat_cluster_claims`) says which process owns a running thing (a reply, an
  export); `claim` is a conditional insert, so exactly one process wins.
* one NOTIFY channel per chat schema carries the few messages between processes: "stop
  reply N" (the Stop button pressed on a window served by another process) and "reply N
  ended".
* `hit` is the rate limit, charged in one round trip by a PL/pgSQL function: the same
  exact sliding window as `ratelimit.SlidingWindow`, its hits kept in `chat_cluster_hits`
  (one index probe of at most `limit` rows per hit). A transaction-level advisory lock per
  key serializes its hits, so the last slot goes to one of two processes only.

The clock is the database server's (`now()`), the same for every machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass

from tidings import pgdb
from tidings.errors import ServiceUnavailable
from tidings.tasks import cancel_and_wait

__all__ = ["Cluster", "ClusterConfig", "Expired"]

log = logging.getLogger(__name__)

_RETRY_S = 1.0
_POOL_SIZE = 4


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    db_url: str
    heartbeat_s: float = 3.0

    @property
    def expiry_s(self) -> float:
        """A process whose heartbeat is older than this is gone."""
        return 2 * self.heartbeat_s


@dataclass(frozen=True, slots=True)
class Expired:
    """What an expired process left: the rooms it had people in ('' is the global list)
    and its claims, as (kind, item)."""

    rooms: frozenset[str]
    claims: tuple[tuple[str, str], ...]


OnExpired = Callable[[Expired], Awaitable[None]]
OnMessage = Callable[[str, str], None]


class Cluster:
    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.dsn, _ = pgdb.split_url(config.db_url)
        self.process = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._name_after("")  # the schema's, once `start` has read it
        self._pool: pgdb.Pool | None = None
        self._listener: pgdb.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._on_expired: list[OnExpired] = []
        self._on_message: list[OnMessage] = []
        self._on_rejoined: list[Callable[[], None]] = []
        # The processes not yet expired at this one's last heartbeat (None before it).
        self.live_processes: int | None = None

    def _name_after(self, schema: str) -> None:
        """The channel and lock keys of the chat tables in `schema` (the session's current
        schema, as the chat store keys its own): the same for every process on those
        tables whatever URL it was given (`localhost` or `127.0.0.1`, with or without
        `?search_path=public`). Advisory locks and NOTIFY are per database already."""
        self._label = schema
        self.channel = f"tidings_chat_{pgdb.advisory_key(schema) & (2**63 - 1):x}"
        self._sweep_key = pgdb.advisory_key(f"tidings-chat-cluster-sweep:{schema}")

    def lock_key(self, name: str) -> int:
        """An advisory-lock key for `name` among the processes on this chat schema."""
        return pgdb.advisory_key(f"tidings-chat-cluster:{name}:{self._label}")

    # -- wiring -------------------------------------------------------------------------

    def on_expired(self, callback: OnExpired) -> None:
        self._on_expired.append(callback)

    def on_message(self, callback: OnMessage) -> None:
        """`callback(kind, argument)` for each message `send` put on the channel (from any
        process, this one included)."""
        self._on_message.append(callback)

    def on_rejoined(self, callback: Callable[[], None]) -> None:
        """Called when this process finds its row gone (it could not refresh it in time
        and was swept): what it mirrors must be written again."""
        self._on_rejoined.append(callback)

    @property
    def pool(self) -> pgdb.Pool:
        if self._pool is None:
            raise ServiceUnavailable("the chat's cluster state is not started")
        return self._pool

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[pgdb.Connection]:
        """A pooled connection; the database unreachable or failing is ServiceUnavailable."""
        try:
            async with pgdb.pooled(self.pool) as conn:
                yield conn
        except pgdb.UNAVAILABLE as exc:
            raise ServiceUnavailable(
                f"the chat's database at {pgdb.describe(self.dsn)} failed: {exc!r}") from exc

    async def start(self) -> None:
        # Few connections: its statements are short (a rate-limit charge, a presence
        # write), and every process's connections count against max_connections.
        self._pool = await pgdb.open_pool(self.dsn, application_name="tidings chat cluster",
                                          max_size=_POOL_SIZE)
        # Its tables are the chat's migration 2 (`migrations.py`), applied by the store.
        async with self.connection() as conn:
            self._name_after(str(await conn.fetchval("SELECT current_schema()")))
        await self._beat()
        await self._listen()
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name="tidings-chat-cluster")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        if self._listener is not None:
            await pgdb.close_quietly(self._listener)
            self._listener = None
        if self._pool is not None:
            # Leaving: our presence rows and claims go with our row (ON DELETE CASCADE);
            # the next sweep by a live process announces what changed.
            with contextlib.suppress(*pgdb.UNAVAILABLE, ServiceUnavailable):
                async with pgdb.pooled(self._pool) as conn:
                    await conn.execute(
                        "UPDATE chat_cluster_processes SET seen_at = '-infinity' "
                        "WHERE process = $1", self.process)
            await pgdb.close_pool(self._pool)
            self._pool = None

    # -- the heartbeat and the sweep ------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        while True:
            await asyncio.sleep(self.config.heartbeat_s if not failures
                                else min(self.config.heartbeat_s, _RETRY_S * failures))
            try:
                await self._beat()
                if self._listener is None or self._listener.is_closed():
                    await self._listen()
                await self.sweep()
                failures = 0
            except ServiceUnavailable as exc:
                failures += 1
                log.warning("chat cluster: heartbeat failed (%r); retrying", exc)
            except Exception:
                failures += 1
                log.exception("chat cluster: heartbeat failed; retrying")

    async def _beat(self) -> None:
        async with self.connection() as conn:
            inserted = await conn.fetchval(
                "INSERT INTO chat_cluster_processes (process, host, pid) VALUES ($1, $2, $3) "
                "ON CONFLICT (process) DO UPDATE SET seen_at = now() "
                "RETURNING xmax = 0", self.process, socket.gethostname(), os.getpid())
            live = await conn.fetchval(
                "SELECT count(*) FROM chat_cluster_processes "
                "WHERE seen_at >= now() - make_interval(secs => $1)", self.config.expiry_s)
            self.live_processes = live if isinstance(live, int) else None
        if inserted and self._task is not None:
            log.warning("chat cluster: this process was taken for gone (no heartbeat for "
                        "%g s); writing its state again", self.config.expiry_s)
            for callback in self._on_rejoined:
                callback()

    async def sweep(self) -> list[Expired]:
        """Delete the processes past their expiry (at most one process does it at a time)
        and hand each one's leftovers to the `on_expired` callbacks."""
        expired: list[Expired] = []
        async with self.connection() as conn, conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)",
                                       self._sweep_key):
                return []
            gone = [str(r[0]) for r in await conn.fetch(
                "SELECT process FROM chat_cluster_processes WHERE seen_at < "
                "now() - make_interval(secs => $1) FOR UPDATE", self.config.expiry_s)]
            for process in gone:
                rooms = {str(r[0]) for r in await conn.fetch(
                    "SELECT DISTINCT unnest(rooms) FROM chat_cluster_presence "
                    "WHERE process = $1", process)}
                claims = tuple((str(r[0]), str(r[1])) for r in await conn.fetch(
                    "SELECT kind, item FROM chat_cluster_claims WHERE process = $1 "
                    "ORDER BY kind, item", process))
                expired.append(Expired(frozenset(rooms | {""}), claims))
            if gone:
                await conn.execute(
                    "DELETE FROM chat_cluster_processes WHERE process = ANY($1::text[])", gone)
                log.info("chat cluster: %s found processes gone: %s", self.process,
                         ", ".join(gone))
            await conn.execute("DELETE FROM chat_cluster_hits WHERE expires_at < "
                               "extract(epoch FROM now())")
        for leftovers in expired:
            for callback in self._on_expired:
                try:
                    await callback(leftovers)
                except Exception:
                    log.exception("chat cluster: cleaning up after a gone process failed")
        return expired

    # -- claims -----------------------------------------------------------------------------

    async def claim(self, kind: str, items: Iterable[str]) -> list[str]:
        """Claim each item not claimed by a process (this one included); the ones won."""
        wanted = list(items)
        if not wanted:
            return []
        async with self.connection() as conn:
            rows = await conn.fetch(
                "INSERT INTO chat_cluster_claims (kind, item, process) "
                "SELECT $1, item, $3 FROM unnest($2::text[]) AS item "
                "ON CONFLICT (kind, item) DO NOTHING RETURNING item", kind, wanted,
                self.process)
        return [str(r[0]) for r in rows]

    async def release(self, kind: str, item: str) -> None:
        async with self.connection() as conn:
            await conn.execute("DELETE FROM chat_cluster_claims WHERE kind = $1 AND item = $2 "
                               "AND process = $3", kind, item, self.process)

    async def owner_live(self, kind: str, item: str) -> bool:
        """Whether a live process holds a claim on the item."""
        async with self.connection() as conn:
            return bool(await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM chat_cluster_claims c JOIN "
                "chat_cluster_processes p USING (process) WHERE c.kind = $1 AND "
                "c.item = $2 AND p.seen_at >= now() - make_interval(secs => $3))",
                kind, item, self.config.expiry_s))

    # -- messages between processes -------------------------------------------------------

    async def _listen(self) -> None:
        if self._listener is not None:
            await pgdb.close_quietly(self._listener)
        self._listener = None
        conn = await pgdb.connect(self.dsn, application_name="tidings chat cluster listen",
                                  command_timeout=None)
        try:
            await conn.add_listener(self.channel, self._received)
        except pgdb.UNAVAILABLE as exc:
            await pgdb.close_quietly(conn)
            raise ServiceUnavailable(f"cannot LISTEN on {self.channel}: {exc}") from exc
        self._listener = conn

    def _received(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        kind, _, argument = payload.partition(" ")
        for callback in self._on_message:
            try:
                callback(kind, argument)
            except Exception:
                log.exception("chat cluster: handling %r failed", payload)

    async def send(self, kind: str, argument: str) -> None:
        async with self.connection() as conn:
            await conn.execute("SELECT pg_notify($1, $2)", self.channel, f"{kind} {argument}")

    # -- rate limits ------------------------------------------------------------------------

    async def hit(self, key: str, limit: int, window_s: float) -> int:
        """Charge a hit to `key`: 0, or (refused, not counted) the whole seconds to wait."""
        async with self.connection() as conn:
            return int(str(await conn.fetchval("SELECT chat_cluster_hit($1, $2, $3)",
                                               key, limit, window_s)))
