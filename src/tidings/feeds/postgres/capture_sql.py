"""The change log's SQL: its tables and the PL/pgSQL functions that write and read it.

`capture.py` says why (the ordering argument, what each function is for) and runs these;
this module only builds their text for one schema. Everything is a function of `Names`,
so one schema's objects never mention another's.

    tidings_capture()    the trigger: one log row per changed row (and per TRUNCATE),
                         stamped with the writer's transaction id; no lock, no NOTIFY
                         unless the tailer sleeps
    tidings_tick(take)   closes a batch: records a snapshot and the position of the last
                         change it adds (take = false: only says whether there is one)
    tidings_read(a, n, ...)  the tailer's page: the n changes after position a, numbered
                         (and: save the published position as the cursor first;
                         release the idle key; where in a batch a is, if known)
    tidings_place(...)   the position of one change, once a tick covers its transaction
    tidings_close(...)   logical decoding: ticks after a step copied the WAL into the log
    tidings_wal_moved(lsn, ms)  logical decoding, idle: waits in the server until the
                         WAL's insert position passes lsn (at most ms); whether it did
    tidings_wal_flushed(lsn, ms)  the same for the WAL's flush position (the slot
                         streamed: its WAL sender sends what is flushed); where it is
                         then, or NULL
"""

from __future__ import annotations

from dataclasses import dataclass

from tidings.feeds.errors import ConfigError
from tidings.feeds.postgres.schema import create_index, iso, managed_document
from tidings.feeds.sqltext import literal

__all__ = ["Names", "batch_rows", "functions", "tables"]

_BODY = "$tidings$"


@dataclass(frozen=True, slots=True)
class Names:
    """One schema's change-log objects, quoted and qualified, and its keys."""

    schema: str  # quoted
    table: str  # the log
    sequence: str  # its statement-order sequence (quoted name, as a literal for nextval)
    ticks: str
    tick_lock: str
    state: str
    idle_key: int  # held by a sleeping tailer: writers who see it held NOTIFY
    place_key: int  # held shared by an API write until it knows its position
    channel: str


def tables(n: Names) -> list[str]:
    """The log, its sequence, the ticks and the tick lock (idempotent). The log's only
    index is (txid, seq): every index is a writer's cost."""
    return [
        f"""CREATE TABLE IF NOT EXISTS {n.table} (
            seq       bigint NOT NULL,
            txid      xid8 DEFAULT pg_current_xact_id(),
            coll      text NOT NULL,
            op        text NOT NULL,
            doc_key   jsonb NOT NULL,
            old_doc   jsonb,
            new_doc   jsonb,
            wall_time timestamptz NOT NULL
        )""",
        create_index(n.schema, "tidings_changes_txid_seq", n.table, "txid, seq"),
        # Statement order inside a transaction; never reused, even when the log is pruned.
        f"CREATE SEQUENCE IF NOT EXISTS {n.sequence} AS bigint",
        f"""CREATE TABLE IF NOT EXISTS {n.ticks} (
            tick     bigint PRIMARY KEY,
            snapshot pg_snapshot NOT NULL,
            through  bigint,  -- NULL: pending (logical decoding closes it)
            at       timestamptz NOT NULL,
            lsn      pg_lsn
        )""",
        # Where a read starts (`tidings_read`), and retention's newest position: one
        # probe instead of a scan of the ticks retention keeps (up to one per change).
        create_index(n.schema, "tidings_ticks_through", n.ticks, "through"),
        # Never written, so never vacuumed: locking it cannot wait on autovacuum.
        f"CREATE TABLE IF NOT EXISTS {n.tick_lock} ()",
    ]


