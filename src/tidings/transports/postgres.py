"""The shared transport on PostgreSQL: history in one table, NOTIFY only as a wake-up.

`postgresql://host:port/db?namespace=NAME` (namespace `tidings` by default) keeps every
update in the table `NAME_updates`, which `start()` creates if missing. Any number of hub
processes may share it: they all see one history in one order.

Order. `seq` must follow commit order, because a tailer that has read seq 6 never looks
below 6 again. A PostgreSQL sequence does not give that: a transaction that took 5 can
commit after one that took 6. So appends are serialized: each append transaction takes a
transaction-level advisory lock (the key is derived from the namespace), computes
`max(seq) + 1` in a statement that runs after the lock is granted, inserts, NOTIFYs, and
commits, which releases the lock. The next appender's statements start after that commit
and see it. The idempotence check (a retried publish is stored once) runs under the same
lock, in the same statement as the insert, so two identical publishes racing on two
processes store one row.

Group commit. Serializing makes every append pay for a whole transaction, WAL flush
included, while holding the lock: about a millisecond here, so a thousand appends a
second at most. Each process therefore has one writer task that takes every append
waiting in its queue into one transaction: one call of the function `NAME_append`
(created with the table), which takes the lock, inserts each update in order (or finds it
stored), NOTIFYs once and commits with one flush, in one round trip. A lone publisher
waits no longer than before; many publishers share commits.

Reading. The writer, `read_after` and `find` use a small pool. `tail` opens its own
connection, LISTENs on `NAME_updates`, reads pages of the table until it is caught up,
then waits for a notification and reads again. A notification only says "look again": the
table is the truth, so a notification lost while the connection was down costs nothing,
and the tailer also looks again every few seconds in case one went missing. When its
connection is lost, `tail` raises and the hub calls it again from the last seq it saw.

Failures. A publish that cannot be stored raises ServiceUnavailable (503), never a silent
drop. Connects time out quickly. An append whose pooled connection broke is tried once
more on a fresh one; the idempotence check makes that retry safe even when the first
attempt's COMMIT went through. Through a server restart, then: publishes answer 503 while
it is down, the pool and the tail reconnect by themselves when it is back, and the tail
resumes from its last seq. The outage is logged when it starts and when it ends (the
first operation that works again), not once per refused publish.

Retention. `prune()` removes updates beyond `history_size` and older than
`history_max_age_s`, and runs by itself every 256 appends of this process. It always keeps
the newest row: `max(seq)` is the counter, and an emptied table would reuse positions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Sequence
from typing import cast

from tidings.errors import BadRequest, ServiceUnavailable, TidingsError, TransportClosed
from tidings.hub.update import Update
from tidings.outage import Outage, OutageHealth
from tidings.pgdb import (
    BROKEN,
    CLOSE_TIMEOUT_S,
    COMMAND_TIMEOUT_S,
    UNAVAILABLE,
    BrokenConnection,
    Connection,
    DataError,
    Pool,
    Record,
    UniqueViolation,
    advisory_key,
    close_pool,
    close_quietly,
    connect,
    describe,
    open_pool,
    pooled,
    setting_up,
    split_url,
)

__all__ = ["PostgresTransport"]

log = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "tidings"
# Lower-case identifiers only, so the table, index and channel names need no quoting
# rules to agree; 48 characters keeps `NAME_updates_id` and the application name
# under PostgreSQL's 63-byte identifier limit.
_NAMESPACE = re.compile(r"[a-z_][a-z0-9_]{0,47}")

_PRUNE_EVERY = 256
# Updates per append transaction at most (one lock wait, one commit for all of them).
_BATCH_MAX = 500
_TAIL_PAGE = 1000
# The tailer looks at the table this often even without a notification: NOTIFY is a
# wake-up, and one can be missed; this bounds how late a missed one is noticed.
_RECHECK_S = 5.0


def _row_to_update(row: Record) -> Update:
    seq, id_, topics, data, private, type_, retry, created_at, frame = row
    return Update(
        topics=tuple(json.loads(cast(str, topics))),
        data=cast(str, data),
        id=cast(str, id_),
        private=cast(bool, private),
        type=cast("str | None", type_),
        retry=cast("int | None", retry),
        seq=cast(int, seq),
        created_at=cast(float, created_at),
        frame=cast(bytes, frame),
    )


def _deleted(status: str) -> int:
    # asyncpg returns the command tag, "DELETE 12".
    return int(status.rsplit(" ", 1)[-1])


class PostgresTransport(OutageHealth):
    """History in a PostgreSQL table shared by every process; appends serialized by an
    advisory lock so that seq follows commit order; `tail` woken by LISTEN/NOTIFY."""

    @classmethod
    def from_url(
        cls, url: str, *, history_size: int = 100_000, history_max_age_s: float = 0.0
    ) -> PostgresTransport:
        """`postgresql://[user[:password]@]host[:port]/db[?namespace=NAME&...]`; every
        other query parameter is passed on to asyncpg."""
        dsn, own = split_url(url)
        return cls(
            dsn,
            namespace=own.get("namespace", DEFAULT_NAMESPACE),
            history_size=history_size,
            history_max_age_s=history_max_age_s,
        )

    def __init__(
        self,
        dsn: str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        history_size: int = 100_000,
        history_max_age_s: float = 0.0,
    ) -> None:
        if not _NAMESPACE.fullmatch(namespace):
            raise BadRequest(
                f"invalid namespace {namespace!r}: 1 to 48 characters of a-z, 0-9 and _,"
                " not starting with a digit"
            )
        self._dsn = dsn
        self._where = describe(dsn)  # for messages and logs: never the password
        self._outage = Outage(f"PostgreSQL at {self._where}")
        self.namespace = namespace
        self.table = f"{namespace}_updates"
        self.channel = self.table
        self.lock_key = advisory_key(f"tidings:{namespace}")
        self._history_size = history_size
        self._history_max_age_s = history_max_age_s
        self._pool: Pool | None = None
        self._listeners: set[Connection] = set()
        self._queue: list[tuple[Update, asyncio.Future[Update]]] = []
        self._queued = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._last_seq = 0
        self._appends_since_prune = 0
        self._closed = False

        t = self.table
        cols = (
            "seq, id, topics::text, data, private, type, retry,"
            " extract(epoch FROM created_at)::float8, frame"
        )
        self._sql_schema = f"""
            CREATE TABLE IF NOT EXISTS {t} (
                seq        bigint PRIMARY KEY,
                id         text NOT NULL,
                topics     jsonb NOT NULL,
                data       text NOT NULL,
                private    boolean NOT NULL,
                type       text,
                retry      integer,
                created_at timestamptz NOT NULL,
                frame      bytea NOT NULL
            );
            CREATE INDEX IF NOT EXISTS {t}_id ON {t} (id, seq);
            CREATE OR REPLACE FUNCTION {t}_append(
                p_ids text[], p_topics jsonb[], p_datas text[], p_privates boolean[],
                p_types text[], p_retries integer[], p_frames bytea[])
            RETURNS TABLE (out_seq bigint, out_at float8, out_inserted boolean)
            LANGUAGE plpgsql AS $fn$
            DECLARE
                next bigint;
                first bigint;
                newest record;
            BEGIN
                PERFORM pg_advisory_xact_lock({self.lock_key});
                -- After the lock: sees every earlier append.
                SELECT coalesce(max(u.seq), 0) INTO next FROM {t} u;
                first := next;
                FOR i IN 1 .. coalesce(array_length(p_ids, 1), 0) LOOP
                    -- A retried publish (the newest row with its id is the same update)
                    -- is answered with that row, not stored again.
                    SELECT u.seq, u.created_at, u.topics, u.data, u.private, u.frame
                      INTO newest FROM {t} u WHERE u.id = p_ids[i] ORDER BY u.seq DESC LIMIT 1;
                    IF FOUND AND newest.topics = p_topics[i] AND newest.data = p_datas[i]
                            AND newest.private = p_privates[i] AND newest.frame = p_frames[i] THEN
                        out_seq := newest.seq;
                        out_at := extract(epoch FROM newest.created_at);
                        out_inserted := false;
                    ELSE
                        next := next + 1;
                        INSERT INTO {t} (seq, id, topics, data, private, type, retry,
                                         created_at, frame)
                        VALUES (next, p_ids[i], p_topics[i], p_datas[i], p_privates[i],
                                p_types[i], p_retries[i], clock_timestamp(), p_frames[i])
                        RETURNING extract(epoch FROM created_at) INTO out_at;
                        out_seq := next;
                        out_inserted := true;
                    END IF;
                    RETURN NEXT;
                END LOOP;
                IF next > first THEN  -- it only says "look again"
                    PERFORM pg_notify('{self.channel}', next::text);
                END IF;
            END $fn$;
        """
        # A batch of appends in one call, its own transaction: the lock, an idempotent
        # insert of each update in order (created_at stamped under the lock, so it grows
        # with seq), one NOTIFY; a row (seq, created_at, inserted) per update.
        self._sql_append = (f"SELECT out_seq, out_at, out_inserted FROM {t}_append("
                            f"$1::text[], $2::jsonb[], $3::text[], $4::boolean[], "
                            f"$5::text[], $6::integer[], $7::bytea[])")
        # BEGIN and the lock in one round trip (simple protocol, no parameters); the key
        # is an integer we computed, not input.
        self._sql_begin_locked = f"BEGIN; SELECT pg_advisory_xact_lock({self.lock_key})"
        self._sql_read_after = f"SELECT {cols} FROM {t} WHERE seq > $1 ORDER BY seq LIMIT $2"
        self._sql_find = f"SELECT {cols} FROM {t} WHERE id = $1 ORDER BY seq DESC LIMIT 1"
        self._sql_last_seq = f"SELECT coalesce(max(seq), 0) FROM {t}"
        self._sql_first_seq = f"SELECT coalesce(min(seq), 0) FROM {t}"
        # Both retention deletes keep the newest row (see the module docstring) and walk
        # the primary key from the oldest end, never the whole table.
        self._sql_prune_count = (
            f"DELETE FROM {t} WHERE seq <= (SELECT max(seq) FROM {t}) - greatest($1::bigint, 1)"
        )
        # Rows expire oldest first (created_at grows with seq): delete everything below
        # the first row that is still young enough, or below the newest if none is.
        self._sql_prune_age = f"""
            DELETE FROM {t} WHERE seq < coalesce(
                (SELECT seq FROM {t}
                 WHERE created_at >= clock_timestamp() - make_interval(secs => $1::float8)
                 ORDER BY seq LIMIT 1),
                (SELECT max(seq) FROM {t}))
        """

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        if self._closed:
            raise TransportClosed("the transport is closed")
        if self._pool is not None:
            return
        pool = await open_pool(self._dsn, application_name=f"tidings:{self.namespace}")
        with setting_up(pool, f"cannot use PostgreSQL at {self._where}"):
            async with pool.acquire() as conn:
                # Under the append lock: two processes starting together would otherwise
                # race on CREATE TABLE IF NOT EXISTS (a unique violation in the catalog).
                try:
                    await conn.execute(self._sql_begin_locked)
                    await conn.execute(self._sql_schema)
                    await conn.execute("COMMIT")
                except BaseException:
                    conn.terminate()  # the server rolls back; the pool makes a new one
                    raise
                self._last_seq = cast(int, await conn.fetchval(self._sql_last_seq))
        self._pool = pool
        self._writer = asyncio.create_task(self._write_batches(), name="tidings-pg-writer")
        self._writer.add_done_callback(self._fail_queued)
        log.info("PostgreSQL transport on %s, table %s, last seq %s",
                 self._where, self.table, self._last_seq)

    @property
    def last_seq(self) -> int:
        return self._last_seq

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Aborting a tail's connection wakes it (termination listener) or fails its read;
        # either way it sees `_closed` and ends. Aborted, not closed politely: the tail's
        # task may be using the connection this very moment.
        listeners, self._listeners = self._listeners, set()
        for conn in listeners:
            conn.terminate()
        if self._writer is not None:
            # Updates accepted before close are still written, within a bound.
            self._queued.set()
            with contextlib.suppress(TimeoutError):  # then wait_for has cancelled it
                await asyncio.wait_for(self._writer, CLOSE_TIMEOUT_S)
        pool, self._pool = self._pool, None
        if pool is not None:
            await close_pool(pool)

    async def destroy(self) -> None:
        """Drop the table: the whole history of this namespace is gone."""
        async with self._connection() as conn:
            await conn.execute(f"DROP TABLE IF EXISTS {self.table}")
        self._last_seq = 0

    # -- writing -------------------------------------------------------------------

    async def append(self, update: Update) -> Update:
        return await self._enqueue(update)

    async def append_many(self, updates: Sequence[Update]) -> list[Update]:
        """Append `updates` in this order, in as few transactions as the batch size allows
        (`BatchAppend`): a publisher of many pays one commit, not one each."""
        futures = [self._enqueue(update) for update in updates]
        try:
            return [await future for future in futures]
        finally:
            for future in futures:
                if future.done() and not future.cancelled():
                    future.exception()  # retrieved: a failure is reported once, above

    def _enqueue(self, update: Update) -> asyncio.Future[Update]:
        if self._closed:
            raise TransportClosed("the transport is closed")
        if self._writer is None or self._writer.done():
            raise ServiceUnavailable("the PostgreSQL transport has not been started")
        future: asyncio.Future[Update] = asyncio.get_running_loop().create_future()
        self._queue.append((update, future))
        self._queued.set()
        return future

    async def _write_batches(self) -> None:
        """The one writer of this process: each batch is one locked transaction."""
        while True:
            await self._queued.wait()
            self._queued.clear()
            while self._queue:
                batch = self._queue[:_BATCH_MAX]
                del self._queue[:_BATCH_MAX]
                # A caller that gave up (cancelled) before its update was written gets
                # nothing stored: it has no answer, so its client will publish again.
                batch = [(update, future) for update, future in batch if not future.done()]
                if batch and not await self._write_batch(batch):
                    # What was queued behind a batch that failed fails too, unwritten: what
                    # this process stores is always a prefix of what it was asked to, in
                    # order, so publishing the rest again keeps the order.
                    self._fail_queued(None, "an earlier update was not stored")
            if self._closed:
                return
            if self._appends_since_prune >= _PRUNE_EVERY:
                try:
                    await self.prune()
                except ServiceUnavailable as exc:
                    # The updates are stored; retention catches up after a later batch.
                    log.warning("pruning %s failed: %s", self.table, exc)

    def _fail_queued(self, _writer: object, reason: str = "") -> None:
        """The writer ended (close, or cancelled with its loop): nobody waits forever. With
        a `reason`: a batch failed, and what waits behind it is not written."""
        queue, self._queue = self._queue, []
        for _, future in queue:
            if not future.done():
                future.set_exception(ServiceUnavailable(f"the update was not stored: {reason}")
                                     if reason else TransportClosed("the transport is closed"))

    async def _write_batch(self, batch: list[tuple[Update, asyncio.Future[Update]]]) -> bool:
        """Store one batch and answer its futures; False when it failed."""
        updates = [update for update, _ in batch]
        try:
            try:
                stored = await self._insert(updates, may_retry=True)
            except BrokenConnection as exc:
                # The pooled connection was dead (server restarted, backend killed). If the
                # first attempt committed after all, the retry finds every update already
                # stored and inserts nothing. (An outage is logged if the retry fails too.)
                log.debug("append on %s failed (%s); retrying on a fresh connection",
                          self._where, exc)
                stored = await self._insert(updates)
        except BaseException as exc:
            if not isinstance(exc, ServiceUnavailable | asyncio.CancelledError):
                log.exception("storing %d updates in %s failed", len(updates), self.table)
            reason = exc.message if isinstance(exc, TidingsError) else repr(exc)
            for _, future in batch:
                if not future.done():
                    # Not known to be stored: the publisher answers 503 and retries, and
                    # a retry of an update that was stored after all is stored once.
                    error = ServiceUnavailable(f"the update was not stored: {reason}")
                    error.__cause__ = exc
                    future.set_exception(error)
            if not isinstance(exc, Exception):
                raise
            return False
        for (_, future), result in zip(batch, stored, strict=True):
            if not future.done():
                future.set_result(result)
        self._last_seq = max(self._last_seq, *(u.seq for u in stored))
        self._appends_since_prune += len(stored)
        return True

    async def _insert(self, updates: list[Update], *, may_retry: bool = False) -> list[Update]:
        """Store `updates` in one transaction under the append lock, in their order: one
        round trip (`NAME_append`) and one WAL flush, however many updates there are.
        (`may_retry`: see `_connection`.)"""
        # A failure or cancellation mid-call drops the connection (`pooled`): the server
        # rolls back and releases the lock.
        async with self._connection(may_retry=may_retry) as conn:
            rows = await conn.fetch(
                self._sql_append,
                [u.id for u in updates],
                [json.dumps(list(u.topics)) for u in updates],
                [u.data for u in updates],
                [u.private for u in updates],
                [u.type for u in updates],
                [u.retry for u in updates],
                [u.frame for u in updates],
            )
        return [
            update.stored(cast(int, seq), cast(float, created_at))
            for update, (seq, created_at, _) in zip(updates, rows, strict=True)
        ]

    async def prune(self) -> int:
        """Apply retention (count, then age); returns how many updates were removed."""
        self._appends_since_prune = 0
        async with self._connection() as conn:
            removed = _deleted(await conn.execute(self._sql_prune_count, self._history_size))
            if self._history_max_age_s > 0:
                removed += _deleted(
                    await conn.execute(self._sql_prune_age, self._history_max_age_s)
                )
        return removed

    # -- reading -------------------------------------------------------------------

    async def read_after(self, seq: int, limit: int) -> list[Update]:
        async with self._connection() as conn:
            rows = await conn.fetch(self._sql_read_after, seq, limit)
        return [_row_to_update(row) for row in rows]

    async def find(self, update_id: str) -> Update | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(self._sql_find, update_id)
        return None if row is None else _row_to_update(row)

    async def first_seq(self) -> int:
        async with self._connection() as conn:
            return cast(int, await conn.fetchval(self._sql_first_seq))

    async def tail(self, after: int) -> AsyncIterator[Update]:
        if self._closed:
            raise TransportClosed("the transport is closed")
        wake = asyncio.Event()
        conn = await self._listen(wake)
        try:
            while not self._closed:
                # Cleared before reading: a notification that arrives while we read or
                # while the caller handles a page makes the next wait return at once.
                wake.clear()
                began = self._outage.now()
                try:
                    rows = await conn.fetch(
                        self._sql_read_after, after, _TAIL_PAGE, timeout=COMMAND_TIMEOUT_S
                    )
                except Exception as exc:
                    if self._closed:
                        return  # close() aborted the connection under the read
                    if isinstance(exc, UNAVAILABLE):
                        raise self._outage_began(exc, "lost the PostgreSQL connection") from exc
                    raise
                self._outage.ok(began)
                for row in rows:
                    update = _row_to_update(row)
                    after = update.seq
                    self._last_seq = max(self._last_seq, after)
                    yield update
                if len(rows) == _TAIL_PAGE:
                    continue  # not caught up yet
                # Woken by a NOTIFY, by the connection closing (the next read raises), by
                # close(), or after _RECHECK_S in case a notification went missing.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_RECHECK_S):
                        await wake.wait()
        finally:
            self._listeners.discard(conn)
            await close_quietly(conn)

    async def _listen(self, wake: asyncio.Event) -> Connection:
        """A connection of its own, LISTENing, whose notifications and loss set `wake`."""
        try:
            conn = await connect(self._dsn, application_name=f"tidings-listen:{self.namespace}")
        except ServiceUnavailable as exc:
            self._outage.failed(exc.__cause__ or exc)
            raise
        if self._closed:  # close() ran while we connected: it could not abort this one
            conn.terminate()
            raise TransportClosed("the transport is closed")
        self._listeners.add(conn)
        conn.add_termination_listener(lambda _conn: wake.set())
        try:
            # LISTEN before the first read: anything committed after that read notifies.
            await conn.add_listener(self.channel, lambda _c, _pid, _ch, _payload: wake.set())
        except BaseException as exc:
            self._listeners.discard(conn)
            await close_quietly(conn)
            if isinstance(exc, UNAVAILABLE):
                raise self._outage_began(exc, "cannot LISTEN on PostgreSQL") from exc
            raise
        return conn

    def _outage_began(self, exc: BaseException, what: str) -> ServiceUnavailable:
        """Count the server as away (one log line per outage) and say what failed."""
        self._outage.failed(exc)
        return ServiceUnavailable(f"{what} at {self._where}: {exc}")

    # -- helpers -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _connection(self, *, may_retry: bool = False) -> AsyncIterator[Connection]:
        """A pooled connection; any failure to reach or use the storage becomes
        ServiceUnavailable (BrokenConnection for a broken one, which the writer retries)
        and counts towards an outage, unless `may_retry` and the caller will try a broken
        connection again (a pooled connection that died in a restart already over is no
        outage)."""
        if self._closed:
            raise TransportClosed("the transport is closed")
        if self._pool is None:
            raise ServiceUnavailable("the PostgreSQL transport has not been started")
        began = self._outage.now()
        try:
            async with pooled(self._pool) as conn:
                yield conn
        except UNAVAILABLE as exc:
            if self._closed:
                raise TransportClosed("the transport is closed") from exc
            broken = isinstance(exc, BROKEN)
            # A value the server refused is no outage (the caller's 503 is a separate
            # matter); a broken connection the caller retries is not one yet.
            if not ((broken and may_retry) or isinstance(exc, DataError | UniqueViolation)):
                self._outage.failed(exc)
            error = BrokenConnection if broken else ServiceUnavailable
            raise error(f"PostgreSQL at {self._where}: {exc}") from exc
        self._outage.ok(began)

