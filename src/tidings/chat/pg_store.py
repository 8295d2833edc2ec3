"""The chat's tables in PostgreSQL (`--db postgresql://...[?search_path=SCHEMA]`), shared
by any number of Tidings processes.

The tables live in the connection's current schema (the first existing one of the URL's
`search_path`), like the PostgreSQL change feed's. Operations run on a small pool, each
in one transaction (`store.py` holds them, as SQL steps).

Order, without a lock on the writers (PgQ's idea, as the change feed's capture). Every
operation that emits updates writes them to the outbox at its very end, in one call of
`chat_emit` (`migrations.py`), unnumbered. Rows get their `seq` when they are
*sequenced*: `chat_sequence` takes the order lock (`LOCK TABLE chat_order`), numbers the
rows committed and not yet numbered in `id` order after the last number given, and
commits. Sequencing runs one at a time, each seeing everything the one before numbered;
so:

* Every committed row is numbered once, a rolled-back one never (MVCC).
* A transaction's rows get consecutive numbers, in statement order (their ids are).
* If T1's COMMIT returned before T2 began, T1 comes first: any snapshot that sees T2
  sees T1 (the same or an earlier run), and in the same run T1's ids are lower.

The relay sequences before each read (on its own connection). A history read
sequences too, in its own snapshot: it takes the order lock *before* its REPEATABLE READ
snapshot (LOCK TABLE takes none), numbers what that snapshot sees, and the last number
is its exact position: every update at or below it is in what it read, none above. When
nothing is left to number it writes nothing. Writers take no lock another writer waits
for, so their commits group (docs/chat.md, "The chat on PostgreSQL", measures both
designs).

One relay among processes. The relay holds a session-level advisory lock (the *relay
key*) on a connection of its own, and reads and saves the outbox on that connection: if
it breaks, the relay's next step fails, and another process, waiting in
`pg_advisory_lock`, takes over as soon as PostgreSQL ends the session (at once when the
process dies; within the TCP keepalive when its machine does). It republishes from the
saved cursor; the hub's transport stores each identical update once.

Waking the relay (the PostgreSQL change feed's scheme, docs/feeds.md "Tailing"): while
rows come it looks again every few ms; after a quiet spell it takes the *idle key*, an
advisory lock that `chat_emit` takes shared in every writer's transaction until its
commit. Holding it, the relay sleeps: every writer that emitted before has committed
(its rows are in the next read) and every later one fails to take the key shared and
NOTIFYs at its commit. So writes under load pay no NOTIFY, and a sleeping relay misses
nothing (it also looks every few seconds all the same).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TypeVar

from tidings.chat.errors import InvalidInput
from tidings.chat.events import Outgoing
from tidings.chat.migrations import POSTGRES, VERSION_TABLE
from tidings.chat.model import now_iso
from tidings.chat.sql import Kind, Op, Result, Steps
from tidings.errors import ServiceUnavailable
from tidings.pgdb import (
    COMMAND_TIMEOUT_S,
    UNAVAILABLE,
    Connection,
    DataError,
    Pool,
    advisory_key,
    close_pool,
    describe,
    leading,
    open_pool,
    pooled,
    setting_up,
    split_url,
)

__all__ = ["PostgresDatabase", "migrate"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# While rows come, the relay looks for more this often (one indexed read).
_POLL_S = 0.002
# After this long without a row it tries to sleep until a writer NOTIFYs it.
_QUIET_S = 0.05
# Asleep, it looks all the same this often (a bound, should a wake-up go missing).
_RECHECK_S = 5.0


@dataclass(frozen=True, slots=True)
class _Keys:
    """One schema's advisory-lock keys and NOTIFY channel."""

    schema: str
    migrate: int
    idle: int
    relay: int
    channel: str

    @classmethod
    def of(cls, schema: str) -> _Keys:
        def key(purpose: str) -> int:
            return advisory_key(f"tidings-chat:{purpose}:{schema}")

        channel = f"tidings_chat.{schema}"
        if len(channel.encode()) > 63:  # channel names are identifiers: 63 bytes at most
            channel = "tidings_chat." + hashlib.blake2b(schema.encode(),
                                                        digest_size=8).hexdigest()
        return cls(schema, key("migrate"), key("idle"), key("relay"), channel)


