"""What only capture by logical decoding has (docs/feeds.md, "Capture by logical
decoding"): the choice at start-up (`--pg-capture auto` falls back to triggers where the
role may not replicate; `logical` refuses), switching between the two ways of capturing
while writers commit without losing or repeating a change, and a lost replication slot,
after which older resume tokens get the too-old error instead of a silent gap.

The contract both ways keep is test_feeds.py and test_feeds_postgres.py (parametrized
over the capture). Each test has a schema of its own; its slot is dropped afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from typing import cast
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg2
import pytest
from psycopg2.extras import LogicalReplicationConnection

from tests.conftest import KEY
from tests.integration.conftest import drop_slot
from tests.integration.feed_backends import (
    PostgresDB,
    eventually,
    insert,
    payload,
    seq_of,
    watch,
)
from tidings.feeds.postgres.capture import ChangeLog
from tidings.feeds.postgres.stream import libpq_dsn
from tidings.pgdb import Connection

pytestmark = pytest.mark.anyio


async def _metrics(client: httpx.AsyncClient, url: str) -> dict[str, str]:
    text = (await client.get(f"{url}/metrics")).text
    return dict(line.rsplit(" ", 1) for line in text.splitlines()
                if line and not line.startswith("#"))


def _info(capture: str) -> str:
    return f'tidings_feed_info{{backend="postgresql",capture="{capture}"}}'


@contextlib.asynccontextmanager
async def _role_without_replication(pg: PostgresDB) -> AsyncIterator[str]:
    """A login role that owns the test's schema and tables but may not replicate."""
    role = "tf_norepl_" + uuid.uuid4().hex[:8]
    await pg.execute(f"CREATE ROLE {role} LOGIN NOSUPERUSER NOREPLICATION; "
                     f"GRANT ALL ON SCHEMA {pg.schema} TO {role}; "
                     f"ALTER TABLE orders OWNER TO {role}")
    url = pg.url
    try:
        yield role
    finally:
        pg.url = url
        await pg.execute(f"REASSIGN OWNED BY {role} TO CURRENT_USER; DROP OWNED BY {role}; "
                         f"DROP ROLE {role}")


async def test_auto_falls_back_to_triggers_and_logical_refuses(pg_logical: PostgresDB) -> None:
    pg = pg_logical
    async with _role_without_replication(pg) as role:
        parts = urlsplit(pg.url)
        pg.url = urlunsplit(parts._replace(netloc=f"{role}@{parts.netloc.split('@')[-1]}"))
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "tidings", "serve", "--port", "0", "--jwt-key", KEY,
             "--db", pg.url, "--pg-capture", "logical", *pg._config_args(pg.config)],
            capture_output=True, text=True, timeout=30, cwd=pg.workdir)
        assert done.returncode != 0
        assert "--pg-capture logical: the role has neither REPLICATION nor SUPERUSER" in (
            done.stderr)
        pg.capture = "auto"
        server = pg.start("--log-level", "info")
        async with httpx.AsyncClient(timeout=10) as client:
            await insert(client, server.url, {"username": "a", "content": "b"})
            found = await _metrics(client, server.url)
            assert found[_info("snapshot-ordered log")] == "1"
            assert "tidings_feed_slot_lag_bytes" not in found
        assert "logical decoding unavailable: the role has neither REPLICATION" in server.log()
        server.stop()
        assert await pg.fetchval("SELECT count(*) FROM pg_trigger WHERE tgrelid = "
                                 "'orders'::regclass AND tgname LIKE 'tidings_%'") == 2


async def _writer(pg: PostgresDB, stop: asyncio.Event, committed: list[int]) -> None:
    """Inserts orders, one to three a transaction, until `stop`; notes what committed."""
    async with pg.connection() as conn:
        n = 1
        while not stop.is_set():
            ids = list(range(n, n + 1 + n % 3))
            n = ids[-1] + 1
            async with conn.transaction():
                for i in ids:
                    await conn.execute("INSERT INTO orders (id, item) VALUES ($1, 'w')", i)
            committed.extend(ids)
            await asyncio.sleep(0.005)


async def _triggers(pg: PostgresDB) -> int:
    return int(str(await pg.fetchval(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'orders'::regclass "
        "AND tgname LIKE 'tidings_%'")))