def batch_rows(n: Names, prev: str, cur: str, columns: str, where: str = "") -> str:
    """The log rows of the batch between snapshots `prev` and `cur` (SQL expressions):
    written by a transaction that `cur` sees committed and `prev` did not.

    Two index scans instead of a test of every row (PgQ's `batch_event_sql`): the
    transactions `prev` saw running that have ended by `cur`, and the ids `prev` had not
    yet handed out, up to `cur`'s. MVCC hides rolled-back transactions and savepoints."""
    extra = f" AND {where}" if where else ""
    return (
        f"SELECT {columns} FROM {n.table} c WHERE c.txid = ANY (ARRAY("
        f"SELECT xip.id FROM pg_snapshot_xip({prev}) AS xip(id) "
        f"WHERE pg_visible_in_snapshot(xip.id, {cur}))){extra} "
        f"UNION ALL SELECT {columns} FROM {n.table} c "
        f"WHERE c.txid >= pg_snapshot_xmax({prev}) AND c.txid < pg_snapshot_xmax({cur}) "
        f"AND pg_visible_in_snapshot(c.txid, {cur}){extra}"
    )


def _function(n: Names, signature: str, returns: str, body: str, *,
              definer: bool = False, indexed: bool = True) -> str:
    """`indexed`: the function reads the log and the ticks on their indexes only. A
    PL/pgSQL function's statements keep the plan made when the session first ran them
    (after five custom ones), so the tailer's session, made when the log was empty, kept
    a scan of the whole log for good, and read all of it on every step as it grew (up to
    retention: 100,000 changes)."""
    text = (f"CREATE OR REPLACE FUNCTION {n.schema}.{signature} RETURNS {returns}\n"
            f"LANGUAGE plpgsql {'SECURITY DEFINER ' if definer else ''}"
            f"SET search_path = pg_catalog, pg_temp "
            f"{'SET enable_seqscan = off ' if indexed else ''}AS {_BODY}\n{body}\n{_BODY}")
    if text.count(_BODY) != 2:
        raise ConfigError(f"the schema name {n.schema!r} cannot be used")
    return text


def _document(row: str, into: str) -> str:
    """PL/pgSQL: the document of the trigger's `row` (OLD or NEW) into the variable. An
    IF, not a CASE: the branch not taken is never planned (a watched table's row has no
    `doc` column for the managed branch to name)."""
    return (f"IF managed THEN {into} := {managed_document(row)}; "
            f"ELSE {into} := to_jsonb({row}); END IF;")


def _capture(n: Names) -> str:
    insert = (f"INSERT INTO {n.table} (seq, txid, coll, op, doc_key, old_doc, new_doc, "
              f"wall_time) VALUES (nextval({literal(n.sequence)}), pg_current_xact_id(), ")
    return _function(n, "tidings_capture()", "trigger", f"""
DECLARE
    key_column constant text := TG_ARGV[1];
    managed constant boolean := TG_ARGV[2] = 'managed';
    old_doc jsonb;
    new_doc jsonb;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        {insert}TG_ARGV[0], 'truncate', '{{}}', NULL, NULL, clock_timestamp());
    ELSE
        IF TG_OP <> 'INSERT' THEN
            {_document("OLD", "old_doc")}
        END IF;
        IF TG_OP <> 'DELETE' THEN
            {_document("NEW", "new_doc")}
        END IF;
        {insert}TG_ARGV[0], lower(TG_OP),
                jsonb_build_object(key_column, coalesce(new_doc, old_doc) -> key_column),
                old_doc, new_doc, clock_timestamp());
    END IF;
    -- No lock anyone waits for: the tailer orders transactions by snapshots. It holds
    -- this key only while it sleeps; then wake it (at commit; never for a rollback).
    -- Holding the key shared until commit keeps the tailer from falling asleep before
    -- this change is visible (tidings/feeds/postgres/capture.py, "Waking the tailer").
    IF NOT pg_try_advisory_xact_lock_shared({n.idle_key}) THEN
        PERFORM pg_notify({literal(n.channel)}, '');
    END IF;
    RETURN NULL;
END""", definer=True, indexed=False)  # (no read: writers pay no setting)


