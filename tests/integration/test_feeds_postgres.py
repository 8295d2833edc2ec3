"""What only the PostgreSQL change feed has (the contract every feed keeps is test_feeds.py).

Many concurrent writer connections, committing out of transaction-id order, whose changes
must reach a subscriber exactly once, each transaction's together and in statement order,
and a transaction that committed before another began first (docs/feeds.md, "Order");
none from rolled-back transactions or savepoints; a transaction left open that holds back
nobody else; TRUNCATE; one tailer among several servers that sleeps when nothing happens;
a real restart of the PostgreSQL server; a change log made by the previous version; and
what `tidings watch` refuses here (views, tables without a single-column key).

Each test runs in a schema of its own (`pg`: see feed_backends.py), dropped afterwards,
once per way of capturing (`postgres`: triggers, `postgres-logical`: logical decoding;
what only one way has: `pg_trigger` here, test_feeds_postgres_logical.py).
External writers are plain asyncpg connections in this process (the server is another
process). Waits are bounded by deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field

import anyio
import asyncpg
import httpx
import pytest

from tests.conftest import SSEStream, open_stream
from tests.integration.feed_backends import (
    CONFIG_POSTGRES,
    PostgresDB,
    eventually,
    insert,
    payload,
    seq_of,
    watch,
)
from tests.services import unavailable
from tidings.pgdb import LEADER_IDLE_LIMIT_S
from tidings.sse import Event

pytestmark = pytest.mark.anyio


async def test_rolled_back_changes_are_never_published(pg: PostgresDB) -> None:
    server = pg.start()
    async with httpx.AsyncClient(timeout=10) as client:
        async with watch(client, server.url, "orders") as stream, pg.connection() as conn:
            tx = conn.transaction()
            await tx.start()
            await conn.execute("INSERT INTO orders (id, item) VALUES (1, 'rolled back')")
            await tx.rollback()
            async with conn.transaction():
                await conn.execute("INSERT INTO orders (id, item) VALUES (2, 'kept')")
                with contextlib.suppress(asyncpg.UniqueViolationError):
                    async with conn.transaction():  # a savepoint, rolled back
                        await conn.execute("INSERT INTO orders (id, item) VALUES (3, 'sp')")
                        await conn.execute("INSERT INTO orders (id, item) VALUES (2, 'dup')")
                await conn.execute("INSERT INTO orders (id, item) VALUES (4, 'kept too')")
                # Two collections in one transaction: one log, consecutive seqs.
                await conn.execute("INSERT INTO messages (id, doc) VALUES "
                                   "('m', '{\"username\": \"u\", \"content\": \"c\"}')")
            events = await stream.take(2)
            assert [payload(e)["documentKey"] for e in events] == [{"id": 2}, {"id": 4}]
            assert await stream.nothing_within(0.3)
        log_rows = await pg.fetch("SELECT seq, coll FROM tidings_changes ORDER BY txid, seq")
        if pg.capture == "trigger":
            # Seqs 1 and 3 went to the rolled-back insert and savepoint (the duplicate
            # failed before its trigger ran): gaps in the log's seq...
            assert [(r["seq"], r["coll"]) for r in log_rows] == [
                (2, "orders"), (4, "orders"), (5, "messages")]
        else:  # logical decoding: only what committed is in the WAL's decoded changes
            assert [r["coll"] for r in log_rows] == ["orders", "orders", "messages"]
        # ...but positions count committed changes only: no gap, so every token names one.
        assert [seq_of(e.id or "") for e in events] == [1, 2]

        epoch = (events[0].id or "").split(".")[0]
        async with watch(client, server.url, "orders",
                         [("resume_after", f"{epoch}.1")]) as stream:
            assert [e.id for e in await stream.take(1)] == [f"{epoch}.2"]
            assert await stream.nothing_within(0.3)
        async with watch(client, server.url, "orders",
                         [("resume_after", f"{epoch}.0")]) as stream:
            assert [e.id for e in await stream.take(2)] == [f"{epoch}.1", f"{epoch}.2"]


class Arrivals:
    """Every event of a stream, with the time (monotonic) it arrived, read in a task of
    its own so that arrival times do not wait for the test's other awaits."""

    def __init__(self, stream: SSEStream) -> None:
        self.events: list[tuple[Event, float]] = []
        self._stream = stream
        self._changed = asyncio.Event()

    async def run(self) -> None:
        while True:
            event = await self._stream.next(timeout_s=3600)
            self.events.append((event, time.monotonic()))
            self._changed.set()

    async def wait_for(self, count: int, timeout_s: float = 10.0) -> None:
        with anyio.fail_after(timeout_s):
            while len(self.events) < count:
                self._changed.clear()
                await self._changed.wait()


