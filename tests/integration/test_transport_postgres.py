"""What the PostgreSQL transport adds to the shared contract (test_transports.py): seq in
commit order under contention from several processes, a retried publish stored once even
when the copies race, failing fast (503) when the server is away, a tail that resumes
without loss or duplicates after its connection is killed, and retention that never lets
a position be reused.

Runs against the shared server at TIDINGS_TEST_POSTGRES_URL, each test in a namespace of
its own (its table is dropped afterwards); it never restarts the server and terminates only
backends this test opened. Waits are bounded by deadlines, never timed sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import cast

import anyio
import asyncpg
import pytest

from tests.services import POSTGRES_URL, require
from tidings.errors import BadRequest, ServiceUnavailable, TransportClosed
from tidings.hub.update import Update
from tidings.transports import open_transport
from tidings.transports.postgres import PostgresTransport

pytestmark = pytest.mark.anyio

Opener = Callable[..., Awaitable[PostgresTransport]]


def update(n: int, **kw: object) -> Update:
    return Update.create([f"/p/{n % 2}"], f"data {n}", **kw)  # type: ignore[arg-type]


def with_namespace(url: str, namespace: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}namespace={namespace}"


# -- no server -------------------------------------------------------------------------


def test_the_namespace_is_checked_and_kept_out_of_the_dsn() -> None:
    for bad in ("has space", "", "UPPER", "1digit", "x" * 49, "semi;colon"):
        with pytest.raises(BadRequest):
            open_transport(f"postgresql://127.0.0.1:5432/test?namespace={bad}")
    t = PostgresTransport.from_url("postgres://u:secret@db:5433/hub?sslmode=disable&namespace=n1")
    assert (t.namespace, t.table, t.channel) == ("n1", "n1_updates", "n1_updates")
    assert t._dsn == "postgres://u:secret@db:5433/hub?sslmode=disable"
    assert "secret" not in t._where
    default = open_transport("postgresql://127.0.0.1:5432/test")
    assert isinstance(default, PostgresTransport) and default.table == "tidings_updates"
    # One lock per namespace, the same on every process.
    assert t.lock_key == PostgresTransport.from_url("postgresql:///x?namespace=n1").lock_key
    assert t.lock_key != default.lock_key


async def test_an_unreachable_server_fails_fast_with_503() -> None:
    t = open_transport("postgresql://127.0.0.1:1/test")
    began = time.monotonic()
    with pytest.raises(ServiceUnavailable):
        await t.start()
    with pytest.raises(ServiceUnavailable):
        await t.append(update(0))  # never started: refused, not dropped
    assert time.monotonic() - began < 5
    await t.close()
    await t.close()  # idempotent
    with pytest.raises(TransportClosed):
        await t.append(update(0))


# -- against PostgreSQL ----------------------------------------------------------------


@pytest.fixture
async def raw() -> AsyncIterator[asyncpg.Connection]:
    """A plain connection to the test server, to inspect tables and kill backends."""
    conn = await asyncpg.connect(require(POSTGRES_URL))
    yield conn
    await conn.close()


@pytest.fixture
async def namespace() -> AsyncIterator[str]:
    name = "t" + uuid.uuid4().hex[:12]
    yield name
    cleanup = PostgresTransport.from_url(with_namespace(require(POSTGRES_URL), name))
    await cleanup.start()
    await cleanup.destroy()
    await cleanup.close()


@pytest.fixture
async def opener(namespace: str) -> AsyncIterator[Opener]:
    """Opens started transports on one namespace, as several processes would."""
    url = with_namespace(require(POSTGRES_URL), namespace)
    opened: list[PostgresTransport] = []

    async def open_(**options: object) -> PostgresTransport:
        transport = open_transport(url, **options)  # type: ignore[arg-type]
        assert isinstance(transport, PostgresTransport)
        opened.append(transport)
        await transport.start()
        return transport

    yield open_
    for transport in opened:
        await transport.close()


class Collector:
    """Runs `transport.tail(after)` in a task and keeps what it yields."""

    def __init__(self, transport: PostgresTransport, after: int) -> None:
        self.seen: list[Update] = []
        self._changed = asyncio.Event()
        self.task = asyncio.create_task(self._run(transport, after))

    async def _run(self, transport: PostgresTransport, after: int) -> None:
        try:
            async for u in transport.tail(after):
                self.seen.append(u)
                self._changed.set()
        finally:
            self._changed.set()

    async def until(self, count: int, timeout_s: float = 15.0) -> list[Update]:
        with anyio.fail_after(timeout_s):
            while len(self.seen) < count and not self.task.done():
                self._changed.clear()
                await self._changed.wait()
        assert len(self.seen) >= count, self.task.exception() if self.task.done() else None
        return self.seen

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def test_seq_follows_commit_order_under_contention(
    opener: Opener, raw: asyncpg.Connection
) -> None:
    """4 processes x 100 concurrent appends, half of them queued behind another session
    that holds the append lock for a while: the tailer sees every seq once, in order,
    without a gap, and the seqs are those the appenders were given."""
    writers = [await opener() for _ in range(4)]
    tailer = await opener()
    collector = Collector(tailer, 0)

    def wave(first: int) -> list[asyncio.Task[Update]]:
        return [
            asyncio.create_task(w.append(update(first + i * 50 + n)))
            for i, w in enumerate(writers)
            for n in range(50)
        ]

    count = f"SELECT count(*) FROM {tailer.table}"
    before = wave(0)
    # A slow transaction elsewhere that takes the same lock (as a second hub would): while
    # it holds it, nothing can be appended, however many appends wait.
    async with raw.transaction():
        await raw.execute("SELECT pg_advisory_xact_lock($1)", tailer.lock_key)
        committed = await raw.fetchval(count)
        during = wave(200)
        await asyncio.sleep(0.2)  # hold the lock while the second wave queues up
        assert await raw.fetchval(count) == committed
        assert not any(task.done() for task in during)
    stored = await asyncio.gather(*before, *during)

    seen = await collector.until(400)
    await collector.stop()
    seqs = [u.seq for u in seen]
    assert seqs == list(range(seqs[0], seqs[0] + 400)), "a gap, a duplicate or out of order"
    assert {u.seq: u.id for u in stored} == {u.seq: u.id for u in seen}
    assert [u.seq for u in await tailer.read_after(0, 1000)] == seqs
    assert max(w.last_seq for w in writers) == seqs[-1]
    # Each process's appends keep the order it made them in.
    for i in range(4):
        mine = [u.seq for u in stored if int(u.data.split()[1]) % 200 // 50 == i]
        assert mine == sorted(mine)


async def test_many_appends_in_one_commit_and_a_failure_stores_a_prefix(
    opener: Opener, raw: asyncpg.Connection
) -> None:
    """`append_many` (what the feeds' tailers publish a page with) stores its updates in
    order in one transaction; when a batch fails, what was queued behind it fails too,
    unwritten, so what is stored is always a prefix and publishing again keeps order."""
    t = await opener()
    stored = await t.append_many([update(n) for n in range(300)])
    assert [u.seq for u in stored] == list(range(stored[0].seq, stored[0].seq + 300))
    assert [u.data for u in stored] == [f"data {n}" for n in range(300)]
    assert await raw.fetchval(f"SELECT count(DISTINCT xmin::text) FROM {t.table}") == 1

    async def waiting_writer() -> int | None:
        return cast(int | None, await raw.fetchval(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
            "AND ((classid::bigint << 32) | objid::bigint) = $1", t.lock_key))

    async with raw.transaction():
        await raw.execute("SELECT pg_advisory_xact_lock($1)", t.lock_key)
        # 600: more than one batch; the first waits for the lock, the rest queue behind.
        many = asyncio.create_task(t.append_many([update(n) for n in range(1000, 1600)]))
        # Kill the writer's session while it waits (a broken connection may be tried
        # once more on a fresh one, which is killed too).
        with anyio.fail_after(10):
            while not many.done():
                pid = await waiting_writer()
                if pid is not None:
                    await raw.execute("SELECT pg_terminate_backend($1)", pid)
                await asyncio.sleep(0.02)
        with pytest.raises(ServiceUnavailable):
            await many
    assert await raw.fetchval(f"SELECT count(*) FROM {t.table}") == 300
    again = await t.append_many([update(n) for n in range(1000, 1600)])
    assert [u.seq for u in again] == list(range(stored[-1].seq + 1, stored[-1].seq + 601))


async def test_identical_publishes_racing_on_several_processes_are_stored_once(
    opener: Opener, raw: asyncpg.Connection, namespace: str
) -> None:
    transports = [await opener() for _ in range(4)]
    same = update(7, id="retried")
    results = await asyncio.gather(*[t.append(same) for t in transports for _ in range(10)])
    assert {u.seq for u in results} == {results[0].seq}
    assert await raw.fetchval(f"SELECT count(*) FROM {namespace}_updates") == 1
    # A different update under the same id is a new one, and then the id resolves to it.
    changed = await transports[0].append(update(8, id="retried"))
    assert changed.seq == results[0].seq + 1
    found = await transports[1].find("retried")
    assert found is not None and found.seq == changed.seq and found.data == "data 8"


async def test_a_batch_holding_one_update_twice_stores_it_once(
    opener: Opener, raw: asyncpg.Connection, namespace: str
) -> None:
    t = await opener()
    first, other, again = await t.append_many(
        [update(1, id="twice"), update(2), update(1, id="twice")])
    assert again.seq == first.seq and other.seq == first.seq + 1
    assert again.created_at == first.created_at
    assert await raw.fetchval(f"SELECT count(*) FROM {namespace}_updates") == 2


async def test_concurrent_starts_on_a_new_namespace_create_one_table(opener: Opener) -> None:
    transports = await asyncio.gather(*[opener() for _ in range(4)])
    assert {t.last_seq for t in transports} == {0}
    await transports[0].append(update(0))
    assert (await transports[3].read_after(0, 10))[0].data == "data 0"


async def test_tail_resumes_after_its_backend_is_terminated(
    opener: Opener, raw: asyncpg.Connection, namespace: str
) -> None:
    writer, tailer = await opener(), await opener()
    first = [await writer.append(update(n)) for n in range(10)]
    collector = Collector(tailer, 0)
    await collector.until(10)

    killed = await raw.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE application_name = $1",
        f"tidings-listen:{namespace}",
    )
    assert killed == 1
    with anyio.fail_after(10), pytest.raises(ServiceUnavailable):
        await collector.task  # the tail raises instead of waiting forever

    # Published while nobody listens: the table is the truth, not the missed NOTIFYs.
    second = [await writer.append(update(n)) for n in range(10, 20)]
    resumed = Collector(tailer, collector.seen[-1].seq)
    seen = collector.seen + await resumed.until(10)
    third = [await writer.append(update(n)) for n in range(20, 25)]  # live again
    seen = collector.seen + await resumed.until(15)
    await resumed.stop()
    assert [u.id for u in seen] == [u.id for u in first + second + third]
    assert [u.seq for u in seen] == sorted({u.seq for u in seen})


async def test_a_missed_notification_is_caught_by_the_periodic_look(
    opener: Opener, raw: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row committed without a NOTIFY (as if the notification were lost) still reaches
    the tail: the table is the truth, the notification only a wake-up."""
    monkeypatch.setattr("tidings.transports.postgres._RECHECK_S", 0.1)
    t = await opener()
    collector = Collector(t, 0)
    await t.append(update(0))
    await collector.until(1)
    quiet = update(1)
    async with raw.transaction():
        await raw.execute("SELECT pg_advisory_xact_lock($1)", t.lock_key)
        await raw.execute(
            f"INSERT INTO {t.table} (seq, id, topics, data, private, created_at, frame)"
            f" SELECT max(seq) + 1, $1, $2::jsonb, $3, false, now(), $4 FROM {t.table}",
            quiet.id, '["/p/1"]', quiet.data, quiet.frame,
        )
    seen = await collector.until(2)
    await collector.stop()
    assert seen[1].id == quiet.id and seen[1].frame == quiet.frame


async def test_a_lost_server_answers_503_quickly(opener: Opener, namespace: str) -> None:
    """Through a TCP relay that the test cuts: the pool's connections die mid-life and no
    new one can be made, as when the server goes away."""
    relay = Relay()
    await relay.start()
    parts = require(POSTGRES_URL).split("://", 1)[1].split("/", 1)
    t = open_transport(with_namespace(f"postgresql://127.0.0.1:{relay.port}/{parts[1]}",
                                      namespace))
    try:
        await t.start()
        await t.append(update(0))
        collector = Collector(t, 0)
        await collector.until(1)

        await relay.cut()
        began = time.monotonic()
        with pytest.raises(ServiceUnavailable):
            await t.append(update(1))
        with pytest.raises(ServiceUnavailable):
            await t.read_after(0, 10)
        assert time.monotonic() - began < 5
        with anyio.fail_after(10), pytest.raises(ServiceUnavailable):
            await collector.task
    finally:
        await t.close()
        await relay.cut()
    # Nothing half-written: the one acknowledged update is the whole history.
    other = await opener()
    assert [u.data for u in await other.read_after(0, 10)] == ["data 0"]


async def test_retention_never_reuses_a_position(
    opener: Opener, raw: asyncpg.Connection, namespace: str
) -> None:
    t = await opener(history_size=10, history_max_age_s=60)
    stored = [await t.append(update(n)) for n in range(300)]
    # Pruned by itself every 256 appends, without an explicit prune().
    assert await raw.fetchval(f"SELECT count(*) FROM {namespace}_updates") < 300
    assert await t.prune() > 0
    kept = await t.read_after(0, 1000)
    assert [u.seq for u in kept] == [u.seq for u in stored[-10:]]

    # Everything expired: the newest row stays, so max(seq) still counts.
    await raw.execute(
        f"UPDATE {namespace}_updates SET created_at = created_at - interval '1 hour'"
    )
    assert await t.prune() == 9
    assert [u.seq for u in await t.read_after(0, 1000)] == [stored[-1].seq]
    later = await (await opener()).append(update(300))
    assert later.seq == stored[-1].seq + 1
    assert await t.first_seq() == stored[-1].seq


async def test_close_ends_the_tail_and_refuses_appends(opener: Opener) -> None:
    t = await opener()
    collector = Collector(t, 0)
    await t.append(update(0))
    await collector.until(1)
    await t.close()
    with anyio.fail_after(5):
        await collector.task  # ends quietly
    await t.close()
    with pytest.raises(TransportClosed):
        await t.append(update(1))
    with pytest.raises(TransportClosed):
        await t.read_after(0, 1)


class Relay:
    """A TCP relay on 127.0.0.1 to the test server that can be cut (every connection
    aborted, the port closed), so a test can lose the server without touching it."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._pumps: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from urllib.parse import urlsplit

        target = urlsplit(require(POSTGRES_URL))
        try:
            up_reader, up_writer = await asyncio.open_connection(
                target.hostname or "127.0.0.1", target.port or 5432
            )
        except OSError:
            writer.transport.abort()
            return
        self._writers += [writer, up_writer]
        pumps = [asyncio.create_task(self._pump(reader, up_writer)),
                 asyncio.create_task(self._pump(up_reader, writer))]
        self._pumps.update(pumps)
        await asyncio.gather(*pumps)

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.transport.abort()

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()
        for pump in list(self._pumps):
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        self._pumps.clear()


async def test_a_pooled_connection_goes_back_only_in_a_known_state(
    raw: asyncpg.Connection,
) -> None:
    """The pool skips its reset round trip, so `pooled` aborts a connection whose
    operation was cut off or broke (after a server restart the next caller would get it
    mid-error: "another operation is in progress") and keeps one after a clean refusal.
    Which it did shows in the next caller's backend: the same one, or a new one."""
    from tidings.errors import NotFound
    from tidings.pgdb import Pool, open_pool, pooled

    async def backend(pool: Pool) -> int:
        async with pooled(pool) as conn:
            return cast(int, await conn.fetchval("SELECT pg_backend_pid()"))

    pool = await open_pool(require(POSTGRES_URL), application_name="tidings-test-pooled")
    try:
        first = await backend(pool)
        with pytest.raises(NotFound):  # the caller's own error between statements
            async with pooled(pool) as conn:
                await conn.fetchval("SELECT 1")
                raise NotFound("no such thing")
        assert await backend(pool) == first
        with pytest.raises(TimeoutError):  # cut off mid-statement
            async with pooled(pool) as conn:
                await conn.fetch("SELECT pg_sleep(10)", timeout=0.1)
        second = await backend(pool)
        assert second != first
        with pytest.raises(asyncpg.PostgresConnectionError):  # its backend killed
            async with pooled(pool) as conn:
                sleeping = asyncio.create_task(conn.fetch("SELECT pg_sleep(10)"))
                await asyncio.sleep(0.05)  # the statement is on its way
                await raw.execute("SELECT pg_terminate_backend($1)", second)
                await sleeping
        assert await backend(pool) not in (first, second)
    finally:
        await pool.close()