def _tick(n: Names) -> str:
    fresh = batch_rows(n, "last.snapshot", "pg_current_snapshot()", "1")
    return _function(n, "tidings_tick(take boolean DEFAULT true)", "bigint", f"""
DECLARE
    last {n.ticks};
    added bigint;
    made bigint;
BEGIN
    IF take THEN
        -- Ticks one at a time, each snapshot taken after the previous tick committed.
        LOCK TABLE {n.tick_lock} IN EXCLUSIVE MODE;
    END IF;
    SELECT * INTO STRICT last FROM {n.ticks} ORDER BY tick DESC LIMIT 1;
    -- Logical decoding: only the tailer's step ticks (it decodes the batch first).
    IF (SELECT value FROM {n.state} WHERE name = 'capture') = 'logical' THEN
        RETURN NULL;
    END IF;
    IF NOT take THEN
        SELECT count(*) INTO added FROM ({fresh}) f;
        RETURN CASE WHEN added = 0 THEN last.through END;
    END IF;
    -- One statement: the rows it counts are exactly those its snapshot (the one it
    -- records) sees. No row: nothing new, no tick.
    INSERT INTO {n.ticks} (tick, snapshot, through, at)
    SELECT last.tick + 1, pg_current_snapshot(), last.through + f.added, clock_timestamp()
    FROM (SELECT count(*) AS added FROM ({fresh}) r) f WHERE f.added > 0
    RETURNING through INTO made;
    RETURN coalesce(made, last.through);
END""")