async def test_an_open_transaction_holds_back_only_itself(pg: PostgresDB) -> None:
    """One transaction writes to a watched table and stays open 5 s: meanwhile the other
    writers' changes reach a subscriber within 100 ms of their COMMIT each, and the open
    one's arrives once, after its own COMMIT. (The previous version's order lock held
    every other writer of a watched table until the open one ended.)"""
    server = pg.start()
    async with (
        httpx.AsyncClient(timeout=10) as client,
        watch(client, server.url, "orders") as stream,
        pg.connection() as slow,
        pg.connection() as fast,
    ):
        assert stream.response.status_code == 200
        arrivals = Arrivals(stream)
        async with anyio.create_task_group() as group:
            group.start_soon(arrivals.run)
            tx = slow.transaction()
            await tx.start()
            await slow.execute("INSERT INTO orders (id, item) VALUES (1000, 'open')")
            opened = time.monotonic()
            committed: list[float] = []
            n = 0
            while time.monotonic() - opened < 5.0:
                n += 1
                await fast.execute("INSERT INTO orders (id, item) VALUES ($1, 'quick')", n)
                committed.append(time.monotonic())
                await arrivals.wait_for(n)
                await asyncio.sleep(0.05)
            await tx.commit()
            closed = time.monotonic()
            await arrivals.wait_for(n + 1)
            await asyncio.sleep(0.5)  # nothing more may come: not twice, nothing else
            group.cancel_scope.cancel()

    keys = [payload(e)["documentKey"]["id"] for e, _ in arrivals.events]  # type: ignore[index]
    assert keys == [*range(1, n + 1), 1000]  # each once, the open one last
    delays = [arrived - sent for (_, arrived), sent in zip(arrivals.events, committed,
                                                           strict=False)]
    assert n > 20 and max(delays) < 0.1, f"commit-to-subscriber delays: {sorted(delays)[-5:]}"
    assert arrivals.events[-1][1] > closed


async def test_watch_needs_a_table_with_a_key(pg: PostgresDB) -> None:
    await pg.execute("CREATE TABLE pairs (a text, b text, PRIMARY KEY (a, b));"
                     "CREATE VIEW recent AS SELECT * FROM orders")
    refused = await pg.watch_command("pairs")
    assert refused.returncode != 0 and "no single-column primary key" in refused.stderr
    keyed = await pg.watch_command("pairs", "--key", "a", "--read", "public")
    assert keyed.returncode == 0 and "key a" in keyed.stdout
    view = await pg.watch_command("recent")
    assert view.returncode != 0 and "is a view" in view.stderr

    server = pg.start(config=None)  # no --config: the watched table is in the database
    async with httpx.AsyncClient(timeout=10) as client:
        async with watch(client, server.url, "pairs") as stream:
            await pg.execute("INSERT INTO pairs VALUES ('x', 'y')")
            assert payload(await stream.next(timeout_s=5))["documentKey"] == {"a": "x"}


