"""Capture by logical decoding: no trigger; the tailer writes the change log from the WAL.

In this mode (`--pg-capture logical`, or `auto` where the server allows it) watched tables
and managed collections have no trigger. They are members of one publication per feed
schema, with REPLICA IDENTITY FULL (the WAL then holds the whole old row of an UPDATE or
DELETE, which the trigger logged as `old_doc`), and one logical replication slot per
database and schema (`pgoutput`) keeps their changes in the WAL until the tailer has
copied them into the same change log the trigger fills (`capture.py`): same rows, same
ticks, same positions, tokens and retention. Only who writes the rows changes.

The tailer's step (`step`), under the tick lock, in one transaction:

1. S = `pg_current_snapshot()`, then L = `pg_current_wal_insert_lsn()`. Every transaction
   S sees committed wrote its commit record before it left the proc array, so before S
   was taken, so before L.
2. Take the slot's transactions that commit before L: from the tailer's replication
   stream (`stream.py`) once it has shown L, or with
   `pg_logical_slot_peek_binary_changes` once the WAL is flushed through L
   (`--pg-slot-read sql`, or where the server refuses a replication connection). Insert
   each change as a log row: the writer's transaction id (the WAL's 32 bits, widened to
   `xid8` with the epoch of a newer id), `seq` = the change's LSN * 1024 + its rank among
   changes sharing that LSN (statement order), the document built in SQL from the decoded
   column texts as the trigger would (`to_jsonb(row)`, or the managed document), the
   commit time as `wall_time`. Changes of transactions that commit before the position
   the last step that copied any recorded with its rows (`decoded_through`) are already
   there (decoded before a crash, the slot not yet moved): they are not inserted again.
3. Close the ticks API reads left pending (their `through` is NULL: a read's snapshot,
   recorded before this step's lock, so before S) and then this step's own tick at S, if
   its batch is not empty: `through` = the previous tick's + the rows of the batch, now
   all in the log because every transaction such a snapshot sees committed before L.
   Transactions that committed before L but after S are in the log too, and S does not
   see them: they are in the next tick's batch.
4. Commit; then move the slot to L: a status message on the stream right away, or
   `pg_replication_slot_advance` before the next step or before the tailer idles (not on
   the way from the commit to publishing). Only once the rows are committed, so a crash
   between the two decodes them again and step 2 skips them.

So the ordering argument of `capture.py` holds unchanged: batches are cut by snapshots,
and each batch is complete when its tick is recorded. (A streamed step that finds more
before L than the stream keeps, a backlog, copies the whole transactions it has and
skips 3: its rows wait in the log for a later step's tick, like rows a trigger wrote.)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

from tidings.errors import ServiceUnavailable
from tidings.feeds.postgres.capture_sql import Names
from tidings.feeds.postgres.pgoutput import Change, Relation, decode
from tidings.feeds.postgres.schema import managed_document
from tidings.feeds.postgres.stream import SlotBusy, SlotStream, StreamUnavailable
from tidings.feeds.sqltext import ident, literal
from tidings.pgdb import (
    Connection,
    DuplicateObject,
    ObjectInUse,
    PostgresError,
    QueryCanceled,
    close_quietly,
    connect,
)

__all__ = ["GAP_TOPIC", "LOGICAL", "Captured", "Decoder", "SlotLost", "Step", "flush_wal",
           "logical_possible", "lsn_text", "lsn_value", "publication_name", "slot_name"]

log = logging.getLogger(__name__)

LOGICAL = "logical decoding"
# The topic of the marker a lost slot leaves in the log (private: nobody subscribes).
GAP_TOPIC = "tidings:change-feed-gap"
_PREFIX = "tidings"
# A transactional logical message (`pg_logical_emit_message`): the stream brings it at
# its transaction's commit, which wakes a streamed tailer that otherwise steps only for
# the captured tables' transactions (an API read's pending tick needs a step).
STEP_PLEASE = f"pg_logical_emit_message(true, '{_PREFIX}', 'step')"
_FLUSH_WAIT_S = 1.0
_SLOT_CREATE_TIMEOUT_S = 60.0
_FLUSH_SHORT_S = 0.004  # then flush it ourselves (`Decoder.step`)
# Have the server log its running transactions when the slot's restart point is this far
# behind (`Decoder._restart`), at most this often.
_RESTART_LAG_BYTES = 256 * 1024
_RESTART_EVERY_S = 0.5
_SEQ_ORDERS = 1024  # changes sharing one LSN (a COPY's multi-insert) take ranks below it
# `Decoder.take_slot` ends the WAL senders reading the slot, and looks whether they are
# gone this many times, this far apart.
_TAKE_SLOT_TRIES = 40
_TAKE_SLOT_EVERY_S = 0.05
_END_SLOT_READERS = ("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                     "WHERE slot_name = $1 AND active_pid IN (SELECT pid FROM "
                     "pg_stat_replication)")


class SlotLost(Exception):
    """The slot is gone or PostgreSQL invalidated it (`max_slot_wal_keep_size`)."""


def _suffix(db: str, schema: str) -> str:
    return hashlib.blake2b(f"{db}\0{schema}".encode(), digest_size=10).hexdigest()


def slot_name(db: str, schema: str) -> str:
    """The schema's replication slot (a name of [a-z0-9_], under 64 bytes)."""
    return "tidings_" + _suffix(db, schema)