def _read(n: Names) -> str:
    text = ("c.coll, c.op, c.doc_key::text, c.old_doc::text, c.new_doc::text, "
            f"{iso('c.wall_time')}")
    age = "extract(epoch FROM clock_timestamp() - b.at)::float8"
    resume = "(c.txid, c.seq) > (from_txid, from_seq)"

    def page(where: str, order: str) -> str:
        """The next rows of one part of the batch, on the index, numbered after `upto`."""
        return (f"RETURN QUERY SELECT upto + row_number() OVER (ORDER BY {order}), {age}, "
                f"c.txid, c.seq, {text} FROM (SELECT * FROM {n.table} c WHERE {where} "
                f"AND {resume} ORDER BY {order} LIMIT lim - n) c;")

    return _function(
        n, "tidings_read(after bigint, lim integer, saved bigint, release boolean, "
        "last_txid xid8, last_seq bigint, tick boolean)", """TABLE (
    pos bigint, age_s float8, txid xid8, seq bigint, coll text, op text, doc_key text,
    old_doc text, new_doc text, wall_time text)""", f"""
DECLARE
    b record;
    k record;
    first_tick bigint;
    prev_snapshot pg_snapshot;
    prev_through bigint;
    ended xid8;
    upto bigint;
    skip bigint;
    got bigint;
    n bigint := 0;
    from_txid xid8;
    from_seq bigint;
BEGIN
    IF release THEN  -- awake again: writers stop notifying (a NOTIFY serializes commits)
        PERFORM pg_advisory_unlock({n.idle_key});
    END IF;
    -- Published through `saved` (the hub acknowledged it): saved with this read. Not
    -- `after`, which may be past what is published (the tailer reads ahead).
    IF saved IS NOT NULL THEN
        UPDATE {n.state} SET value = saved::text
        WHERE name = 'cursor' AND value::bigint < saved;
    END IF;
    -- Batch 0 of a log the previous version began: its changes keep their seq as their
    -- position (seq order was commit order then).
    SELECT t.through, t.at INTO b FROM {n.ticks} t WHERE t.tick = 0;
    IF FOUND AND after < b.through THEN
        RETURN QUERY SELECT c.seq, {age}, c.txid, c.seq, {text}
            FROM {n.table} c WHERE c.txid IS NULL AND c.seq > after ORDER BY c.seq LIMIT lim;
        GET DIAGNOSTICS got = ROW_COUNT;
        IF got >= lim THEN
            RETURN;
        END IF;
        n := got;
        after := b.through;
    END IF;
    -- Logical decoding (tick = false): the tailer's step has ticked.
    IF tick AND NOT EXISTS (SELECT FROM {n.ticks} t WHERE t.through > after) THEN
        PERFORM {n.schema}.tidings_tick();
    END IF;
    -- The batches after `after`, each between its tick's snapshot and the one before:
    -- from the first tick past `after` (found on the index on `through`) in tick order,
    -- the tick before it giving the first batch's start. (A join of the ticks to
    -- themselves was planned as a hash join over all of them: a scan of every tick
    -- retention keeps, on every read.)
    SELECT t.tick INTO first_tick FROM {n.ticks} t WHERE t.through > after
    ORDER BY t.through LIMIT 1;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    FOR k IN SELECT c.snapshot, c.through, c.at FROM {n.ticks} c
             WHERE c.tick >= first_tick - 1 AND c.through IS NOT NULL ORDER BY c.tick
    LOOP
        SELECT k.snapshot AS cur, prev_snapshot AS prev, prev_through AS base,
               k.through AS through, k.at AS at INTO b;
        prev_snapshot := k.snapshot;
        prev_through := k.through;
        -- (Ticks are numbered without gaps.) The first row is the tick before the first
        -- batch, or the oldest kept: a start only.
        CONTINUE WHEN b.base IS NULL;
        -- Where in this batch to go on: after its first `skip` changes, that is after
        -- the last one read (known, or found once, after a restart).
        skip := greatest(after - b.base, 0);
        upto := b.base + skip;
        from_txid := '0';
        from_seq := 0;
        IF skip > 0 AND last_txid IS NOT NULL THEN
            from_txid := last_txid;
            from_seq := last_seq;
        ELSIF skip > 0 THEN
            SELECT r.txid, r.seq INTO from_txid, from_seq
            FROM ({batch_rows(n, "b.prev", "b.cur", "c.txid, c.seq")}) r
            ORDER BY r.txid, r.seq OFFSET skip - 1 LIMIT 1;
        END IF;
        -- The transactions the batch's first snapshot saw running, one by one in txid
        -- order, then the ids it had not handed out: each part read in index order, so
        -- a page costs its own rows however large the batch (a bulk load of millions).
        FOR ended IN SELECT xip.id FROM pg_snapshot_xip(b.prev) AS xip(id)
                     WHERE pg_visible_in_snapshot(xip.id, b.cur) AND xip.id >= from_txid
                     ORDER BY xip.id
        LOOP
            {page("c.txid = ended", "c.seq")}
            GET DIAGNOSTICS got = ROW_COUNT;
            upto := upto + got;
            n := n + got;
            EXIT WHEN n >= lim;
        END LOOP;
        IF n < lim THEN
            {page("c.txid >= pg_snapshot_xmax(b.prev) AND c.txid < pg_snapshot_xmax(b.cur) "
                  "AND pg_visible_in_snapshot(c.txid, b.cur)", "c.txid, c.seq")}
            GET DIAGNOSTICS got = ROW_COUNT;
            upto := upto + got;
            n := n + got;
        END IF;
        IF n < lim AND upto <> b.through THEN  -- a row of an unpublished batch is gone
            RAISE EXCEPTION 'tidings: the change log lost changes % to %', upto + 1, b.through;
        END IF;
        EXIT WHEN n >= lim;
    END LOOP;
END""")


def _place(n: Names) -> str:
    rank = batch_rows(n, "b.prev", "b.cur", "1", "(c.txid, c.seq) <= (mine, mine_seq)")
    return _function(
        n, "tidings_place(mine xid8, mine_seq bigint, after_tick bigint)", "bigint", f"""
DECLARE
    b record;
    before bigint;
BEGIN
    FOR attempt IN 1..2 LOOP
        SELECT cur.snapshot AS cur, prev.snapshot AS prev, prev.through AS base INTO b
        FROM {n.ticks} cur JOIN {n.ticks} prev ON prev.tick = cur.tick - 1
        WHERE cur.tick > after_tick AND pg_visible_in_snapshot(mine, cur.snapshot)
        ORDER BY cur.tick LIMIT 1;
        EXIT WHEN FOUND;
        IF attempt = 2 THEN
            RAISE EXCEPTION 'tidings: no tick covers transaction %', mine;
        END IF;
        PERFORM {n.schema}.tidings_tick();  -- committed before this call: the tick sees it
    END LOOP;
    SELECT count(*) INTO before FROM ({rank}) r;
    -- Taken (shared, session level) before the write's COMMIT: retention waited for it.
    PERFORM pg_advisory_unlock_shared({n.place_key});
    RETURN b.base + before;
END""")