def _changed(status: str) -> int:
    """The row count of a command status ("INSERT 0 1", "UPDATE 3")."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


async def _drive(conn: Connection, steps: Steps[T]) -> T:
    sql = steps.send(None)
    while sql is not None:
        if sql.returns_rows:
            reply = Result(await conn.fetch(sql.for_pg(), *sql.args), 0)
        else:
            reply = Result((), _changed(await conn.execute(sql.for_pg(), *sql.args)))
        sql = steps.send(reply)
    return steps.value


async def migrate(conn: Connection, keys: _Keys) -> str:
    """Apply the migrations the schema lacks, in one transaction, under the schema's
    migration lock (a second process starting now waits, then finds them applied);
    returns the epoch."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", keys.migrate)
        await conn.execute(f"CREATE TABLE IF NOT EXISTS {VERSION_TABLE} ("
                           "version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
        current = int(str(await conn.fetchval(
            f"SELECT COALESCE(MAX(version), 0) FROM {VERSION_TABLE}")))
        for version, script in enumerate(POSTGRES[current:], start=current + 1):
            await conn.execute(script)
            await conn.execute(f"INSERT INTO {VERSION_TABLE} VALUES ($1, $2)", version,
                               now_iso())
            log.info("chat: schema %s migrated to version %d", keys.schema, version)
        await conn.execute("INSERT INTO chat_state VALUES ('epoch', $1), ('cursor', '0') "
                           "ON CONFLICT DO NOTHING", secrets.token_hex(4))
        return str(await conn.fetchval("SELECT value FROM chat_state WHERE name = 'epoch'"))


class PostgresDatabase:
    """A `ChatDatabase` in a PostgreSQL schema (see the module doc)."""

    ephemeral = False
    calls = True  # it has the chat's functions (`Kind` "call")
    # A process that does not relay rereads the relay's saved cursor this often while a
    # history read waits for its position to be published.
    standby_poll_s = 0.05

    def __init__(self, db_url: str) -> None:
        self._dsn = split_url(db_url)[0]
        self.epoch = ""
        self._pool: Pool | None = None
        self._keys = _Keys.of("")
        # The relay's side (while this process relays).
        self._lead: Connection | None = None
        self._holding = False  # the idle key: writers NOTIFY
        self._last_found = 0.0

    @property
    def emit_args(self) -> tuple[int, str]:
        """`chat_emit`'s first two arguments: the relay's idle key, its NOTIFY channel."""
        return self._keys.idle, self._keys.channel

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        pool = await open_pool(self._dsn, application_name="tidings-chat")
        with setting_up(pool, f"the chat cannot use PostgreSQL at {describe(self._dsn)}"):
            async with pooled(pool) as conn:
                schema = await conn.fetchval("SELECT current_schema()")
                if not isinstance(schema, str):
                    raise ServiceUnavailable(
                        "the chat has no schema to keep its tables in: none of the "
                        "search_path's schemas exists (create it, or set ?search_path=)")
                self._keys = _Keys.of(schema)
                self.epoch = await migrate(conn, self._keys)
        self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await close_pool(pool)

    # -- operations ------------------------------------------------------------------------

    async def run(self, kind: Kind, op: Op[T]) -> T:
        pool = self._pool
        if pool is None:
            raise ServiceUnavailable("the chat's database is not open")
        steps = Steps(op)
        try:
            async with pooled(pool) as conn:
                if kind == "read":
                    return await _drive(conn, steps)
                if kind == "call":
                    return await self._call(conn, steps)
                # A snapshot read may number the outbox (`ChatStore.history`): not read-only.
                async with conn.transaction(
                        isolation="repeatable_read" if kind == "snapshot" else None):
                    value = await _drive(conn, steps)
                    if steps.emitted:
                        await self._emit(conn, steps.emitted)
                    return value
        except DataError as exc:  # a value PostgreSQL cannot store (a NUL in text)
            raise InvalidInput("content", f"cannot store that: {exc}") from exc
        except UNAVAILABLE as exc:
            raise ServiceUnavailable(f"the chat's database cannot be used: {exc}") from exc

    async def _call(self, conn: Connection, steps: Steps[T]) -> T:
        """A write in one statement, its own transaction (`Kind` "call")."""
        sql = steps.send(None)
        if sql is None or steps.emitted:
            raise RuntimeError("a call is one statement that emits nothing itself")
        if steps.send(Result(await conn.fetch(sql.for_pg(), *sql.args), 0)) is not None:
            raise RuntimeError("a call is one statement")
        return steps.value

    async def _emit(self, conn: Connection, emitted: list[Outgoing]) -> None:
        """The operation's updates into the outbox (unnumbered: see the module doc), last
        thing before its commit."""
        await conn.execute("SELECT chat_emit($1, $2, $3, $4)", *self.emit_args,
                           [out.topic for out in emitted], [out.data for out in emitted])

    # -- the relay -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lead(self, wake: asyncio.Event) -> AsyncIterator[None]:
        keys = self._keys
        async with leading(
            self._dsn, keys.relay, keys.channel, wake,
            application_name=f"tidings-chat-relay:{keys.schema}",
            standing_by=f"chat: another process relays schema {keys.schema}; this one "
                        "stands by",
        ) as conn:
            log.info("chat: relaying the outbox of schema %s", keys.schema)
            self._lead, self._holding = conn, False
            self._last_found = time.monotonic()
            try:
                yield
            finally:
                self._lead = None

    def _leading(self) -> Connection:
        conn = self._lead
        if conn is None or conn.is_closed():
            raise ServiceUnavailable("the chat relay's connection closed")
        return conn

    async def run_leading(self, op: Op[T], kind: Kind = "write") -> T:
        """Run `op` (the relay's read or save) on the relay's own connection: when it
        broke, and another process may relay, this fails instead."""
        conn = self._leading()
        try:
            if kind == "call":
                return await self._call(conn, Steps(op))
            async with conn.transaction():
                return await _drive(conn, Steps(op))
        except UNAVAILABLE as exc:
            raise ServiceUnavailable(f"the chat relay's connection failed: {exc}") from exc

    async def wait(self, wake: asyncio.Event, found: bool) -> None:
        conn = self._leading()
        idle = self._keys.idle
        if found:  # rows are coming: look again at once, and have writers stop NOTIFYing
            self._last_found = time.monotonic()
            if self._holding:
                await conn.fetchval("SELECT pg_advisory_unlock($1)", idle,
                                    timeout=COMMAND_TIMEOUT_S)
                self._holding = False
            return
        if self._holding:  # asleep: until a writer NOTIFYs (or a look of our own)
            await _woken(wake, _RECHECK_S)
            await conn.fetchval("SELECT pg_advisory_unlock($1)", idle, timeout=COMMAND_TIMEOUT_S)
            self._holding = False
            return
        if time.monotonic() - self._last_found < _QUIET_S:
            await _woken(wake, _POLL_S)
            return
        if await conn.fetchval("SELECT pg_try_advisory_lock($1)", idle,
                               timeout=COMMAND_TIMEOUT_S):
            # Every writer that did not see us asleep has committed: one more read finds
            # what they wrote, and from now on writers NOTIFY.
            self._holding = True
            return
        await _woken(wake, _POLL_S)  # a writer is between its emit and its commit


async def _woken(wake: asyncio.Event, timeout_s: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await wake.wait()
