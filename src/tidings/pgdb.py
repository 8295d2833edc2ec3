"""How Tidings uses PostgreSQL: asyncpg behind a typed edge, one notion of "PostgreSQL
cannot be used" (503), and the same timeouts, URLs and advisory-lock keys everywhere.

The PostgreSQL transport (`transports/postgres.py`) and the PostgreSQL change feed
(`feeds/postgres/`) both build on this module, as the SQLite ones build on `sqlitedb.py`:

* asyncpg has no type stubs, so the `Connection` and `Pool` Protocols type the part of it
  Tidings uses, and no `Any` leaks past this edge.
* Everything the driver raises about storage it cannot reach or use is in `UNAVAILABLE`;
  callers turn it into ServiceUnavailable (503), never a 500 or a silent drop. An
  established connection that broke (`BROKEN`) is worth one more try on a fresh one.
* Connects time out quickly; a statement that hangs (a half-open connection) is cut off.
* Pooled sessions carry no state, so the pool skips asyncpg's reset round trip; in
  exchange, `pooled` hands a connection back only in a known state.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from tidings.errors import ServiceUnavailable, TidingsError
from tidings.tasks import cancel_and_wait

try:
    import asyncpg
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "PostgreSQL support (--db/--bus postgresql://) needs asyncpg: "
        "pip install 'tidings[postgres]'"
    ) from exc

__all__ = [
    "BROKEN",
    "CLOSE_TIMEOUT_S",
    "COMMAND_TIMEOUT_S",
    "CONNECT_TIMEOUT_S",
    "LEADER_IDLE_LIMIT_S",
    "UNAVAILABLE",
    "BrokenConnection",
    "Connection",
    "DataError",
    "DuplicateObject",
    "LockNotAvailable",
    "ObjectInUse",
    "Pool",
    "PostgresError",
    "QueryCanceled",
    "Record",
    "UniqueViolation",
    "advisory_key",
    "close_pool",
    "close_quietly",
    "connect",
    "describe",
    "keep_session",
    "leading",
    "open_pool",
    "pooled",
    "setting_up",
    "split_url",
    "url_keeping",
]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 3.0
# A backstop for a statement that hangs (a half-open connection); statements normally
# wait on a lock for milliseconds.
COMMAND_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 2.0
# A leader's session that stays idle this long is ended by PostgreSQL (`leading`). Every
# leader queries its connection at least every 5 s while it leads (the relay's and the
# tailers' rechecks), so only one that has stopped running lasts that long.
LEADER_IDLE_LIMIT_S = 15.0
_POOL_MAX = 10
# Query parameters of a Tidings URL that are not server settings for asyncpg.
_OWN_PARAMS = ("namespace",)

# Everything the driver raises about the storage it cannot reach or use: an operation that
# meets one of these answers 503.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
)
# An established connection that broke (killed backend, server restart, reset socket):
# worth one more try on a fresh connection. Failing to connect at all is not. An idle
# pooled connection can also be caught between the server's goodbye (the FATAL error of a
# shutdown) and its socket closing: asyncpg then refuses the next statement with
# InternalClientError ("another operation is in progress").
BROKEN: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InternalClientError,
)


# What a statement raises for a value it cannot use (not of the column's type, a NUL in
# text) and for a duplicate key: the caller's mistake (4xx), not the storage's.
DataError: type[Exception] = asyncpg.DataError
UniqueViolation: type[Exception] = asyncpg.UniqueViolationError
# What a statement raises when `lock_timeout` ran out.
LockNotAvailable: type[Exception] = asyncpg.LockNotAvailableError
# Replication slots (logical decoding): `statement_timeout` ran out; a slot in use by
# another session; an object (slot, publication) that exists already.
QueryCanceled: type[Exception] = asyncpg.QueryCanceledError
ObjectInUse: type[Exception] = asyncpg.ObjectInUseError
DuplicateObject: type[Exception] = asyncpg.DuplicateObjectError
# Any error PostgreSQL reported (the connection is fine).
PostgresError: type[Exception] = asyncpg.PostgresError


class BrokenConnection(ServiceUnavailable):
    """An established connection broke (one of `BROKEN`): a retry on a fresh one may work."""


Record = Sequence[object]


class Connection(Protocol):
    async def execute(self, query: str, *args: object, timeout: float | None = None) -> str: ...

    async def fetch(
        self, query: str, *args: object, timeout: float | None = None
    ) -> list[Record]: ...

    async def fetchrow(
        self, query: str, *args: object, timeout: float | None = None
    ) -> Record | None: ...

    async def fetchmany(
        self, query: str, args: Sequence[Sequence[object]], *, timeout: float | None = None
    ) -> list[Record]: ...

    async def fetchval(
        self, query: str, *args: object, timeout: float | None = None
    ) -> object: ...

    def transaction(
        self, *, isolation: str | None = None, readonly: bool = False
    ) -> AbstractAsyncContextManager[object]: ...

    async def add_listener(
        self, channel: str, callback: Callable[[object, int, str, str], None]
    ) -> None: ...

    def add_termination_listener(self, callback: Callable[[object], None]) -> None: ...

    def is_closed(self) -> bool: ...

    def is_in_transaction(self) -> bool: ...

    async def close(self, *, timeout: float | None = None) -> None: ...

    def terminate(self) -> None: ...


class Pool(Protocol):
    def acquire(
        self, *, timeout: float | None = None
    ) -> AbstractAsyncContextManager[Connection]: ...

    async def close(self) -> None: ...

    def terminate(self) -> None: ...


# -- URLs -------------------------------------------------------------------------------


def split_url(url: str) -> tuple[str, dict[str, str]]:
    """The DSN for asyncpg, and Tidings' own query parameters (`namespace`), which are not
    server settings; every other parameter (`search_path`, `sslmode`...) stays in the DSN.
    A parameter given twice counts the last time."""
    own = dict(param for param in parse_qsl(urlsplit(url).query, keep_blank_values=True)
               if param[0] in _OWN_PARAMS)
    return url_keeping(url, lambda key: key not in _OWN_PARAMS), own


def url_keeping(url: str, keep: Callable[[str], bool]) -> str:
    """`url` with only the query parameters whose name `keep` accepts, in order."""
    parts = urlsplit(url)
    kept = [(key, value) for key, value in parse_qsl(parts.query, keep_blank_values=True)
            if keep(key)]
    return urlunsplit(parts._replace(query=urlencode(kept)))


def describe(dsn: str) -> str:
    """Where a DSN points, for messages and logs: never the password."""
    parts = urlsplit(dsn)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path}"


def advisory_key(label: str) -> int:
    """A stable signed 64-bit advisory-lock key for `label`, the same in every process
    (the 64-bit key space does not overlap the two-int one, and other applications
    rarely pick random keys)."""
    digest = hashlib.blake2b(label.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


# -- connections ------------------------------------------------------------------------


async def keep_session(connection: object) -> None:
    """Pool `reset`: pooled sessions carry no state (no LISTEN, session locks or settings;
    a failed transaction closes its connection), so asyncpg's default reset query would
    only add a round trip to every operation."""


async def open_pool(dsn: str, *, application_name: str, max_size: int = _POOL_MAX) -> Pool:
    """A small pool of stateless sessions; failing to connect is ServiceUnavailable.

    No floor of open connections (min_size 0): asyncpg restores a floor in a task of its
    own that, while the server is away, logs a traceback every try. Connections are made
    when an operation needs one (which reports the failure to its caller) and idle ones
    are kept for asyncpg's five minutes, so a busy pool never waits on a connect."""
    try:
        return cast(
            Pool,
            await asyncpg.create_pool(
                dsn,
                min_size=0,
                max_size=max_size,
                timeout=CONNECT_TIMEOUT_S,
                command_timeout=COMMAND_TIMEOUT_S,
                reset=keep_session,
                server_settings={"application_name": application_name[:63]},
            ),
        )
    except UNAVAILABLE as exc:
        raise ServiceUnavailable(f"cannot use PostgreSQL at {describe(dsn)}: {exc}") from exc