def publication_name(db: str, schema: str) -> str:
    return "tidings_" + _suffix(db, schema)


async def logical_possible(conn: Connection, slot: str) -> str | None:
    """None when this server and role can decode (with the slot `slot`), else why not."""
    level = await conn.fetchval("SHOW wal_level")
    if level != "logical":
        return f"wal_level is {level}, not logical"
    if not await conn.fetchval(
            "SELECT rolsuper OR rolreplication OR coalesce((SELECT pg_has_role(current_user, "
            "oid, 'MEMBER') FROM pg_roles WHERE rolname = 'rds_replication'), false) "
            "FROM pg_roles WHERE rolname = current_user"):  # (Amazon RDS's role)
        return "the role has neither REPLICATION nor SUPERUSER"
    if not await conn.fetchval(
            "SELECT current_setting('max_replication_slots')::int > "
            "(SELECT count(*) FROM pg_replication_slots) OR EXISTS (SELECT FROM "
            "pg_replication_slots WHERE slot_name = $1)", slot):
        return "no free replication slot (max_replication_slots)"
    return None


def _int(value: object) -> int:
    return int(str(value))


def lsn_value(text: object) -> int:
    high, low = str(text).split("/")
    return (int(high, 16) << 32) | int(low, 16)


def lsn_text(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def _record(columns: Sequence[str], row: dict[str, str | None] | None) -> str | None:
    """A composite literal of `row` in the table's current column order (columns the
    table no longer has are left out, new ones are NULL)."""
    if row is None:
        return None
    fields = []
    for column in columns:
        value = row.get(column)
        fields.append("" if value is None else
                      '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"')
    return "(" + ",".join(fields) + ")"


@dataclass(frozen=True, slots=True)
class Captured:
    """A table the slot captures, as its trigger's arguments said: name, key, kind."""

    name: str
    key: str
    kind: str


@dataclass(slots=True)
class Step:
    """What one step did."""

    mode: str  # the capture the log is in ("logical" or "trigger")
    decoded: int = 0
    lag_bytes: int | None = None
    lsn: int = 0  # L, when it ran
    lost: bool = False
    unflushed: bool = False  # the WAL was not flushed through L: nothing done
    streamed: int | None = None  # transactions taken from the stream (None: by SQL)
    partial: bool = False  # a backlog's first part: no tick (`SlotStream.full`)


@dataclass(slots=True)
class Decoder:
    """One schema's slot and publication, and the step that copies the WAL into the log."""

    schema: str
    slot: str
    publication: str
    names: Names  # the log's objects
    captured: str  # the registry of captured tables (name, key, kind)
    relations: dict[int, Relation] = field(default_factory=dict)
    # Where the tailer's own connections for reading the slot go (None: none of its
    # own), and how it reads the slot (`--pg-slot-read`): a replication connection
    # (`stream.py`; "auto": unless the server refuses one, then until the tailer's lead
    # ends) or SQL functions.
    dsn: str | None = None
    slot_read: str = "sql"
    stream: SlotStream | None = None
    _stream_refused: str | None = None
    # The SQL functions' connection (reading and moving the slot). Decoding in a
    # session invalidates its catalog caches and with them every plan it cached: on the
    # step's connection the log's insert, its PL/pgSQL functions and the reads were
    # parsed and planned again after every step (perf: about half the tailer's backend
    # CPU).
    reader: Connection | None = None
    _restarted: float = 0.0  # monotonic: when `_restart` last had a snapshot logged
    _unadvanced: int = 0  # the WAL position the slot may move to (`advance`)
    _advanced: int = 0  # where `advance` last moved it

    # -- setup ----------------------------------------------------------------------------

    async def ensure_slot(self, conn: Connection) -> bool:
        """Create the slot if missing (outside any transaction: creating one waits for
        every transaction running meanwhile). True when it had to."""
        if await conn.fetchval("SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
                               self.slot):
            return False
        # First the publication (empty until tables join it): pgoutput looks it up as of
        # each change it decodes, and fails on WAL from before it existed.
        with contextlib.suppress(DuplicateObject):  # another process made it meanwhile
            await conn.execute(f"CREATE PUBLICATION {ident(self.publication)}")
        try:
            # It waits for the transactions in progress to end: longer than a statement.
            await conn.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                               self.slot, timeout=_SLOT_CREATE_TIMEOUT_S)
        except DuplicateObject:
            return False
        except TimeoutError:
            open_since = await conn.fetch(
                "SELECT pid, xact_start FROM pg_stat_activity WHERE backend_xid IS NOT NULL "
                "AND pid <> pg_backend_pid() ORDER BY xact_start LIMIT 5")
            raise ServiceUnavailable(
                f"creating replication slot {self.slot} waited {_SLOT_CREATE_TIMEOUT_S:.0f} s "
                "for transactions in progress to end; still open: " + (", ".join(
                    f"pid {r[0]} since {r[1]:%Y-%m-%d %H:%M:%S}" for r in open_since)
                    or "none now (try again)")) from None
        log.info("change feed: created replication slot %s for schema %s", self.slot,
                 self.schema)
        return True

    async def drop_slot(self, conn: Connection) -> None:
        """Drop the slot (when it is not being read: retried a few times)."""
        for attempt in range(50):
            try:
                await conn.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                    "WHERE slot_name = $1", self.slot)
                return
            except ObjectInUse:
                if attempt == 49:
                    raise
                await self.take_slot(conn)
                await asyncio.sleep(0.1)

    async def publish(self, conn: Connection, table: str, captured: Captured) -> None:
        """In the caller's transaction: capture `table` (qualified, quoted) through the
        slot: a member of the publication, REPLICA IDENTITY FULL, registered."""
        await conn.execute(f"""CREATE TABLE IF NOT EXISTS {self.captured} (
            name text PRIMARY KEY, key text NOT NULL, kind text NOT NULL)""")
        await conn.execute(
            f"INSERT INTO {self.captured} (name, key, kind) VALUES ($1, $2, $3) "
            f"ON CONFLICT (name) DO UPDATE SET key = excluded.key, kind = excluded.kind "
            f"WHERE ({self.captured}.key, {self.captured}.kind) <> (excluded.key, "
            f"excluded.kind)", captured.name, captured.key, captured.kind)
        if not await conn.fetchval("SELECT 1 FROM pg_publication WHERE pubname = $1",
                                   self.publication):
            await conn.execute(f"CREATE PUBLICATION {ident(self.publication)}")
        if not await conn.fetchval(
                "SELECT 1 FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid "
                "WHERE p.pubname = $1 AND r.prrelid = $2::regclass", self.publication, table):
            await conn.execute(f"ALTER PUBLICATION {ident(self.publication)} ADD TABLE {table}")
        if await conn.fetchval("SELECT relreplident <> 'f' FROM pg_class WHERE oid = "
                               "$1::regclass", table):
            await conn.execute(f"ALTER TABLE {table} REPLICA IDENTITY FULL")

    async def unpublish(self, conn: Connection, table: str) -> None:
        """In the caller's transaction: stop capturing `table` through the slot."""
        if await conn.fetchval(
                "SELECT 1 FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid "
                "WHERE p.pubname = $1 AND r.prrelid = $2::regclass", self.publication, table):
            await conn.execute(
                f"ALTER PUBLICATION {ident(self.publication)} DROP TABLE {table}")

    async def drop_publication(self, conn: Connection) -> None:
        await conn.execute(f"DROP PUBLICATION IF EXISTS {ident(self.publication)}")

    async def mark_gap(self, conn: Connection, why: str) -> int:
        """In the caller's transaction, holding the tick lock: the slot lost changes
        (`why`). Close the pending ticks with what the log holds and record that every
        position up to now is before a gap: tokens up to it get resume_token_too_old."""
        await conn.execute(f"SELECT {self.names.schema}.tidings_close(NULL, NULL)")
        gap = _int(await conn.fetchval(f"SELECT coalesce(max(through), 0) FROM "
                                      f"{self.names.ticks}"))
        await conn.execute(f"UPDATE {self.names.state} SET value = $1 "
                           f"WHERE name = 'gap_through'", str(gap))
        # A marker after the gap, published on a topic of its own (`GAP_TOPIC`): so the
        # first position after it exists, and reads from now on get tokens past the gap.
        await conn.execute(
            f"INSERT INTO {self.names.table} (seq, txid, coll, op, doc_key, wall_time) "
            f"VALUES (0, pg_current_xact_id(), '', 'gap', '{{}}', clock_timestamp())")
        log.error("change feed: %s: changes committed since it was last read are lost; "
                  "resume tokens up to position %d now get resume_token_too_old", why, gap)
        return gap

    async def recover(self, conn: Connection, why: str) -> None:
        """A new slot for a lost one (outside any transaction), and the gap marked."""
        self._unadvanced = self._advanced = 0
        self.close_stream()
        await self.drop_slot(conn)
        await self.ensure_slot(conn)
        async with conn.transaction():
            await conn.execute(f"LOCK TABLE {self.names.tick_lock} IN EXCLUSIVE MODE")
            await self.mark_gap(conn, why)

    # -- the step ---------------------------------------------------------------------------

    async def slot_status(self, conn: Connection) -> tuple[str | None, int | None]:
        """(wal_status, bytes of WAL the slot holds behind the current position); (None,
        None) when there is no slot."""
        row = await conn.fetchrow(
            "SELECT wal_status, pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)"
            "::bigint FROM pg_replication_slots WHERE slot_name = $1", self.slot)
        if row is None:
            return None, None
        return (None if row[0] is None else str(row[0]),
                None if row[1] is None else _int(row[1]))

    async def step(self, conn: Connection, *, upto: int | None = None,
                   drain: bool = False) -> Step:
        """Copy what the slot holds into the log and close the ticks (module doc). Runs
        its own transaction, unless `drain` (then in the caller's, which holds the tick
        lock and switches the log to triggers: decode through `upto`, no tick of its
        own). Raises SlotLost when the slot is gone or invalidated."""
        if drain:
            await self.take_slot(conn)  # a stream may hold it (the tailer's)
            done = await self._step(conn, upto=upto, drain=True, wait_s=_FLUSH_WAIT_S)
            if done.unflushed:  # the switch must not go on without these changes
                raise ServiceUnavailable("the WAL was not flushed within "
                                         f"{_FLUSH_WAIT_S:.0f} s: try again")
            return done
        await self.advance(conn)
        done = await self._transaction(conn, upto, _FLUSH_SHORT_S)
        if done.unflushed:
            # The WAL is not flushed through L (WAL of a transaction still open, or of
            # an asynchronous commit: the WAL writer flushes it within 200 ms). A commit
            # of our own flushes everything before it: then step again.
            await flush_wal(conn)
            done = await self._transaction(conn, upto, _FLUSH_WAIT_S)
        if done.mode == "logical" and done.lsn:
            if done.streamed is None:
                self._unadvanced = done.lsn  # committed: the slot may move there
            elif self.stream is not None:
                # Committed: forget them, and let the slot move there (a message to the
                # WAL sender, no round trip: it needs no `advance`).
                self.stream.consume(done.streamed)
                self.stream.confirm(done.lsn)
        return done

    async def take_slot(self, conn: Connection) -> None:
        """End the streams that read the slot (this process's, a stalled or former
        tailer's, or during a switch of capture the tailer's) and wait until the slot is
        free of them: neither the SQL functions nor a new stream can read it before."""
        self.close_stream()
        for _ in range(_TAKE_SLOT_TRIES):
            if not await conn.fetchval(_END_SLOT_READERS, self.slot):
                return
            await asyncio.sleep(_TAKE_SLOT_EVERY_S)

    def close_stream(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None

    async def close_readers(self) -> None:
        """When the tailer's lead ends: its connections for reading the slot."""
        self.close_stream()
        self._stream_refused = None  # the next lead tries to stream again
        reader, self.reader = self.reader, None
        if reader is not None:
            await close_quietly(reader)

    async def _streaming(self, conn: Connection) -> SlotStream | None:
        """The stream to read the slot from, opened if need be; None: read it with the
        SQL functions (`--pg-slot-read sql`, or the server refused to stream)."""
        if self.stream is not None and not self.stream.closed:
            return self.stream
        self.stream = None
        if self.dsn is None or self.slot_read == "sql" or self._stream_refused is not None:
            return None
        for attempt in range(2):
            try:
                self.stream = await SlotStream.open(
                    self.dsn, self.slot, self.publication,
                    application_name=f"tidings-feed-stream:{self.schema}")
            except SlotBusy as exc:
                if attempt:
                    raise ServiceUnavailable(f"cannot stream replication slot {self.slot}: "
                                             f"{exc}") from None
                await self.take_slot(conn)  # we tail: whoever reads it is stale
                continue
            except StreamUnavailable as exc:
                if self.slot_read == "stream":
                    raise ServiceUnavailable(f"--pg-slot-read stream: {exc}") from None
                self._stream_refused = str(exc)
                log.warning("change feed: no replication connection (%s): reading slot %s "
                            "with SQL functions, which costs more (docs/feeds.md, "
                            "\"Streaming\")", exc, self.slot)
                return None
            log.info("change feed: streaming replication slot %s", self.slot)
            return self.stream
        return None

    async def _transaction(self, conn: Connection, upto: int | None,
                           wait_s: float) -> Step:
        """One step in a transaction of its own (BEGIN with the lock, and the ticks closed
        with the COMMIT: fewer round trips)."""
        await conn.execute(f"BEGIN; LOCK TABLE {self.names.tick_lock} IN EXCLUSIVE MODE")
        try:
            done = await self._step(conn, upto=upto, drain=False, wait_s=wait_s)
            if conn.is_in_transaction():
                await conn.execute("COMMIT")
        except asyncio.CancelledError:
            conn.terminate()  # the tailer is stopping: its session ends anyway
            raise
        except BaseException:
            if not conn.is_closed() and conn.is_in_transaction():
                await conn.execute("ROLLBACK")
            raise
        return done

    async def advance(self, conn: Connection) -> None:
        """Move the slot to where the last step's rows are committed (if it has not yet),
        and keep the decoding's start near it (`_restart`). The tailer calls this before
        each step and before it idles, not between a step and publishing its changes."""
        lsn, self._unadvanced = self._unadvanced, 0
        if lsn <= self._advanced:  # (a step that found the WAL where it was)
            return
        conn = await self._sql_reader(conn)
        await self._restart(conn)
        # The function alone, not through the pg_replication_slots view: after decoding
        # the session's caches are cold, and planning the view's query refilled them
        # (`lsn` is a step's L, never behind the slot: the step read from there).
        await conn.execute("SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)",
                           self.slot, lsn_text(lsn))
        self._advanced = lsn

    async def _restart(self, conn: Connection) -> None:
        """Every call that reads the slot decodes the WAL from the slot's `restart_lsn`,
        which moves only to where the server logged its running transactions (every 15 s,
        by the background writer): so each call would re-read up to 15 s of WAL, about a
        millisecond per MB. When the slot restarts more than _RESTART_LAG_BYTES back (at
        most once every _RESTART_EVERY_S), have the server log them now: creating a
        temporary logical slot does so first thing (and then waits for the running
        transactions to end; cut short by a statement timeout, or dropped at once)."""
        now = time.monotonic()
        if now - self._restarted < _RESTART_EVERY_S:
            return
        lag = await conn.fetchval(
            "SELECT pg_wal_lsn_diff(confirmed_flush_lsn, restart_lsn)::bigint "
            "FROM pg_replication_slots WHERE slot_name = $1", self.slot)
        if lag is None or _int(lag) < _RESTART_LAG_BYTES:
            return
        self._restarted = now
        marker = f"{self.slot}_r{os.getpid()}"
        try:
            async with conn.transaction():
                await conn.execute("SET LOCAL statement_timeout = '50ms'")
                await conn.execute(
                    "SELECT pg_create_logical_replication_slot($1, 'pgoutput', true)", marker)
        except QueryCanceled:
            pass  # logged them, then waited for a running transaction: enough
        except PostgresError as exc:  # e.g. no free slot: decoding only costs more
            log.debug("change feed: could not have running transactions logged: %s", exc)
        await conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM "
                           "pg_replication_slots WHERE slot_name = $1", marker)

    async def _step(self, conn: Connection, *, upto: int | None, drain: bool,
                    wait_s: float) -> Step:
        # One statement: its snapshot S is taken first, L (the insert position) after.
        row = await conn.fetchrow(
            f"SELECT (SELECT value FROM {self.names.state} WHERE name = 'capture'), "
            f"(SELECT value FROM {self.names.state} WHERE name = 'logical_from'), "
            f"(SELECT value FROM {self.names.state} WHERE name = 'decoded_through'), "
            f"s.slot_name IS NOT NULL, s.wal_status, pg_wal_lsn_diff(pg_current_wal_lsn(), "
            f"s.confirmed_flush_lsn)::bigint, pg_current_snapshot()::text, "
            f"pg_current_wal_insert_lsn()::text, pg_current_wal_flush_lsn()::text "
            f"FROM (SELECT) x LEFT JOIN pg_replication_slots s ON s.slot_name = $1", self.slot)
        assert row is not None
        mode = "logical" if row[0] == "logical" else "trigger"
        if mode != "logical" and not drain:
            self.close_stream()
            return Step(mode)
        if not row[3] or row[4] == "lost":
            raise SlotLost(f"replication slot {self.slot} is "
                           f"{'gone' if not row[3] else 'lost'}")
        lag = None if row[5] is None else _int(row[5])
        snapshot = str(row[6])
        lsn = lsn_value(row[7]) if upto is None else upto
        stream = None if drain else await self._streaming(conn)
        streamed: int | None = None
        partial = False
        if stream is not None:
            try:
                reached = await stream.reach(lsn, wait_s)
            except StreamUnavailable as exc:
                self.close_stream()
                raise ServiceUnavailable(str(exc)) from None
            if reached:
                messages, streamed = stream.before(lsn)
            elif stream.full:
                # More before L than the stream keeps (a backlog): copy its whole
                # transactions and tick nothing (the ticks need everything before L); the
                # next step goes on after them.
                messages, streamed, lsn = stream.complete()
                partial = True
            else:  # not flushed through L (as below), or the server is slow
                return Step(mode, lag_bytes=lag, unflushed=True)
        else:
            if lsn_value(row[8]) < lsn and not await self._flushed(conn, lsn, wait_s):
                return Step(mode, lag_bytes=lag, unflushed=True)  # nothing done: again
            # (The switch to triggers drains on its own connection: the tailer's reader
            # may be busy moving the slot.)
            messages = await self._peek(conn if drain else await self._sql_reader(conn), lsn)
        decoded = decode(messages, self.relations, prefix=_PREFIX)
        self.relations = decoded.relations
        # Transactions that committed before the switch to logical decoding were logged by
        # the trigger, those before `decoded_through` by an earlier step.
        start = max(lsn_value(row[1] or "0/0"), lsn_value(row[2] or "0/0"))
        changes = [c for c in decoded.changes if c.commit_lsn >= start]
        copied = ""
        if changes:
            # (A log from before `decoded_through`: the first step looks for each row.)
            await self._insert(conn, changes, look=row[2] is None)
            copied = (f"INSERT INTO {self.names.state} (name, value) VALUES "
                      f"('decoded_through', {literal(lsn_text(lsn))}) ON CONFLICT (name) "
                      f"DO UPDATE SET value = excluded.value; ")
        # Texts PostgreSQL made (digits, colons, commas; hex and a slash): as literals, so
        # that the step's own transaction commits in the same round trip.
        own = "NULL" if drain else f"{literal(snapshot)}::pg_snapshot"
        if partial:
            await conn.execute(f"{copied}COMMIT")
        else:
            await conn.execute(f"{copied}SELECT {self.names.schema}.tidings_close({own}, "
                               f"{literal(lsn_text(lsn))}::pg_lsn)"
                               + ("" if drain else "; COMMIT"))
        return Step(mode, len(changes), lag, lsn, streamed=streamed, partial=partial)

    async def _sql_reader(self, conn: Connection) -> Connection:
        """The connection for the SQL functions: the tailer's own (opened if need be), else
        `conn`."""
        if self.dsn is None:
            return conn
        if self.reader is None:
            # A new tailer: a stream a former one left (`--pg-slot-read stream`, stalled)
            # would hold the slot until the server's wal_sender_timeout.
            await self.take_slot(conn)
            self.reader = await connect(self.dsn, command_timeout=None,
                                        application_name=f"tidings-feed-decoder:{self.schema}")
        return self.reader

    async def _peek(self, reader: Connection, lsn: int) -> list[tuple[int, bytes]]:
        """What the slot holds of the transactions that commit before `lsn`."""
        messages = await reader.fetch(
            "SELECT (lsn - '0/0'::pg_lsn)::bigint, data FROM "
            "pg_logical_slot_peek_binary_changes($1, $2::text::pg_lsn, NULL, "
            "'proto_version', '1', 'publication_names', $3, 'messages', 'true')",
            self.slot, lsn_text(lsn), self.publication)
        return [(_int(m[0]), cast(bytes, m[1])) for m in messages]

    async def _flushed(self, conn: Connection, lsn: int, wait_s: float) -> bool:
        """Whether the WAL is flushed through `lsn` (decoding reads no further), waiting a
        little: a writer with synchronous_commit = off, or one whose transaction is still
        open, may have left WAL unflushed (the WAL writer flushes it within 200 ms)."""
        for _ in range(max(1, int(wait_s / 0.002))):
            if await conn.fetchval("SELECT pg_current_wal_flush_lsn() >= $1::text::pg_lsn",
                                   lsn_text(lsn)):
                return True
            await asyncio.sleep(0.002)
        return False

    async def _insert(self, conn: Connection, changes: list[Change], *, look: bool) -> None:
        """Insert the log rows of `changes`: one statement per table (`look`: but not
        those already there)."""
        captured = {
            str(r[0]): (Captured(str(r[0]), str(r[1]), str(r[2])),
                        [str(c) for c in cast("list[str]", r[3])])
            for r in await conn.fetch(
                f"SELECT c.name, c.key, c.kind, array(SELECT a.attname::text "
                f"FROM pg_attribute a WHERE a.attrelid = to_regclass("
                f"quote_ident($1) || '.' || quote_ident(c.name)) AND a.attnum > 0 "
                f"AND NOT a.attisdropped ORDER BY a.attnum) FROM {self.captured} c",
                self.schema)}
        by_table: dict[str, list[Change]] = {}
        for change in changes:
            if change.relation.schema == self.schema:
                by_table.setdefault(change.relation.name, []).append(change)
        for name, rows in by_table.items():
            if name in captured:  # else no longer captured (`tidings watch --stop`)
                await self._insert_table(conn, *captured[name], rows, look)

    async def _insert_table(self, conn: Connection, what: Captured, columns: list[str],
                            rows: list[Change], look: bool) -> None:
        table = f"{ident(self.schema)}.{ident(what.name)}"
        key = literal(what.key)
        if columns:
            def document(value: str) -> str:
                row = f"({value}::text::{table})"
                return managed_document(row) if what.kind == "managed" else f"to_jsonb({row})"
            old, new = document("u.old"), document("u.new")
            olds = [_record(columns, c.old) for c in rows]
            news = [_record(columns, c.new) for c in rows]
        else:  # the table is gone (a dropped collection's last changes): column texts
            old, new = "u.old::jsonb", "u.new::jsonb"
            olds = [None if c.old is None else _json(c.old) for c in rows]
            news = [None if c.new is None else _json(c.new) for c in rows]
        # The WAL's 32-bit ids, widened with this statement's snapshot: every decoded
        # transaction has ended, so its id is below its xmax (S's may be lower: a
        # transaction that began after S and committed before L).
        newer = "pg_snapshot_xmax(pg_current_snapshot())::text::bigint"
        await conn.execute(
            f"INSERT INTO {self.names.table} (seq, txid, coll, op, doc_key, old_doc, "
            f"new_doc, wall_time) SELECT u.seq, x.txid, $1, u.op, CASE WHEN u.op = "
            f"'truncate' THEN '{{}}'::jsonb ELSE jsonb_build_object({key}, "
            f"coalesce(d.n, d.o) -> {key}) END, d.o, d.n, u.at "
            f"FROM unnest($2::bigint[], $3::bigint[], $4::text[], $5::text[], $6::text[], "
            f"$7::timestamptz[]) AS u(seq, xid, op, old, new, at) "
            f"CROSS JOIN (SELECT {newer} AS newer) r "
            f"CROSS JOIN LATERAL (SELECT (((r.newer >> 32) - (u.xid > (r.newer & 4294967295))"
            f"::int) << 32 | u.xid)::text::xid8 AS txid) x "
            f"CROSS JOIN LATERAL (SELECT CASE WHEN u.old IS NOT NULL THEN {old} END AS o, "
            f"CASE WHEN u.new IS NOT NULL THEN {new} END AS n) d " + (
                f"WHERE NOT EXISTS (SELECT FROM {self.names.table} c WHERE c.txid = x.txid "
                f"AND c.seq = u.seq) " if look else "") + "ORDER BY u.seq",
            what.name,
            [c.lsn * _SEQ_ORDERS + c.order for c in rows],
            [c.xid for c in rows],
            [c.op for c in rows], olds, news, [c.commit_time for c in rows])


def _json(row: dict[str, str | None]) -> str:
    return json.dumps(row)


async def flush_wal(conn: Connection) -> None:
    """Have the WAL flushed through everything written so far: a synchronous commit that
    wrote WAL of its own waits for its flush (a transactional logical message, which
    decoding ignores). A commit that wrote none does not wait, even with an id assigned:
    its flush is left to the WAL writer, up to `wal_writer_delay` (200 ms) later."""
    await conn.execute("BEGIN; SET LOCAL synchronous_commit = on; "
                       f"SELECT pg_logical_emit_message(true, '{_PREFIX}', 'flush'); COMMIT")