@pytest.mark.parametrize("failure", ["killed", "stalled"])
async def test_one_tailer_among_servers_and_failover(pg: PostgresDB, failure: str) -> None:
    """Two servers on one schema: one tails (a session-level advisory lock), the other
    stands by, serves reads and resumes watches, and takes over when the first dies
    (SIGKILL) or stops running (SIGSTOP: PostgreSQL ends its idle session after
    LEADER_IDLE_LIMIT_S). A stalled one run again stands by; nothing is stored twice."""
    first = pg.start()
    await eventually(lambda: _sessions_are(pg, (1, 0)))
    second = pg.start()
    await eventually(lambda: _sessions_are(pg, (1, 1)))
    async with httpx.AsyncClient(timeout=10) as client:
        token = (await insert(client, second.url, {"username": "a", "content": "0"})).headers[
            "tidings-resume-token"]
        async with watch(client, second.url, "messages", [("resume_after", token)]) as stream:
            await pg.execute("INSERT INTO messages (id, doc) VALUES ($1, $2::jsonb)",
                             "x1", json.dumps({"username": "b", "content": "1"}))
            assert payload(await stream.next(timeout_s=5))["documentKey"] == {"id": "x1"}

            assert first.proc is not None
            if failure == "killed":
                first.stop(signal.SIGKILL)
            else:
                first.proc.send_signal(signal.SIGSTOP)
            try:
                await eventually(lambda: _sessions_are(pg, (1, 0)),  # the second took over
                                 timeout_s=LEADER_IDLE_LIMIT_S + 15)
                await pg.execute("INSERT INTO messages (id, doc) VALUES ($1, $2::jsonb)",
                                 "x2", json.dumps({"username": "b", "content": "2"}))
                assert payload(await stream.next(timeout_s=5))["documentKey"] == {"id": "x2"}
            finally:
                if failure == "stalled":
                    first.proc.send_signal(signal.SIGCONT)
            if failure == "stalled":
                await eventually(lambda: _sessions_are(pg, (1, 1)))  # it stands by
            assert await stream.nothing_within(0.3)
    # (The chat's sweep announces presence when the stalled process expires: not counted.)
    stored = await pg.fetch("SELECT id, count(*) AS n FROM tidings_updates "
                            "WHERE topics ? '/collections/messages' GROUP BY id")
    assert len(stored) == 3 and all(r["n"] == 1 for r in stored)


async def _sessions_are(pg: PostgresDB, expected: tuple[int, int]) -> bool:
    return await pg.tailer_sessions() == expected


# -- the hard one: many writers, out of txid order, exactly once, in order ------------------


@dataclass
class Transaction:
    label: str
    changes: list[tuple[str, str, str]] = field(default_factory=list)  # (coll, key, op)
    txid: int = 0
    began: float = 0.0  # monotonic, before BEGIN was sent
    committing: float = 0.0  # before COMMIT was sent
    committed_at: float = 0.0  # after COMMIT returned
    committed: bool = False