@contextlib.contextmanager
def setting_up(pool: Pool, what: str) -> Iterator[Pool]:
    """Around a new pool's first use (creating tables, reading where it stands): on any
    failure the pool is aborted, leaving no session behind, and a server that is away (or
    refuses) becomes ServiceUnavailable("`what`: the error")."""
    try:
        yield pool
    except BaseException as exc:
        pool.terminate()
        if isinstance(exc, UNAVAILABLE):
            raise ServiceUnavailable(f"{what}: {exc}") from exc
        raise


async def connect(
    dsn: str,
    *,
    application_name: str | None = None,
    command_timeout: float | None = COMMAND_TIMEOUT_S,
) -> Connection:
    """One connection of its own (LISTEN, a session lock); failing to connect is
    ServiceUnavailable."""
    settings = {} if application_name is None else {"application_name": application_name[:63]}
    try:
        return cast(
            Connection,
            await asyncpg.connect(
                dsn,
                timeout=CONNECT_TIMEOUT_S,
                command_timeout=command_timeout,
                server_settings=settings,
            ),
        )
    except UNAVAILABLE as exc:
        raise ServiceUnavailable(f"cannot reach PostgreSQL at {describe(dsn)}: {exc}") from exc


@contextlib.asynccontextmanager
async def pooled(pool: Pool, *, timeout: float = COMMAND_TIMEOUT_S) -> AsyncIterator[Connection]:
    """A connection from `pool`, handed back only in a known state. The pool does not
    look (`keep_session`), so a connection left in a transaction, or whose operation was
    cancelled, timed out or broke, is aborted instead (the server rolls back and releases
    its locks; the pool opens a new connection when one is needed). After a server restart
    the driver may still be consuming the error of a killed session when the next caller
    gets it ("another operation is in progress"). A clean refusal (a value the server
    rejected, or the caller's own TidingsError between statements) keeps it."""
    async with pool.acquire(timeout=timeout) as conn:
        try:
            yield conn
        except BaseException as exc:
            clean = isinstance(exc, TidingsError | DataError | UniqueViolation)
            # InterfaceError: the connection closed under the operation and the pool has
            # taken it back already; nothing is left to abort.
            with contextlib.suppress(asyncpg.InterfaceError):
                if not conn.is_closed() and (conn.is_in_transaction() or not clean):
                    conn.terminate()
            raise


