"""The PostgreSQL feed's capture: a trigger-fed change log, ordered by snapshots, no lock.

(Or fed by logical decoding, with no trigger: `decoding.py` writes the same rows from a
replication slot, before it ticks; the state row `capture` says which way a schema is
written, and `capture`, `settled`, `ticked`, `mark` and `place` below follow it.)

Everything about the change log is here and in `capture_sql.py` (its SQL) and nowhere
else: its tables, the trigger, the ticks that cut it into batches, the tailer's read and
cursor, the positions the API's reads and writes take from it, retention. Another way of
capturing changes replaces these two modules.

`--db postgresql://[user@]host[:port]/db[?search_path=SCHEMA]`: the feed lives in the
connection's current schema (the first existing one of its `search_path`), which holds
the change log (`tidings_changes` and its sequence), the ticks (`tidings_ticks`), the
feed's state, the watched-table registry, the functions and the managed collections'
tables. Watched tables are tables of that schema.

Capture. Every watched table (a managed collection, or a table of the user's own schema)
gets two triggers on one function, `tidings_capture`: AFTER INSERT / UPDATE / DELETE FOR
EACH ROW, and AFTER TRUNCATE FOR EACH STATEMENT. Each appends a row to the log in the
writer's own transaction: the writer's transaction id (`pg_current_xact_id()`), a `seq`
from a sequence (statement order), the document key, the row before and after as JSON
(`to_jsonb(OLD)` / `to_jsonb(NEW)`; for managed collections the stored document plus its
metadata; nothing for a TRUNCATE) and `clock_timestamp()`. A change by any writer (psql,
the user's application, a migration) is captured exactly as one made through the API, and
only if it commits. The function is SECURITY DEFINER, so writers need no privileges on the
log. Writers take no lock that another writer waits for, and NOTIFY only a sleeping tailer.

Order, without a lock (PgQ's idea). `seq` is not commit order (A takes 5, B takes 6 and
commits first), so nobody reads the log by `seq`. Instead Tidings *ticks*: under one lock
that only Tidings takes (`tidings_tick_lock`, never a writer), it records a snapshot
(`pg_current_snapshot()`) in `tidings_ticks`. Batch k is every log row whose transaction
tick k's snapshot sees committed and tick k-1's did not; inside a batch, rows go by
(txid, seq). Positions are dense: tick k also records `through`, the number of changes in
batches up to k, counted in the same statement as the snapshot it records, so change i
(from 1) of batch k is `through(k-1) + i`, the resume token is still `EPOCH.POSITION` and
a batch is numbered the same way however often it is read. Since tick k+1's snapshot is
taken after tick k committed, it sees everything tick k saw; so:

* Every committed change is in exactly one batch (the first tick whose snapshot sees its
  transaction committed), and a rolled-back transaction or savepoint is in none (MVCC).
* A transaction's changes are contiguous and in statement order: one transaction, one
  batch, and (txid, seq) order keeps them together in `seq` order.
* If T1's COMMIT returned before T2 began, T1 comes first: every snapshot that sees T2
  committed sees T1 committed (an earlier or the same batch), and in the same batch T1's
  txid is lower (T2 got its id after T1 had ended).
* Writers commit in any order and at full speed; a transaction that stays open only
  holds back itself (its batch is the one after its commit).

Finding a batch's rows does not test every row: the transactions tick k-1 saw running
that tick k sees ended (a list), and the ids tick k-1 had not yet given out, up to tick
k's (a range), both on the log's one index (txid, seq). Batch 0 of a log the previous
version began (upgrade) holds its rows without txid, positioned by their `seq`.

Positions for the API. A read (get, list) runs in one REPEATABLE READ transaction whose
snapshot is a tick: if nothing was committed since the newest tick, that tick's `through`
(no lock, nothing written); else it takes the tick lock before its snapshot (LOCK TABLE,
which takes no snapshot) and ticks with that very snapshot. So "snapshot, then the changes
after its token" has no gap and no double. A write through the API notes its transaction
id and seq before COMMIT, and after it asks `tidings_place`, which finds the first tick
that sees it (ticking if none does yet) and counts its rank in that batch. Between the
two it holds a shared advisory lock, so retention cannot remove its batch meanwhile.

Waking the tailer. The tailer polls (`tidings_read`, which ticks when nothing is stored
past its cursor) every few ms while changes come. After a quiet spell it tries to go to
sleep: it takes the idle key, an advisory lock that the trigger tries to take *shared* in
every writer's transaction until it commits. If a writer holds it, the tailer keeps
polling (that writer may commit any moment). Once the tailer holds it, every writer that
wrote before has ended (its change is in the tailer's next read) and every later writer
fails to take it shared and NOTIFYs at its commit. So a sleeping tailer misses nothing and
costs nothing, and the NOTIFY (which serializes commits server-wide) is paid only by
writers that find it asleep, not under load.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from tidings.errors import ServiceUnavailable
from tidings.feeds.base import Retention
from tidings.feeds.postgres.capture_sql import Names, functions, tables
from tidings.feeds.postgres.decoding import (
    STEP_PLEASE,
    Captured,
    Decoder,
    publication_name,
    slot_name,
)
from tidings.feeds.postgres.schema import Shape
from tidings.feeds.sqltext import ident, literal
from tidings.pgdb import UNAVAILABLE, Connection, Record, advisory_key

__all__ = ["CAPTURE", "Bounds", "ChangeLog", "Mark"]

log = logging.getLogger(__name__)

# How this backend captures changes, as `tidings watch` and /metrics say it.
CAPTURE = "snapshot-ordered log"

# With logical decoding, how long a read or write through the API waits for the tailer to
# close its tick, and how often it looks.
_CLOSE_WAIT_S = 10.0
_CLOSE_POLL_S = 0.001
# A logical write's `seq` for `tidings_place`: its one change, whatever LSN it has.
_LAST_SEQ = (1 << 63) - 1

# The capture triggers, and the previous version's statement trigger (dropped on sight).
_TRIGGERS = ("tidings_capture", "tidings_truncate", "tidings_lock")


def _key(purpose: str, schema: str) -> int:
    return advisory_key(f"tidings-feed:{purpose}:{schema}")


def _channel(schema: str) -> str:
    name = f"tidings_changes.{schema}"
    if len(name.encode()) > 63:  # channel names are identifiers: 63 bytes at most
        name = "tidings_changes." + hashlib.blake2b(schema.encode(), digest_size=8).hexdigest()
    return name


def _int(value: object) -> int:
    return int(cast(int, value))


def _one(row: Record | None) -> Record:
    """The row of a SELECT without FROM (which always has one)."""
    if row is None:
        raise RuntimeError("a SELECT without FROM returned no row")
    return row


@dataclass(frozen=True, slots=True)
class Mark:
    """A write through the API, noted in its transaction: what `ChangeLog.place` needs."""

    txid: int
    seq: int
    after_tick: int  # the newest tick it saw: no tick up to this one sees it
    logical: bool = False  # no log row yet: logical decoding writes it


@dataclass(frozen=True, slots=True)
class Bounds:
    """What a resume token is checked against (`PostgresFeed.resolve`)."""

    high: int  # the newest position a tick placed
    pruned: int  # the last position retention removed
    at_or_before: int | None  # the newest change at or before the token
    first: int | None  # the first change the log holds
    gap: int  # logical decoding lost the changes after this position (a lost slot)


@dataclass(frozen=True, slots=True)
class ChangeLog:
    """One schema's change log: its objects, keys and channel, and the SQL that uses them."""

    schema: str
    table: str  # the log
    sequence: str  # statement order; never reused
    ticks: str
    tick_lock: str  # locked to tick, never written
    state: str  # epoch, the tailer's cursor, pruned_through
    watched: str  # the registry of tables `tidings watch` added
    # Held (session level) by the one tailer of this schema.
    tailer_key: int
    # Serializes setups (server starts, `tidings watch`): concurrent CREATE OR REPLACE of
    # one function fails.
    setup_key: int
    # Held by a sleeping tailer; writers take it shared (module doc, "Waking").
    idle_key: int
    # Held shared by an API write from before its COMMIT until it knows its position;
    # retention takes it exclusively.
    place_key: int
    channel: str  # what writers NOTIFY when the tailer sleeps
    captured: str  # logical decoding: the tables the slot captures (name, key, kind)

    @classmethod
    def of(cls, schema: str) -> ChangeLog:
        qualified = ident(schema) + "."
        return cls(
            schema=schema,
            table=qualified + "tidings_changes",
            sequence=qualified + "tidings_changes_seq",
            ticks=qualified + "tidings_ticks",
            tick_lock=qualified + "tidings_tick_lock",
            state=qualified + "tidings_feed_state",
            watched=qualified + "tidings_watched",
            tailer_key=_key("tailer", schema),
            setup_key=_key("setup", schema),
            idle_key=_key("idle", schema),
            place_key=_key("place", schema),
            channel=_channel(schema),
            captured=qualified + "tidings_captured",
        )

    def decoder(self, db: str) -> Decoder:
        """The schema's replication slot and publication (`decoding.py`)."""
        return Decoder(self.schema, slot_name(db, self.schema),
                       publication_name(db, self.schema), self._names, self.captured)

    async def mode(self, conn: Connection) -> str:
        """How the log is written now: `trigger` or `logical` (the state row)."""
        value = await conn.fetchval(f"SELECT value FROM {self.state} WHERE name = 'capture'")
        return "logical" if value == "logical" else "trigger"

    async def stored_mode(self, conn: Connection) -> str:
        """`mode`, also before the log exists (a schema never captured: `trigger`)."""
        if await conn.fetchval("SELECT to_regclass($1)", self.state) is None:
            return "trigger"
        return await self.mode(conn)

    @property
    def _names(self) -> Names:
        return Names(ident(self.schema), self.table, self.sequence, self.ticks,
                     self.tick_lock, self.state, self.idle_key, self.place_key, self.channel)

    def _fn(self, name: str) -> str:
        return f"{ident(self.schema)}.{name}"

    # -- setup --------------------------------------------------------------------------

    def ddl(self) -> list[str]:
        return [
            *tables(self._names),
            f"""CREATE TABLE IF NOT EXISTS {self.state} (
                name  text PRIMARY KEY,
                value text NOT NULL
            )""",
            f"""CREATE TABLE IF NOT EXISTS {self.watched} (
                name text PRIMARY KEY,
                key  text NOT NULL,
                read text NOT NULL
            )""",
            *functions(self._names),
        ]

    async def ensure(self, conn: Connection) -> str:
        """Create the change log, ticks, state, registry and functions (replacing the
        functions of an older version); returns the log's epoch. Runs inside the caller's
        transaction, under the setup lock; `upgrade` first, outside it."""
        await conn.execute(f"SELECT pg_advisory_xact_lock({self.setup_key})")
        for statement in self.ddl():
            await conn.execute(statement)
        if not await conn.fetchval(
                "SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass($1) "
                "AND attname = 'lsn' AND NOT attisdropped", self.ticks):
            # A log from before logical decoding: ticks may be pending (through NULL).
            await conn.execute(f"ALTER TABLE {self.ticks} ADD COLUMN lsn pg_lsn, "
                               f"ALTER COLUMN through DROP NOT NULL")
        await conn.execute(
            f"INSERT INTO {self.state} (name, value) VALUES ('epoch', $1), ('cursor', '0'), "
            f"('pruned_through', '0'), ('capture', 'trigger'), ('gap_through', '0') "
            f"ON CONFLICT (name) DO NOTHING", secrets.token_hex(4))
        # Tick 0 of a new log: no change before it (the log is new in this transaction).
        await conn.execute(
            f"INSERT INTO {self.ticks} (tick, snapshot, through, at) "
            f"SELECT 0, pg_current_snapshot(), 0, clock_timestamp() "
            f"WHERE NOT EXISTS (SELECT FROM {self.ticks})")
        epoch = await conn.fetchval(f"SELECT value FROM {self.state} WHERE name = 'epoch'")
        return str(epoch)

    async def upgrade(self, conn: Connection) -> bool:
        """Bring a log the previous version made (seq order = commit order under an order
        lock) to this one, keeping every position and token: its rows become batch 0,
        positioned by their seq. Two transactions of its own; call it before `ensure`.
        False when there is nothing to upgrade."""
        if not await self._needs_upgrade(conn):
            return False
        async with conn.transaction():
            await conn.execute(f"SELECT pg_advisory_xact_lock({self.setup_key})")
            if not await self._needs_upgrade(conn):
                return False  # another process did it meanwhile
            # Waits for every writer that logged a change the old way; no writer logs
            # another until this commits, and then with the new function. A writer held
            # up here by its old trigger still gets its txid from the column's default.
            await conn.execute(f"LOCK TABLE {self.table} IN ACCESS EXCLUSIVE MODE")
            await conn.execute(f"ALTER TABLE {self.table} ADD COLUMN txid xid8")
            await conn.execute(
                f"ALTER TABLE {self.table} ALTER COLUMN txid SET DEFAULT pg_current_xact_id()")
            await conn.execute(
                f"ALTER TABLE {self.table} DROP CONSTRAINT IF EXISTS tidings_changes_pkey")
            for statement in self.ddl():
                await conn.execute(statement)
            # The old statement trigger's function, harmless until it is dropped below.
            await conn.execute(
                f"CREATE OR REPLACE FUNCTION {self._fn('tidings_lock')}() RETURNS trigger "
                f"LANGUAGE plpgsql AS $$BEGIN RETURN NULL; END$$")
            await conn.execute(
                f"INSERT INTO {self.ticks} (tick, snapshot, through, at) "
                f"SELECT 0, pg_current_snapshot(), greatest("
                f"(SELECT max(seq) FROM {self.table}), "
                f"(SELECT value::bigint FROM {self.state} WHERE name = 'pruned_through'), 0), "
                f"clock_timestamp()")
        try:
            async with conn.transaction():
                # Each table it is on waits for its writers: bounded, retried next start.
                await conn.execute("SET LOCAL lock_timeout = '5s'")
                await conn.execute(
                    f"DROP FUNCTION IF EXISTS {self._fn('tidings_lock')}() CASCADE")
        except UNAVAILABLE as exc:  # a no-op meanwhile; `capture` drops its triggers
            log.warning("change feed: the previous version's tidings_lock() stays for now "
                        "(a no-op): %s", exc)
        return True

    async def _needs_upgrade(self, conn: Connection) -> bool:
        return bool(await conn.fetchval(
            "SELECT to_regclass($1) IS NOT NULL AND NOT EXISTS (SELECT FROM pg_attribute "
            "WHERE attrelid = to_regclass($1) AND attname = 'txid' AND NOT attisdropped)",
            self.table))

    # -- a collection's triggers ----------------------------------------------------------

    @staticmethod
    def _trigger_args(shape: Shape) -> tuple[str, str, str]:
        return shape.config.name, shape.config.key, shape.config.kind

    def triggers(self, shape: Shape) -> list[str]:
        args = ", ".join(literal(a) for a in self._trigger_args(shape))
        function = self._fn(f"tidings_capture({args})")
        return [
            *self.drop_triggers(shape.table),
            f"CREATE TRIGGER tidings_capture AFTER INSERT OR UPDATE OR DELETE ON {shape.table} "
            f"FOR EACH ROW EXECUTE FUNCTION {function}",
            f"CREATE TRIGGER tidings_truncate AFTER TRUNCATE ON {shape.table} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {function}",
        ]

    async def release(self, conn: Connection, table: str) -> None:
        """Stop capturing `table` (qualified, quoted): its triggers, its publication."""
        for statement in self.drop_triggers(table):
            await conn.execute(statement)
        if await conn.fetchval("SELECT to_regclass($1)", self.captured) is not None:
            db = str(await conn.fetchval("SELECT current_database()"))
            await self.decoder(db).unpublish(conn, table)
            await conn.execute(f"DELETE FROM {self.captured} WHERE name = "
                               f"(SELECT relname::text FROM pg_class WHERE oid = $1::regclass)",
                               table)

    @staticmethod
    def drop_triggers(table: str) -> list[str]:
        """`table` is qualified and quoted."""
        return [f"DROP TRIGGER IF EXISTS {trigger} ON {table}" for trigger in _TRIGGERS]

    async def capture(self, conn: Connection, shape: Shape) -> None:
        """Capture the table of `shape` the way the log is written now (`mode`): with
        logical decoding, a member of the slot's publication and no trigger; else the
        triggers, unless they are there already. Creating or dropping a trigger waits for
        every open transaction that wrote to the table and holds up new writers
        meanwhile: a restart should not do that to a busy table."""
        if await self.mode(conn) == "logical":
            db = str(await conn.fetchval("SELECT current_database()"))
            name, key, kind = self._trigger_args(shape)
            await self.decoder(db).publish(conn, shape.table, Captured(name, key, kind))
            if await conn.fetchval("SELECT 1 FROM pg_trigger WHERE tgrelid = $1::regclass "
                                   "AND tgname = ANY($2::text[])", shape.table,
                                   list(_TRIGGERS)):
                for statement in self.drop_triggers(shape.table):
                    await conn.execute(statement)
            return
        if not await self._has_triggers(conn, shape):
            for statement in self.triggers(shape):
                await conn.execute(statement)

    async def _has_triggers(self, conn: Connection, shape: Shape) -> bool:
        """Whether the table has exactly the triggers `triggers` would create, enabled."""
        rows = await conn.fetch(
            "SELECT tgname::text, tgargs, tgfoid = $2::regproc AND tgenabled <> 'D' "
            "FROM pg_trigger WHERE tgrelid = $1::regclass AND tgname = ANY($3::text[])",
            shape.table, self._fn("tidings_capture"), list(_TRIGGERS))
        found = {str(name): (bytes(cast(bytes, args)), bool(ours)) for name, args, ours in rows}
        wanted = (b"".join(arg.encode() + b"\0" for arg in self._trigger_args(shape)), True)
        return found == {"tidings_capture": wanted, "tidings_truncate": wanted}

    # -- positions, for the API's reads and writes ------------------------------------------

    async def settled(self, conn: Connection) -> int | None:
        """In a REPEATABLE READ transaction, as its first statement: the position its
        snapshot is at, if nothing it sees was committed after the newest tick it sees
        (that tick's `through`); else None, and the caller ticks (`ticked`) instead.
        Always None with logical decoding (what was committed is known only once
        decoded)."""
        value = await conn.fetchval(
            f"SELECT CASE WHEN (SELECT value FROM {self.state} WHERE name = 'capture') "
            f"IS DISTINCT FROM 'logical' THEN {self._fn('tidings_tick')}(false) END")
        return None if value is None else _int(value)

    async def ticked(self, conn: Connection) -> tuple[int, bool]:
        """In a REPEATABLE READ transaction, first thing: a tick whose snapshot is this
        transaction's. Returns (its position, False); with logical decoding (its number,
        True): the tick is pending until the tailer has decoded what its snapshot sees,
        and its position is known (`closed`) once this transaction has committed. Holds
        the tick lock until the transaction ends (it must: the next tick's snapshot has
        to be taken after this one commits)."""
        await conn.execute(f"LOCK TABLE {self.tick_lock} IN EXCLUSIVE MODE")
        if await self.mode(conn) == "logical":
            return _int(await conn.fetchval(self._pending_sql())), True
        return _int(await conn.fetchval(f"SELECT {self._fn('tidings_tick')}()")), False

    def _pending_sql(self) -> str:
        """A pending tick at the current snapshot (under the tick lock); its number. With
        a message on the slot's stream (`STEP_PLEASE`): a streamed tailer in another
        process steps for it, as for a captured table's change."""
        return (f"WITH t AS (INSERT INTO {self.ticks} (tick, snapshot, through, at, lsn) "
                f"SELECT max(tick) + 1, pg_current_snapshot(), NULL, clock_timestamp(), "
                f"pg_current_wal_insert_lsn() FROM {self.ticks} RETURNING tick) "
                f"SELECT t.tick FROM t CROSS JOIN {STEP_PLEASE}")

    async def closed(self, conn: Connection, tick: int, wake: Callable[[], None]) -> int:
        """The position of a pending tick once the tailer has closed it (waiting at most
        _CLOSE_WAIT_S; `wake` wakes this process's tailer, if it is the one)."""
        for _ in range(int(_CLOSE_WAIT_S / _CLOSE_POLL_S)):
            value = await conn.fetchval(f"SELECT through FROM {self.ticks} WHERE tick = $1",
                                        tick)
            if value is not None:
                return _int(value)
            wake()
            await asyncio.sleep(_CLOSE_POLL_S)
        raise ServiceUnavailable("the change feed's tailer did not decode the changes of a "
                                 f"read in {_CLOSE_WAIT_S:.0f} s (is a process tailing?)")

    async def mark(self, conn: Connection, *, replace: bool = False) -> Mark:
        """In a write's transaction, after its one change: note it (and, for an API replace,
        which the trigger logged as an update, say so: with logical decoding, a message
        in the WAL), and take the place key shared until `place` (session level: the
        caller ends the session if `place` is not reached)."""
        if await self.mode(conn) == "logical":
            if replace:
                await conn.execute("SELECT pg_logical_emit_message(true, 'tidings', 'replace')")
            row = await conn.fetchrow(
                f"SELECT pg_current_xact_id(), (SELECT max(tick) FROM {self.ticks}), "
                f"pg_advisory_lock_shared({self.place_key})")
            txid, tick, _ = _one(row)
            return Mark(txid=_int(txid), seq=_LAST_SEQ, after_tick=_int(tick), logical=True)
        change = (f"WITH r AS (UPDATE {self.table} SET op = 'replace' "
                  f"WHERE txid = pg_current_xact_id() "
                  f"AND seq = currval({literal(self.sequence)}) RETURNING seq) "
                  f"SELECT (SELECT seq FROM r)" if replace
                  else f"SELECT currval({literal(self.sequence)})")
        row = await conn.fetchrow(
            f"{change}, pg_current_xact_id(), (SELECT max(tick) FROM {self.ticks}), "
            f"pg_advisory_lock_shared({self.place_key})")
        seq, txid, tick, _ = _one(row)
        return Mark(txid=_int(txid), seq=_int(seq), after_tick=_int(tick))

    async def place(self, conn: Connection, mark: Mark,
                    wake: Callable[[], None] = lambda: None) -> int:
        """After the write committed, on the same session: its change's position. Ticks
        if no tick sees it yet (with logical decoding: a pending tick, then waits for the
        tailer to close it); releases the place key."""
        if mark.logical:
            for _ in range(int(_CLOSE_WAIT_S / _CLOSE_POLL_S)):
                row = await conn.fetchrow(
                    f"SELECT tick, through FROM {self.ticks} WHERE tick > $2 AND "
                    f"pg_visible_in_snapshot($1::xid8, snapshot) ORDER BY tick LIMIT 1",
                    mark.txid, mark.after_tick)
                if row is not None and row[1] is not None:
                    break
                if row is None:
                    async with conn.transaction():
                        await conn.execute(f"LOCK TABLE {self.tick_lock} IN EXCLUSIVE MODE")
                        # Switched back to triggers meanwhile: the switch decoded this
                        # write; a trigger tick places it.
                        await conn.fetchval(
                            self._pending_sql() if await self.mode(conn) == "logical"
                            else f"SELECT {self._fn('tidings_tick')}()")
                wake()
                await asyncio.sleep(_CLOSE_POLL_S)
            else:
                raise ServiceUnavailable("the change feed's tailer did not decode a write "
                                         f"in {_CLOSE_WAIT_S:.0f} s (is a process tailing?)")
        return _int(await conn.fetchval(
            f"SELECT {self._fn('tidings_place')}($1::xid8, $2, $3)",
            mark.txid, mark.seq, mark.after_tick))

    async def read_state(self, conn: Connection, name: str, *,
                         timeout: float | None = None) -> int:
        """`cursor` (the tailer's) or `pruned_through`."""
        return _int(await conn.fetchval(
            f"SELECT value::bigint FROM {self.state} WHERE name = $1", name, timeout=timeout))

    async def bounds(self, conn: Connection, seq: int) -> Bounds:
        """Where a token at position `seq` stands in the log."""
        row = await conn.fetchrow(
            f"SELECT (SELECT max(through) FROM {self.ticks}), "
            f"(SELECT value::bigint FROM {self.state} WHERE name = 'pruned_through'), "
            f"coalesce((SELECT through FROM {self.ticks} WHERE tick = 0), 0), "
            f"(SELECT max(seq) FROM {self.table} WHERE txid IS NULL AND seq <= $1), "
            f"(SELECT min(seq) FROM {self.table} WHERE txid IS NULL), "
            f"(SELECT value::bigint FROM {self.state} WHERE name = 'gap_through')", seq)
        high, pruned, legacy, legacy_at, legacy_first, gap = (
            None if value is None else _int(value) for value in _one(row))
        high, pruned, legacy = high or 0, pruned or 0, legacy or 0
        # Positions after batch 0 are dense: each is a change.
        at_or_before = seq if seq > legacy else legacy_at
        first = legacy_first if legacy_first is not None else (
            pruned + 1 if high > pruned else None)
        return Bounds(high, pruned, at_or_before, first, gap or 0)

    # -- the tailer --------------------------------------------------------------------

    def read_sql(self) -> str:
        """At most $2 changes after position $1, ticking first when no tick reaches past
        it: (position, age_s, txid, seq, coll, op, doc_key, old_doc, new_doc, wall_time).
        $3: the cursor to save first (published through there; NULL: none); $4: the
        tailer was asleep, release the idle key; $5, $6: the txid and seq of the change
        at $1 (NULL: not known), so that the rest of a large batch is found on the index
        rather than by skipping rows; $7: tick when no tick reaches past $1 (false with
        logical decoding: the step ticks)."""
        return f"SELECT * FROM {self._fn('tidings_read')}($1, $2, $3, $4, $5, $6, $7)"

    def save_sql(self) -> str:
        # Never backwards: a tailer that lost its session may still finish a batch after
        # the next one took over (the transport stores the repeated updates once).
        return (f"UPDATE {self.state} SET value = $1::bigint::text "
                f"WHERE name = 'cursor' AND value::bigint < $1::bigint")

    def sleep_sql(self) -> str:
        """Try to take the idle key: true when no writer's transaction holds it."""
        return f"SELECT pg_try_advisory_lock({self.idle_key})"

    def wake_sql(self) -> str:
        return f"SELECT pg_advisory_unlock({self.idle_key})"

    def wal_moved_sql(self) -> str:
        """Logical decoding, idle: wait (at most $2 ms) for the WAL to pass $1."""
        return f"SELECT {self._names.schema}.tidings_wal_moved($1::text::pg_lsn, $2)"

    def wal_flushed_sql(self) -> str:
        """The slot streamed, idle: wait (at most $2 ms) for the WAL's flush position to
        pass $1; that position as text, or NULL."""
        return (f"SELECT {self._names.schema}.tidings_wal_flushed($1::text::pg_lsn, $2)"
                f"::text")


    # -- retention -----------------------------------------------------------------------

    async def prune(self, conn: Connection, published: int,
                    retention: Retention) -> tuple[int, int | None]:
        """Remove published batches beyond `retention`, whole batches only, in the
        caller's transaction; returns (how many changes, the last position removed).

        `pruned_through` becomes the last position removed, a change, so that a token at
        that position still has an update in the hub's history to resume after. Waits
        (at most 2 s; else raises LockNotAvailable) for API writes still placing theirs."""
        await conn.execute("SET LOCAL lock_timeout = '2s'")
        await conn.execute(f"SELECT pg_advisory_xact_lock({self.place_key})")
        pruned = await self.read_state(conn, "pruned_through")
        latest = _int(await conn.fetchval(f"SELECT max(through) FROM {self.ticks}"))
        target = min(published, latest - retention.size)
        if retention.max_age_s > 0:
            aged = await conn.fetchval(
                f"SELECT max(through) FROM {self.ticks} WHERE at < clock_timestamp() "
                f"- make_interval(secs => $1::float8)", retention.max_age_s)
            if aged is not None:
                target = max(target, min(published, _int(aged)))
        if target <= pruned:
            return 0, None
        cut = await self._cut(conn, target)
        if cut is None or cut[1] <= pruned:
            return 0, None
        tick, through = cut
        removed = 0
        for condition in (
            "txid IS NULL",
            "txid < pg_snapshot_xmin(s.snapshot)",
            "txid >= pg_snapshot_xmin(s.snapshot) AND txid < pg_snapshot_xmax(s.snapshot) "
            "AND pg_visible_in_snapshot(txid, s.snapshot)",
        ):
            status = await conn.execute(
                f"DELETE FROM {self.table} USING {self.ticks} s "
                f"WHERE s.tick = $1 AND {condition}", tick)
            removed += int(status.rsplit(" ", 1)[-1])
        await conn.execute(f"DELETE FROM {self.ticks} WHERE tick < $1", tick)
        await conn.execute(
            f"UPDATE {self.state} SET value = $1 WHERE name = 'pruned_through'", str(through))
        return removed, through

    async def _cut(self, conn: Connection, target: int) -> tuple[int, int] | None:
        """The newest tick whose batches all end at or before `target`: (tick, through)."""
        row: Record | None = await conn.fetchrow(
            f"SELECT tick, through FROM {self.ticks} WHERE through <= $1 "
            f"ORDER BY tick DESC LIMIT 1", target)
        return None if row is None else (_int(row[0]), _int(row[1]))