async def test_concurrent_writers_exactly_once_in_order(pg: PostgresDB) -> None:
    """20 connections, 300 transactions of 1 to 4 inserts and updates on a watched table
    and a managed collection, about one in ten rolled back, some with a rolled-back
    savepoint, random sleeps inside so that commits interleave and often come out of
    transaction-id order (the previous version's order lock made that impossible).

    A subscriber of both collections must see every committed change exactly once and
    nothing else, each transaction's changes together and in statement order, and a
    transaction whose COMMIT returned before another began ahead of it. Positions are
    1..N without a gap."""
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    await pg.execute("CREATE TABLE items (id text PRIMARY KEY, last_tx text NOT NULL, "
                     "v integer NOT NULL)")
    config = CONFIG_POSTGRES + '''
[collections.notes]
read = "public"

[tables.items]
read = "public"
'''
    server = pg.start("--subscriber-buffer", "10000", config=config)
    writers, per_writer = 20, 15
    transactions: list[Transaction] = []

    async def writer(w: int) -> None:
        existing: dict[str, list[str]] = {"items": [], "notes": []}  # committed keys
        async with pg.connection() as conn:
            for t in range(per_writer):
                tx = Transaction(f"w{w}t{t}")
                transactions.append(tx)
                created: dict[str, list[str]] = {"items": [], "notes": []}
                transaction = conn.transaction()
                tx.began = time.monotonic()
                await transaction.start()
                for n in range(rng.randint(1, 4)):
                    coll = rng.choice(("items", "notes"))
                    keys = existing[coll] + created[coll]
                    if keys and rng.random() < 0.4:
                        key = rng.choice(keys)
                        if coll == "items":
                            await conn.execute("UPDATE items SET v = v + 1, last_tx = $2 "
                                               "WHERE id = $1", key, tx.label)
                        else:
                            await conn.execute(
                                "UPDATE notes SET doc = doc || jsonb_build_object("
                                "'last_tx', $2::text), updated_at = now() WHERE id = $1",
                                key, tx.label)
                        tx.changes.append((coll, key, "update"))
                    else:
                        key = f"{tx.label}n{n}"
                        if coll == "items":
                            await conn.execute("INSERT INTO items VALUES ($1, $2, 0)",
                                               key, tx.label)
                        else:
                            await conn.execute(
                                "INSERT INTO notes (id, doc) VALUES "
                                "($1, jsonb_build_object('last_tx', $2::text))", key, tx.label)
                        created[coll].append(key)
                        tx.changes.append((coll, key, "insert"))
                    if n == 0:
                        tx.txid = int(await conn.fetchval("SELECT pg_current_xact_id()"))
                    await asyncio.sleep(rng.uniform(0, 0.004))
                if rng.random() < 0.15:
                    # A savepoint rolled back: its first insert was logged, then vanished.
                    with contextlib.suppress(asyncpg.UniqueViolationError):
                        async with conn.transaction():
                            for _ in range(2):
                                await conn.execute("INSERT INTO items VALUES ($1, 'doomed', 0)",
                                                   f"{tx.label}sp")
                                await asyncio.sleep(rng.uniform(0, 0.002))
                await asyncio.sleep(rng.uniform(0, 0.004))
                if rng.random() < 0.1:
                    await transaction.rollback()
                    continue
                tx.committing = time.monotonic()
                await transaction.commit()
                tx.committed_at = time.monotonic()
                tx.committed = True
                for coll, keys in created.items():
                    existing[coll] += keys

    received: list[Event] = []
    async with httpx.AsyncClient(timeout=30) as client:
        async with open_stream(client, server.url, [("topic", "/collections/items"),
                                                    ("topic", "/collections/notes")]) as stream:
            assert stream.response.status_code == 200  # registered: live from here on
            began = time.monotonic()
            async with anyio.create_task_group() as group:
                for w in range(writers):
                    group.start_soon(writer, w)
            elapsed = time.monotonic() - began
            await pg.published_all()
            with contextlib.suppress(TimeoutError):  # until a second passes with nothing
                while True:
                    received.append(await stream.next(timeout_s=1.0))

    committed = [tx for tx in transactions if tx.committed]
    rolled_back = {tx.label for tx in transactions if not tx.committed}
    context = f"(seed {seed}, {len(transactions)} transactions in {elapsed:.1f} s)"
    assert len(committed) > 200 and rolled_back, context
    # Commits out of transaction-id order: one with a higher id had committed before one
    # with a lower id started to commit.
    by_txid = sorted(committed, key=lambda tx: tx.txid)
    assert any(later.committed_at < earlier.committing
               for i, earlier in enumerate(by_txid) for later in by_txid[i + 1:]), (
        f"every commit came in transaction-id order: nothing was tested {context}")

    seqs = [seq_of(e.id or "") for e in received]
    assert seqs == list(range(1, len(seqs) + 1)), f"positions are not 1..N {context}"

    def label(event: dict[str, object]) -> str:
        return str(event["fullDocument"]["last_tx"])  # type: ignore[index]

    events = [payload(e) for e in received]
    seen = [(label(e), str(e["ns"]["coll"]), str(e["documentKey"]["id"]),  # type: ignore[index]
             str(e["operationType"])) for e in events]
    assert not {s[0] for s in seen} & (rolled_back | {"doomed"}), (
        f"a rolled-back change was published {context}")

    # Exactly what each transaction committed, together and in statement order, the
    # transactions in the order they first appear.
    labels = {tx.label: tx for tx in committed}
    order = list(dict.fromkeys(s[0] for s in seen))
    expected = [(tx, coll, key, op) for tx in order for coll, key, op in labels[tx].changes]
    missing = {(tx.label, *c) for tx in committed for c in tx.changes} - set(seen)
    assert not missing, (
        f"{len(missing)} of {len(seen) + len(missing)} committed changes never arrived "
        f"{context}")
    assert seen == expected, f"a transaction's changes are split or reordered {context}"

    # A transaction that committed before another began comes first.
    place = {name: i for i, name in enumerate(order)}
    for first in committed:
        for second in committed:
            if first.committed_at < second.began:
                assert place[first.label] < place[second.label], (
                    f"{first.label} committed before {second.label} began, yet came "
                    f"after it {context}")