@contextlib.asynccontextmanager
async def leading(
    dsn: str,
    key: int,
    channel: str | None,
    wake: asyncio.Event,
    *,
    application_name: str,
    standing_by: str,
    idle_limit_s: float = LEADER_IDLE_LIMIT_S,
    keep_alive: bool = False,
) -> AsyncIterator[Connection]:
    """A connection of its own that holds the session advisory lock `key`, waiting while
    another session holds it (logging `standing_by` once), and LISTENs on `channel` (if
    any); `wake` is set by a notification and by the connection's end. Closed on leaving, which
    releases the lock (so does the session's end, however the process ends): another
    process waiting for it takes over.

    A leader that stops running without dying (a stopped or frozen process or VM, an event
    loop blocked) would keep the lock, and stall what it leads for everyone, as long as
    it stays so: PostgreSQL (14 and later) ends its session once it has been idle (in a
    transaction or not) for `idle_limit_s`, and the lock goes to a process waiting for
    it. A leader that runs again finds its connection closed, and waits its turn as any
    other. So a leader must query its connection more often than that while it leads; one
    that holds the lock without using the connection (a lease) says `keep_alive`, and a
    task of this process queries it every third of the limit (so only a running process
    keeps it)."""
    conn = await connect(dsn, command_timeout=None, application_name=application_name)
    try:
        await conn.execute(
            "SELECT set_config('idle_in_transaction_session_timeout', $1, false), "
            "set_config('idle_session_timeout', $1, false) "
            "WHERE current_setting('server_version_num')::int >= 140000",
            f"{int(idle_limit_s * 1000)}ms", timeout=COMMAND_TIMEOUT_S)
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", key,
                                   timeout=COMMAND_TIMEOUT_S):
            log.info("%s", standing_by)
            # Granted when the holder's session ends. Not LISTENing meanwhile: a session
            # that never reads its notifications holds the queue's tail.
            await conn.fetchval("SELECT pg_advisory_lock($1)", key)
        conn.add_termination_listener(lambda _conn: wake.set())
        if channel is not None:
            await conn.add_listener(channel, lambda _c, _pid, _ch, _payload: wake.set())
        keeping = (asyncio.create_task(_keep_alive(conn, idle_limit_s / 3, wake))
                   if keep_alive else None)
        try:
            yield conn
        finally:
            if keeping is not None:
                await cancel_and_wait(keeping)
    finally:
        await close_quietly(conn)


async def _keep_alive(conn: Connection, every_s: float, wake: asyncio.Event) -> None:
    """`leading`'s keep-alive: a query every `every_s` until the session is gone (`wake`
    set: by its end, or here when a query fails)."""
    while not wake.is_set():
        await asyncio.sleep(every_s)
        try:
            await conn.execute("SELECT 1", timeout=COMMAND_TIMEOUT_S)
        except UNAVAILABLE:
            wake.set()


async def close_quietly(conn: Connection) -> None:
    """Close politely within a bound, else abort: a close never hangs, and raises only
    the caller's cancellation."""
    if conn.is_closed():
        return
    try:
        await conn.close(timeout=CLOSE_TIMEOUT_S)
    except Exception:
        conn.terminate()
    except asyncio.CancelledError:
        # Aborted, and the cancellation goes on: a task stopped while closing (a tailer
        # whose `stop` came as it closed after a failure) must not take it for a failure
        # and retry forever.
        conn.terminate()
        raise


async def close_pool(pool: Pool) -> None:
    """Wait (within a bound) for operations in flight to hand their connections back, then
    close; abort what is left."""
    try:
        await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT_S)
    except UNAVAILABLE:  # includes TimeoutError
        pool.terminate()