async def test_switching_the_capture_loses_and_repeats_nothing(pg_trigger: PostgresDB) -> None:
    """Triggers, then a second server that starts with logical decoding (it switches the
    schema: the first one's tailer follows), then a third with triggers again (it decodes
    what the slot still holds and drops it), while a writer commits all along: every
    committed change is in the feed once, at dense positions."""
    pg = pg_trigger
    first = pg.start()
    stop, committed = asyncio.Event(), list[int]()
    writing = asyncio.create_task(_writer(pg, stop, committed))
    try:
        await _more(committed)
        pg.capture = "logical"
        # Started off the loop: the writer goes on meanwhile, as another program would
        # (a transaction left open would hold up the replication slot's creation).
        second = await asyncio.to_thread(pg.start)
        assert await _triggers(pg) == 0
        assert await pg.fetchval("SELECT value FROM tidings_feed_state "
                                 "WHERE name = 'capture'") == "logical"
        await _more(committed)
        first.stop()  # the second one tails from here on
        await _more(committed)
        pg.capture = "trigger"
        third = await asyncio.to_thread(pg.start)
        assert await _triggers(pg) == 2
        assert await pg.fetchval("SELECT count(*) FROM pg_replication_slots "
                                 "WHERE slot_name = $1", _slot(pg)) == 0
        await _more(committed)
        second.stop()
    finally:
        stop.set()
        await writing
    assert sorted(committed) == list(range(1, len(committed) + 1))
    async with httpx.AsyncClient(timeout=10) as client:
        await pg.published_all()
        epoch = str(await pg.fetchval("SELECT value FROM tidings_feed_state "
                                      "WHERE name = 'epoch'"))
        async with watch(client, third.url, "orders",
                         [("resume_after", f"{epoch}.0")]) as stream:
            events = await stream.take(len(committed), timeout_s=30)
            assert await stream.nothing_within(0.3)
    ids = [int(str(payload(e)["documentKey"]["id"])) for e in events]  # type: ignore[index]
    assert sorted(ids) == committed, "a committed change was lost or repeated"
    assert [seq_of(e.id or "") for e in events] == list(range(1, len(committed) + 1))


def _slot(pg: PostgresDB) -> str:
    from tidings.feeds.postgres.decoding import slot_name

    return slot_name(pg.db_name, pg.schema)


async def _more(committed: list[int], count: int = 20) -> None:
    """Until the writer has committed `count` more transactions' changes."""
    target = len(committed) + count

    async def enough() -> bool:
        return len(committed) >= target

    await eventually(enough)


async def test_a_lost_slot_makes_older_tokens_too_old(pg_logical: PostgresDB) -> None:
    """While no server runs, a change commits and the slot is dropped (as PostgreSQL
    invalidates one past max_slot_wal_keep_size): that change is lost to the feed, so a
    token from before must get resume_token_too_old, not a silent gap. A new slot takes
    over; later changes and tokens work."""
    pg = pg_logical
    server = pg.start()
    async with httpx.AsyncClient(timeout=10) as client:
        old = (await insert(client, server.url, {"username": "a", "content": "0"})).headers[
            "tidings-resume-token"]
        await pg.published_all()
    server.stop()
    await pg.execute("INSERT INTO orders (id, item) VALUES (1, 'while the slot went')")
    async with pg.connection() as conn:
        await drop_slot(conn, pg.schema)
    server = pg.start()
    await eventually(lambda: pg.state_at_least("gap_through", 1))
    assert "replication slot" in server.log() and "lost" in server.log()
    async with httpx.AsyncClient(timeout=10) as client:
        async with watch(client, server.url, "orders", [("resume_after", old)]) as stream:
            event = await stream.next()
            assert event.event == "error"
            error = payload(event)
            assert error["code"] == "resume_token_too_old" and "slot" in str(error["error"])
        snapshot = (await client.get(f"{server.url}/api/collections/orders")).json()
        async with watch(client, server.url, "orders",
                         [("resume_after", snapshot["resume_token"])]) as stream:
            await pg.execute("INSERT INTO orders (id, item) VALUES (2, 'after')")
            assert payload(await stream.next())["documentKey"] == {"id": 2}