async def test_a_large_transaction_open_across_ticks(pg: PostgresDB) -> None:
    """A transaction of 3000 changes, open while others commit (and ticks are taken):
    one batch, read in pages of 500 on the index, contiguous, each change once; and a
    tailer restarted in the middle of that batch (its cursor saved there) republishes the
    rest with the same positions, stored once."""
    server = pg.start()
    async with httpx.AsyncClient(timeout=30) as client:
        async with watch(client, server.url, "orders") as stream, pg.connection() as bulk:
            tx = bulk.transaction()
            await tx.start()
            await bulk.execute("INSERT INTO orders (id, item) "
                               "SELECT g, 'bulk' FROM generate_series(1, 3000) g")
            for n in range(3):  # committed while the bulk one is open: published first
                await pg.execute("INSERT INTO orders (id, item) VALUES ($1, 'other')",
                                 10_000 + n)
                assert payload(await stream.next())["documentKey"] == {"id": 10_000 + n}
            await tx.commit()
            events = await stream.take(3000, timeout_s=30)
    assert [payload(e)["documentKey"]["id"] for e in events] == list(range(1, 3001))  # type: ignore[index]
    assert [seq_of(e.id or "") for e in events] == list(range(4, 3004))
    await pg.published_all()
    assert server.stop() == 0

    await pg.execute("UPDATE tidings_feed_state SET value = '1234' WHERE name = 'cursor'")
    pg.start()
    await pg.published_all()
    stored = await pg.fetch("SELECT id, count(*) AS n FROM tidings_updates GROUP BY id "
                            "ORDER BY min(seq)")
    assert [seq_of(r["id"]) for r in stored] == list(range(1, 3004))
    assert all(r["n"] == 1 for r in stored)


# -- TRUNCATE, waking, what operators see --------------------------------------------------


async def test_truncate_is_one_event(pg: PostgresDB) -> None:
    """TRUNCATE fires no row trigger: it is one `truncate` event on the collection's topic,
    with no documentKey, that a filtered watch receives too (every document went)."""
    server = pg.start()
    async with httpx.AsyncClient(timeout=10) as client:
        async with (
            watch(client, server.url, "orders") as every,
            watch(client, server.url, "orders", [("item", "nothing like it")]) as filtered,
            open_stream(client, server.url, [("topic", "/collections/orders/1")]) as one,
        ):
            await pg.execute("INSERT INTO orders (id, item) VALUES (1, 'a'), (2, 'b')")
            await pg.execute("TRUNCATE orders")
            inserted = [payload(e) for e in await every.take(2)]
            assert [e["documentKey"] for e in inserted] == [{"id": 1}, {"id": 2}]
            event = await every.next()
            data = payload(event)
            assert data == {"_id": {"_data": event.id}, "operationType": "truncate",
                            "ns": {"db": pg.db_name, "coll": "orders"},
                            "wallTime": data["wallTime"]}
            assert payload(await filtered.next())["operationType"] == "truncate"
            # A document's topic gets that document's changes only.
            assert payload(await one.next())["documentKey"] == {"id": 1}
            assert await one.nothing_within(0.3)
        async with watch(client, server.url, "messages") as managed:
            await pg.execute("INSERT INTO messages (id, doc) VALUES ('m', '{}')")
            await pg.execute("TRUNCATE messages")
            assert [payload(e)["operationType"] for e in await managed.take(2)] == [
                "insert", "truncate"]


async def test_a_sleeping_tailer_is_woken_by_the_next_writer(pg_trigger: PostgresDB) -> None:
    """With nothing to do the tailer sleeps (it holds the idle key; no polling), and the
    first writer that finds it asleep NOTIFYs: its change arrives long before the
    tailer's own 5 s look. (Logical decoding has no trigger: its tailer watches the WAL's
    position instead, `test_an_idle_logical_tailer_notices_a_commit`.)"""
    pg = pg_trigger
    server = pg.start()
    tailer = f"tidings-feed-tailer:{pg.schema}"

    async def asleep() -> bool:  # the tailer's session holds two advisory locks
        return await pg.fetchval(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
            "WHERE a.application_name = $1 AND l.locktype = 'advisory' AND l.granted",
            tailer) == 2

    async with httpx.AsyncClient(timeout=10) as client:
        async with watch(client, server.url, "orders") as stream:
            for n in range(3):
                await eventually(asleep, timeout_s=10)
                await pg.execute("INSERT INTO orders (id, item) VALUES ($1, 'wake')", n)
                sent = time.monotonic()
                assert payload(await stream.next(timeout_s=2))["documentKey"] == {"id": n}
                assert time.monotonic() - sent < 1.0