def _close(n: Names) -> str:
    """Logical decoding (`decoding.py`): once the tailer's step has copied the WAL through
    a position into the log, give the pending ticks (API reads') their `through`, in
    order, then record a tick at the step's own snapshot `own` if its batch is not empty
    (`own` NULL: pending ticks only)."""
    fresh = batch_rows(n, "prev", "cur.snapshot", "1")
    own = batch_rows(n, "prev", "own", "1")
    return _function(n, "tidings_close(own pg_snapshot, own_lsn pg_lsn)", "void", f"""
DECLARE
    last {n.ticks};
    cur {n.ticks};
    prev pg_snapshot;
    total bigint;
    added bigint;
BEGIN
    SELECT * INTO STRICT last FROM {n.ticks} WHERE through IS NOT NULL
    ORDER BY tick DESC LIMIT 1;
    prev := last.snapshot;
    total := last.through;
    FOR cur IN SELECT * FROM {n.ticks} WHERE tick > last.tick ORDER BY tick LOOP
        SELECT count(*) INTO added FROM ({fresh}) r;
        total := total + added;
        UPDATE {n.ticks} t SET through = total WHERE t.tick = cur.tick;
        last := cur;
        prev := cur.snapshot;
    END LOOP;
    IF own IS NULL THEN
        RETURN;
    END IF;
    SELECT count(*) INTO added FROM ({own}) r;
    IF added > 0 THEN
        INSERT INTO {n.ticks} (tick, snapshot, through, at, lsn)
        VALUES (last.tick + 1, own, total + added, clock_timestamp(), own_lsn);
    END IF;
END""")


def _wal_moved(n: Names) -> str:
    """An idle tailer's wait for new WAL, in the server: a look every 2 ms costs the
    server a wake-up, where a query from the tailer every few ms cost both sides a round
    trip (and the tailer's process about 5 % of a core doing nothing)."""
    return _wal_wait(n, "tidings_wal_moved", "pg_current_wal_insert_lsn()", "boolean",
                     found="true", not_found="false")


def _wal_flushed(n: Names) -> str:
    """The same for the flush position (what a WAL sender may send), which it returns."""
    return _wal_wait(n, "tidings_wal_flushed", "pg_current_wal_flush_lsn()", "pg_lsn",
                     found="reached", not_found="NULL")


def _wal_wait(n: Names, name: str, position: str, returns: str, *, found: str,
              not_found: str) -> str:
    return _function(n, f"{name}(after pg_lsn, wait_ms integer)", returns, f"""
DECLARE
    deadline timestamptz := clock_timestamp() + wait_ms * interval '1 millisecond';
    reached pg_lsn;
BEGIN
    LOOP
        reached := {position};
        IF reached > after THEN
            RETURN {found};
        END IF;
        EXIT WHEN clock_timestamp() >= deadline;
        PERFORM pg_sleep(0.002);
    END LOOP;
    RETURN {not_found};
END""", indexed=False)


def functions(n: Names) -> list[str]:
    return [_capture(n), _tick(n), _close(n), _wal_moved(n), _wal_flushed(n),
            f"DROP FUNCTION IF EXISTS {n.schema}.tidings_read(bigint, integer, boolean, "
            f"boolean, xid8, bigint)",
            # The one before: it saved its `after` (a boolean said whether).
            f"DROP FUNCTION IF EXISTS {n.schema}.tidings_read(bigint, integer, boolean, "
            f"boolean, xid8, bigint, boolean)",
            _read(n), _place(n)]