async def test_a_step_decoded_again_adds_no_row_twice(pg_logical: PostgresDB) -> None:
    """A tailer that dies after its step committed the changes it decoded, but before it
    moved the slot past them, decodes them again when it comes back: they must not enter
    the log twice. Two fresh decoders (nothing in memory, as after that crash) step over
    the same WAL without moving the slot in between."""
    pg = pg_logical
    server = pg.start()
    async with httpx.AsyncClient(timeout=10) as client:
        await insert(client, server.url, {"username": "a", "content": "0"})
        await pg.published_all()
    server.stop()  # (gracefully: the slot has moved past everything so far)
    await pg.execute("INSERT INTO orders (item, qty) SELECT 'row ' || i, i "
                     "FROM generate_series(1, 5) i; "
                     "INSERT INTO orders (item, qty) VALUES ('one more', 6)")
    changes = ChangeLog.of(pg.schema)
    async with pg.connection() as conn:
        for again in (False, True):
            decoder = changes.decoder(pg.db_name)
            if again:  # (the first one's SQL functions leave the slot where it was)
                decoder.dsn, decoder.slot_read = pg.url, pg.slot_read
            try:
                done = await decoder.step(cast(Connection, conn))
            finally:
                await decoder.close_readers()
            assert done.mode == "logical"
            assert (done.streamed is not None) == (again and pg.slot_read == "stream")
        counts = await conn.fetch(
            "SELECT new_doc ->> 'item' AS item, count(*) FROM tidings_changes "
            "WHERE coll = 'orders' AND op = 'insert' GROUP BY 1 ORDER BY 1")
    assert {r["item"]: r["count"] for r in counts} == {
        **{f"row {i}": 1 for i in range(1, 6)}, "one more": 1}


def _replication_connection(pg: PostgresDB) -> psycopg2.extensions.connection:
    """A replication connection of the test's own (blocking: run it in a thread)."""
    return psycopg2.connect(libpq_dsn(pg.url), connection_factory=LogicalReplicationConnection)


async def _sees_a_new_change(pg: PostgresDB, url: str, key: int) -> dict[str, str]:
    """A watch from a fresh snapshot gets the row `key` inserted after it; then /metrics."""
    async with httpx.AsyncClient(timeout=10) as client:
        snapshot = (await client.get(f"{url}/api/collections/orders")).json()
        async with watch(client, url, "orders",
                         [("resume_after", snapshot["resume_token"])]) as stream:
            await pg.execute(f"INSERT INTO orders (id, item) VALUES ({key:d}, 'new')")
            assert payload(await stream.next())["documentKey"] == {"id": key}
        return await _metrics(client, url)


async def test_other_tables_writers_do_not_make_the_streamed_tailer_step(
        pg_trigger: PostgresDB) -> None:
    """Writes to a table nobody captures move the WAL but bring nothing on the stream: the
    idle streamed tailer does not step for them (it stepped for each before, which cost
    those writers a quarter of their rate), and still sees the next captured change. (With
    SQL functions it cannot tell without decoding: it steps whenever the WAL moves.)"""
    pg = pg_trigger
    pg.capture, pg.slot_read = "logical", "stream"
    await pg.execute("CREATE TABLE elsewhere (id int PRIMARY KEY)")
    server = pg.start()
    async with httpx.AsyncClient(timeout=10) as client:
        await _sees_a_new_change(pg, server.url, 11)
        await asyncio.sleep(0.5)  # (the step after a copy, and the quiet spell)
        before = int((await _metrics(client, server.url))["tidings_feed_slot_steps_total"])
        for i in range(100):
            await pg.execute(f"INSERT INTO elsewhere (id) VALUES ({i})")
        after = int((await _metrics(client, server.url))["tidings_feed_slot_steps_total"])
    await _sees_a_new_change(pg, server.url, 12)
    server.stop()
    # (At most the step every 5 s, and the writes' last WAL reaching the stream late.)
    assert after - before <= 3, f"{after - before} steps for 100 other transactions"