async def test_watch_and_metrics_say_how_changes_are_captured(pg: PostgresDB) -> None:
    done = await pg.watch_command("orders")
    assert done.returncode == 0, done.stderr
    # A new log is written by triggers until a server chooses (--pg-capture).
    assert "capture: snapshot-ordered log" in done.stdout
    capture = {"trigger": "snapshot-ordered log", "logical": "logical decoding"}[pg.capture]
    server = pg.start()
    again = await pg.watch_command("orders")
    assert f"capture: {capture}" in again.stdout
    async with httpx.AsyncClient(timeout=10) as client:
        await insert(client, server.url, {"username": "a", "content": "b"})
        await pg.published_all()

        async def metrics() -> dict[str, str]:
            text = (await client.get(f"{server.url}/metrics")).text
            return dict(line.rsplit(" ", 1) for line in text.splitlines()
                        if line and not line.startswith("#"))

        found = await metrics()
        info = f'tidings_feed_info{{backend="postgresql",capture="{capture}"}}'
        assert found[info] == "1"
        assert found["tidings_feed_leading"] == "1"
        assert int(found["tidings_feed_published_position"]) == 1
        assert float(found["tidings_feed_lag_seconds"]) == 0.0
        # Logical decoding: how much WAL the slot keeps (bounded by max_slot_wal_keep_size).
        assert ("tidings_feed_slot_lag_bytes" in found) == (pg.capture == "logical")
        if pg.capture == "logical":
            assert 0 <= int(found["tidings_feed_slot_lag_bytes"]) < 1 << 30
            assert found["tidings_feed_slot_streamed"] == "1"  # (`--pg-slot-read auto`)
        else:
            assert "tidings_feed_slot_streamed" not in found


# -- a change log the previous version made ------------------------------------------------

# What the previous version created for a watched table `orders` (its order lock: a
# statement trigger and the row trigger take one advisory lock; seq is the position).
PREVIOUS_VERSION = """
CREATE TABLE tidings_changes (
    seq bigint PRIMARY KEY, coll text NOT NULL, op text NOT NULL, doc_key jsonb NOT NULL,
    old_doc jsonb, new_doc jsonb, wall_time timestamptz NOT NULL);
CREATE SEQUENCE tidings_changes_seq AS bigint;
CREATE TABLE tidings_feed_state (name text PRIMARY KEY, value text NOT NULL);
CREATE TABLE tidings_watched (name text PRIMARY KEY, key text NOT NULL, read text NOT NULL);
INSERT INTO tidings_feed_state VALUES ('epoch', 'abcd0123'), ('cursor', '0'),
    ('pruned_through', '0');
INSERT INTO tidings_watched VALUES ('orders', 'id', 'public');
CREATE FUNCTION {schema}.tidings_lock() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_advisory_xact_lock(42); RETURN NULL; END $$;
CREATE FUNCTION {schema}.tidings_capture() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE new_doc jsonb; old_doc jsonb;
BEGIN
    IF TG_OP <> 'INSERT' THEN old_doc := to_jsonb(OLD); END IF;
    IF TG_OP <> 'DELETE' THEN new_doc := to_jsonb(NEW); END IF;
    PERFORM pg_advisory_xact_lock(42);
    INSERT INTO {schema}.tidings_changes (seq, coll, op, doc_key, old_doc, new_doc, wall_time)
    VALUES (nextval('{schema}.tidings_changes_seq'), TG_ARGV[0], lower(TG_OP),
            jsonb_build_object(TG_ARGV[1], coalesce(new_doc, old_doc) -> TG_ARGV[1]),
            old_doc, new_doc, clock_timestamp());
    RETURN NULL;
END $$;
CREATE TRIGGER tidings_lock BEFORE INSERT OR UPDATE OR DELETE ON orders
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.tidings_lock();
CREATE TRIGGER tidings_capture AFTER INSERT OR UPDATE OR DELETE ON orders
    FOR EACH ROW EXECUTE FUNCTION {schema}.tidings_capture('orders', 'id', 'table');
"""