async def test_a_backlog_larger_than_the_stream_keeps_is_copied_in_parts(
        pg_trigger: PostgresDB) -> None:
    """Streamed, a step finds a backlog of more messages than the stream keeps in memory
    (`SlotStream.limit`, here 20): it copies the whole transactions among them without a
    tick, and the next step goes on; the tick comes with the step that reaches its WAL
    position. Every change is in the log once, and the ticks cover them all."""
    from tidings.feeds.postgres.stream import SlotStream

    pg = pg_trigger
    pg.capture = "logical"
    server = pg.start()
    async with httpx.AsyncClient(timeout=10) as client:
        await insert(client, server.url, {"username": "a", "content": "0"})
        await pg.published_all()
    server.stop()
    for i in range(1, 31):
        await pg.execute(f"INSERT INTO orders (id, item) VALUES ({i}, 'backlog')")
    changes = ChangeLog.of(pg.schema)
    decoder = changes.decoder(pg.db_name)
    decoder.dsn, decoder.slot_read = pg.url, "stream"
    decoder.stream = await SlotStream.open(pg.url, decoder.slot, decoder.publication,
                                           application_name="test")
    decoder.stream.limit = 20
    parts = 0
    async with pg.connection() as conn:
        try:
            for _ in range(100):
                done = await decoder.step(cast(Connection, conn))
                if not done.partial:
                    break
                parts += 1
        finally:
            await decoder.close_readers()
        assert not done.partial and parts >= 3
        counts = await conn.fetch(
            "SELECT new_doc ->> 'id' AS id, count(*) FROM tidings_changes "
            "WHERE coll = 'orders' AND new_doc ->> 'item' = 'backlog' GROUP BY 1")
        assert sorted(int(r["id"]) for r in counts) == list(range(1, 31))
        assert {r["count"] for r in counts} == {1}
        assert await conn.fetchval("SELECT max(through) FROM tidings_ticks") == (
            await conn.fetchval("SELECT count(*) FROM tidings_changes"))


async def test_a_new_tailer_takes_the_slot_from_a_stale_stream(pg_logical: PostgresDB) -> None:
    """A replication connection left on the slot (a stalled tailer's, which the server
    would end only after wal_sender_timeout) is ended by the next tailer, which then
    streams the slot itself (`--pg-slot-read stream`) or reads it with SQL functions."""
    from tidings.feeds.postgres.decoding import publication_name

    pg = pg_logical
    pg.start().stop()  # (creates the slot)

    def hold() -> psycopg2.extensions.connection:
        conn = _replication_connection(pg)
        conn.cursor().start_replication(
            slot_name=_slot(pg), decode=False, options={
                "proto_version": "1",
                "publication_names": publication_name(pg.db_name, pg.schema)})
        return conn

    stale = await asyncio.to_thread(hold)
    try:
        server = pg.start()
        found = await _sees_a_new_change(pg, server.url, 7)
        assert found["tidings_feed_slot_streamed"] == str(int(pg.slot_read == "stream"))
        readers = [r["application_name"] for r in await pg.fetch(
            "SELECT application_name FROM pg_stat_replication r JOIN pg_replication_slots "
            "s ON s.active_pid = r.pid WHERE s.slot_name = $1", _slot(pg))]
        assert readers == ([f"tidings-feed-stream:{pg.schema}"] if pg.slot_read == "stream"
                           else [])
        server.stop()
    finally:
        stale.close()


async def test_auto_reads_with_sql_functions_where_the_server_will_not_stream(
        pg_trigger: PostgresDB) -> None:
    """`--pg-slot-read auto` where the server refuses a replication connection (here: every
    WAL sender taken) says why in the log and reads the slot with the SQL functions."""
    pg = pg_trigger
    pg.capture, pg.slot_read = "logical", "auto"

    def take_wal_senders() -> list[psycopg2.extensions.connection]:
        taken = []
        with contextlib.suppress(psycopg2.OperationalError):
            for _ in range(100):
                taken.append(_replication_connection(pg))
        return taken

    taken = await asyncio.to_thread(take_wal_senders)
    try:
        server = pg.start("--log-level", "info")
        found = await _sees_a_new_change(pg, server.url, 8)
        assert found["tidings_feed_slot_streamed"] == "0"
        assert "max_wal_senders" in server.log()
        assert "reading slot" in server.log() and "with SQL functions" in server.log()
        server.stop()
    finally:
        for conn in taken:
            conn.close()


async def test_an_idle_tailer_s_wait_for_wal_ends_when_the_wal_moves(
        pg_logical: PostgresDB) -> None:
    """The idle tailer waits in the server for the WAL to pass its last step
    (`tidings_wal_moved`): true as soon as it has, false at the end of the wait when it
    has not (a position no WAL reaches)."""
    pg = pg_logical
    server = pg.start()  # (sets the log up, with its functions)
    server.stop()
    sql = ChangeLog.of(pg.schema).wal_moved_sql()
    async with pg.connection() as conn, pg.connection() as writer:
        assert await conn.fetchval(sql, "FFFFFFFF/0", 50) is False
        now = await conn.fetchval("SELECT pg_current_wal_insert_lsn()::text")
        waiting = asyncio.create_task(conn.fetchval(sql, now, 20_000))
        await asyncio.sleep(0.1)
        await writer.execute("INSERT INTO orders (item, qty) VALUES ('wakes it', 1)")
        assert await asyncio.wait_for(waiting, 10) is True