async def test_a_log_of_the_previous_version_is_upgraded_in_place(
        pg_trigger: PostgresDB) -> None:
    """The previous version's log (seq order = commit order, under its order lock) keeps
    its positions: its unpublished changes are published with their seq, tokens into it
    (a gap included) resume, new changes follow it; the order lock is gone."""
    pg = pg_trigger
    await pg.execute(PREVIOUS_VERSION.format(schema=pg.schema))
    async with pg.connection() as conn:
        await conn.execute("INSERT INTO orders (id, item) VALUES (1, 'old 1')")
        await conn.execute("INSERT INTO orders (id, item) VALUES (2, 'old 2')")
        tx = conn.transaction()
        await tx.start()
        await conn.execute("INSERT INTO orders (id, item) VALUES (3, 'x')")  # seq 3...
        await tx.rollback()  # ...rolled back: a gap
        await conn.execute("UPDATE orders SET qty = 5 WHERE id = 2")  # seq 4
    server = pg.start(config=None)
    triggers = await pg.fetch("SELECT tgname FROM pg_trigger WHERE tgrelid = 'orders'::regclass "
                              "ORDER BY tgname")
    assert [r["tgname"] for r in triggers] == ["tidings_capture", "tidings_truncate"]
    assert await pg.fetchval("SELECT to_regproc('tidings_lock')") is None
    async with httpx.AsyncClient(timeout=10) as client:
        await pg.execute("INSERT INTO orders (id, item) VALUES (10, 'new')")
        for token, expected in (("abcd0123.0", [1, 2, 4, 5]), ("abcd0123.2", [4, 5]),
                                ("abcd0123.3", [4, 5])):
            async with watch(client, server.url, "orders", [("resume_after", token)]) as stream:
                assert stream.response.status_code == 200, token
                events = await stream.take(len(expected))
                assert [seq_of(e.id or "") for e in events] == expected, token
                assert await stream.nothing_within(0.3)
        assert payload(events[-1])["documentKey"] == {"id": 10}
        listed = await client.get(f"{server.url}/api/collections/orders")
        assert listed.json()["resume_token"] == "abcd0123.5"


async def test_the_saved_cursor_never_passes_what_the_hub_stored(pg: PostgresDB) -> None:
    """The tailer reads the next page while the hub stores the one before; the cursor it
    saves in the database (where a restarted tailer resumes) must still be only what the
    hub acknowledged. (It saved the read's start, a page not yet stored: a restart right
    then skipped that page for good.) Looked at in one snapshot, over and over, while four
    writers commit."""
    server = pg.start()
    assert server.proc is not None
    state, updates = "tidings_feed_state", pg.updates
    look = (f"SELECT (SELECT value::bigint FROM {state} WHERE name = 'cursor'), "
            f"(SELECT split_part(id, '.', 2)::bigint FROM {updates} "
            f"WHERE topics ? '/collections/orders' ORDER BY seq DESC LIMIT 1)")
    writing = True
    counter = iter(range(1, 1_000_000))

    async def writer() -> None:
        async with pg.connection() as conn:
            for _ in range(200):
                async with conn.transaction():
                    for _ in range(random.randint(1, 10)):
                        await conn.execute("INSERT INTO orders (id, item) VALUES ($1, 'c')",
                                           next(counter))
                await asyncio.sleep(0.002)  # many pages, so many saves

    looks: list[tuple[int, int]] = []

    async def looker() -> None:
        async with pg.connection() as conn:
            while writing:
                cursor, stored = await conn.fetchrow(look)
                looks.append((cursor or 0, stored or 0))

    async with anyio.create_task_group() as group:
        group.start_soon(looker)
        async with anyio.create_task_group() as writers:
            for _ in range(4):
                writers.start_soon(writer)
        await pg.published_all()
        writing = False

    ahead = [(cursor, stored) for cursor, stored in looks if cursor > stored]
    moving = {cursor for cursor, _ in looks}
    # Logical decoding reads bigger pages (about 20 places here, the trigger 200).
    assert len(moving) > 3, "the cursor was seen at too few places to tell"
    assert not ahead, f"saved cursor past the hub's history: {ahead[:5]} of {len(looks)}"


# -- a restart of the PostgreSQL server ------------------------------------------------------


def _restart_command() -> list[str]:
    """`pg_ctlcluster VERSION main restart` (TIDINGS_TEST_PG_CLUSTER="VERSION NAME" to
    choose): it really stops the server process. Skips (fails under CI=true) where it
    cannot run: not root, or no pg_ctlcluster."""
    cluster = os.environ.get("TIDINGS_TEST_PG_CLUSTER", "").split()
    if not cluster and os.path.isdir("/etc/postgresql"):
        versions = sorted(os.listdir("/etc/postgresql"))
        cluster = [versions[-1], "main"] if versions else []
    reason = ("restarting PostgreSQL needs root" if os.geteuid() != 0
              else "no pg_ctlcluster" if shutil.which("pg_ctlcluster") is None
              else "no PostgreSQL cluster in /etc/postgresql" if len(cluster) != 2 else "")
    if reason:
        unavailable(reason)
    return ["pg_ctlcluster", "--skip-systemctl-redirect", *cluster, "restart"]


async def test_a_postgresql_restart_loses_and_repeats_nothing(pg: PostgresDB) -> None:
    """The server process really stops and starts while writers commit and a subscriber
    streams: Tidings reconnects by itself (the tailer, the hub's history) and every change
    that committed arrives exactly once, in order. A writer whose COMMIT was cut off does
    not know whether it committed: the table says (the changes are its rows).

    Restarts the test server: run it alone (`flock /tmp/pg-restart.lock pytest -k
    restart ...`), other tests fail while it is down."""
    command = _restart_command()
    server = pg.start()
    stop_writing = asyncio.Event()
    counter = iter(range(1, 1_000_000))

    stopped: list[None] = []  # one per writer that has ended (its last commit done)

    async def writer() -> None:
        try:
            await write()
        finally:
            stopped.append(None)

    async def all_stopped() -> bool:
        return len(stopped) == 4

    async def write() -> None:
        while not stop_writing.is_set():
            try:
                async with pg.connection() as conn:
                    while not stop_writing.is_set():
                        async with conn.transaction():
                            for _ in range(random.randint(1, 3)):
                                await conn.execute(
                                    "INSERT INTO orders (id, item) VALUES ($1, 'r')",
                                    next(counter))
                        await asyncio.sleep(0.01)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
                    asyncpg.exceptions.InternalClientError):
                await asyncio.sleep(0.1)  # the server is going or gone: try again

    received: list[Event] = []
    live = asyncio.Event()

    async def subscriber(client: httpx.AsyncClient) -> None:
        """A client that resumes after its last event whenever its stream ends."""
        while True:
            params = [("resume_after", received[-1].id or "")] if received else []
            try:
                async with watch(client, server.url, "orders", params) as stream:
                    if stream.response.status_code != 200:
                        await asyncio.sleep(0.2)  # 503 while PostgreSQL is down
                        continue
                    live.set()
                    while True:
                        received.append(await stream.next(timeout_s=3600))
            except (httpx.HTTPError, StopAsyncIteration):
                await asyncio.sleep(0.2)

    async with httpx.AsyncClient(timeout=10) as client:
        async with anyio.create_task_group() as group:
            group.start_soon(subscriber, client)
            await live.wait()  # registered: it streams from here on
            await pg.execute("INSERT INTO orders (id, item) VALUES (0, 'first')")
            await eventually(lambda: _arrived(received, 1), timeout_s=10)
            for _ in range(4):
                group.start_soon(writer)
            await asyncio.sleep(1.0)
            done = await asyncio.to_thread(subprocess.run, command, capture_output=True,
                                           text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            await asyncio.sleep(2.0)  # writers reconnect and commit again
            stop_writing.set()
            # A writer inside a transaction commits it before it sees the stop.
            await eventually(all_stopped, timeout_s=10)
            committed = {int(r["id"]) for r in await pg.fetch("SELECT id FROM orders")}
            with contextlib.suppress(AssertionError):  # the assertions below say what is amiss
                await eventually(lambda: _arrived(received, len(committed)), timeout_s=30)
            await asyncio.sleep(0.5)  # anything more would be a repeat
            group.cancel_scope.cancel()

    ids = [int(payload(e)["documentKey"]["id"]) for e in received]  # type: ignore[index]
    positions = [seq_of(e.id or "") for e in received]
    assert len(committed) > 50
    missing, repeated = sorted(committed - set(ids)), len(ids) - len(set(ids))
    assert not missing and not repeated and len(ids) == len(committed), (
        f"{len(committed)} committed, {len(ids)} received, {repeated} repeated, "
        f"missing {missing[:20]} (last received {received[-1].id if received else None}); "
        f"server log:\n{server.log()[-4000:]}")
    assert positions == list(range(1, len(positions) + 1))
    assert server.proc is not None and server.proc.poll() is None  # it rode it out


async def _arrived(received: list[Event], count: int) -> bool:
    return len(received) >= count
