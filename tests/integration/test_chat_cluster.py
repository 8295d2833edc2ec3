"""The chat's cluster state (`chat/cluster.py`, `chat/shared_presence.py`) on a real
PostgreSQL: two `Cluster`s in this process stand for two Tidings processes (each has its
own process id, pool and LISTEN connection; they share only the database, as processes
do). The same paths over HTTP with real `tidings serve` processes are in
`test_chat_scale_out.py`.

Waits are on events with deadlines; a "killed" process is one whose connections are cut
(`terminate`) and whose heartbeat task is cancelled, so it leaves no goodbye.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from tidings import pgdb
from tidings.chat.cluster import Cluster, ClusterConfig
from tidings.chat.limits import SharedLimit
from tidings.chat.migrations import POSTGRES
from tidings.chat.pg_store import PostgresDatabase
from tidings.chat.shared_presence import SharedPresence

pytestmark = pytest.mark.anyio

HEARTBEAT_S = 1.0


@pytest.fixture
def db_url(_pg_schema: tuple[str, str]) -> str:
    """A schema of the test's own (tests/integration/conftest.py), dropped afterwards."""
    schema, base = _pg_schema
    return f"{base}{'&' if '?' in base else '?'}search_path={schema}"


class Announcements:
    """What presence published, in order, and a way to wait for the next one."""

    def __init__(self) -> None:
        self.seen: list[tuple[str | None, list[str]]] = []
        self._changed = asyncio.Event()

    async def __call__(self, room: str | None, online: list[str]) -> None:
        self.seen.append((room, online))
        self._changed.set()

    async def until(self, wanted: tuple[str | None, list[str]], times: int = 1,
                    timeout_s: float = 10.0) -> None:
        """Wait until `wanted` has been announced `times` times."""
        async with asyncio.timeout(timeout_s):
            while self.seen.count(wanted) < times:
                self._changed.clear()
                await self._changed.wait()

    def of(self, room: str | None) -> list[list[str]]:
        return [online for r, online in self.seen if r == room]


async def started(db_url: str, announced: Announcements,
                  grace_s: float = 0.2) -> tuple[Cluster, SharedPresence]:
    store = PostgresDatabase(db_url)  # the cluster's tables are the chat's migration 2
    await store.open()
    await store.close()
    cluster = Cluster(ClusterConfig(db_url, HEARTBEAT_S))
    presence = SharedPresence(cluster, announced, grace_s)
    await cluster.start()
    await presence.start()
    return cluster, presence


@contextlib.asynccontextmanager
async def process(db_url: str, announced: Announcements,
                  grace_s: float = 0.2) -> AsyncIterator[tuple[Cluster, SharedPresence]]:
    cluster, presence = await started(db_url, announced, grace_s)
    try:
        yield cluster, presence
    finally:
        await presence.close()
        await cluster.stop()


async def kill(cluster: Cluster, presence: SharedPresence) -> None:
    """As SIGKILL would: no more heartbeats, connections cut, nothing said."""
    await presence.close()
    task, cluster._task = cluster._task, None
    assert task is not None
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert cluster._listener is not None and cluster._pool is not None
    cluster._listener.terminate()
    cluster._pool.terminate()
    cluster._listener = cluster._pool = None


async def settled(presence: SharedPresence, room: str | None, online: list[str],
                  timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while await presence.who(room) != online:
            await asyncio.sleep(0.05)


async def test_presence_on_one_process_is_seen_on_the_other(db_url: str) -> None:
    announced = Announcements()
    async with process(db_url, announced) as (_, on_a), process(db_url, announced) as (_, on_b):
        on_a.connect("alice", ["lobby"])
        await announced.until(("lobby", ["alice"]))
        assert await on_b.who("lobby") == ["alice"]
        assert await on_b.who(None) == ["alice"]
        assert await on_b.online_among(["alice", "bob"]) == {"alice"}

        # Bob on B: one announcement of the room's new set, by B.
        bob = on_b.connect("bob", ["lobby"])
        await announced.until(("lobby", ["alice", "bob"]))
        # Alice opens a second window, on B: the set does not change, nothing announced.
        alice_b = on_b.connect("alice", ["lobby"])
        await settled(on_a, "lobby", ["alice", "bob"])
        on_b.disconnect(bob)
        await announced.until(("lobby", ["alice"]), times=2)
        on_b.disconnect(alice_b)  # alice is still on A: still online
        await settled(on_a, None, ["alice"])
        assert announced.of("lobby") == [["alice"], ["alice", "bob"], ["alice"]]
        assert announced.of(None) == [["alice"], ["alice", "bob"], ["alice"]]


async def test_a_reconnect_within_the_grace_period_does_not_flicker(db_url: str) -> None:
    announced = Announcements()
    async with (process(db_url, announced, grace_s=1.0) as (_, on_a),
                process(db_url, announced, grace_s=1.0) as (_, on_b)):
        first = on_a.connect("alice", ["lobby"])
        await announced.until(("lobby", ["alice"]))
        on_a.disconnect(first)
        on_b.connect("alice", ["lobby"])  # the page reconnected, to the other process
        await settled(on_a, "lobby", ["alice"])
        bob = on_a.connect("bob", ["lobby"])  # a later change, to know when A has written
        await announced.until(("lobby", ["alice", "bob"]))
        on_a.disconnect(bob)
        await announced.until(("lobby", ["alice"]), times=2)
        assert announced.of("lobby") == [["alice"], ["alice", "bob"], ["alice"]]


async def test_a_killed_process_s_users_go_offline_after_its_heartbeat_expires(
        db_url: str) -> None:
    announced = Announcements()
    async with process(db_url, announced) as (_, on_a):
        cluster_b, on_b = await started(db_url, announced)
        on_b.connect("bob", ["lobby", "dev"])
        await announced.until(("dev", ["bob"]))  # B is done announcing bob
        on_a.connect("alice", ["lobby"])
        await announced.until(("lobby", ["alice", "bob"]))
        await kill(cluster_b, on_b)
        # A sweeps B once its heartbeat is past the expiry, and announces every room B
        # had people in.
        await announced.until(("dev", []))
        await announced.until(("lobby", ["alice"]))
        await announced.until((None, ["alice"]))
        assert await on_a.who("dev") == []


async def test_claims_are_won_once_and_a_gone_process_s_claims_are_handed_over(
        db_url: str) -> None:
    announced = Announcements()
    async with process(db_url, announced) as (a, _):
        b, on_b = await started(db_url, announced)
        left: list[tuple[tuple[str, str], ...]] = []
        done = asyncio.Event()

        async def expired(leftovers: object) -> None:
            left.append(leftovers.claims)  # type: ignore[attr-defined]
            done.set()

        a.on_expired(expired)
        assert await b.claim("reply", ["1", "2"]) == ["1", "2"]
        assert await a.claim("reply", ["2", "3"]) == ["3"]
        assert await a.owner_live("reply", "1")
        await b.release("reply", "2")
        assert await a.claim("reply", ["2"]) == ["2"]
        await kill(b, on_b)
        async with asyncio.timeout(10):
            await done.wait()
        assert left == [(("reply", "1"),)]
        assert await a.claim("reply", ["1"]) == ["1"]


async def test_messages_reach_every_process(db_url: str) -> None:
    announced = Announcements()
    async with process(db_url, announced) as (a, _), process(db_url, announced) as (b, _):
        got: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        b.on_message(lambda kind, arg: got.put_nowait((kind, arg)))
        await a.send("stop", "42 alice")
        async with asyncio.timeout(5):
            assert await got.get() == ("stop", "42 alice")


async def test_the_rate_limit_holds_across_processes(db_url: str) -> None:
    announced = Announcements()
    async with process(db_url, announced) as (a, _), process(db_url, announced) as (b, _):
        on_a = SharedLimit(a, "post", 3, 60.0)
        on_b = SharedLimit(b, "post", 3, 60.0)
        assert [await on_a.hit("alice"), await on_b.hit("alice"), await on_a.hit("alice")] \
            == [0, 0, 0]
        wait_s = await on_b.hit("alice")
        assert 1 <= wait_s <= 60
        assert await on_a.hit("bob") == 0  # per user
        assert await SharedLimit(a, "login", 3, 60.0).hit("alice") == 0  # per limit
        # Concurrent hits from both: exactly the limit gets through.
        results = await asyncio.gather(*(limit.hit("carol") for limit in (on_a, on_b) * 5))
        assert sorted(results)[:3] == [0, 0, 0] and all(r >= 1 for r in sorted(results)[3:])


async def _hit_rows(db_url: str, key: str) -> list[tuple[int | None, float]]:
    conn = await pgdb.connect(db_url)
    try:
        return [(r[0], r[1]) for r in await conn.fetch(
            "SELECT n, at FROM chat_cluster_hits WHERE key = $1 ORDER BY at", key)]
    finally:
        await conn.close()


async def test_the_rate_limit_slides_and_survives_retention_and_the_upgrade(
        db_url: str) -> None:
    """The window slides (a hit leaves it after `window`), retention deleting expired hits
    changes no answer, and hits taken before migration 4 (not numbered) still count."""
    announced = Announcements()
    async with process(db_url, announced) as (a, _):
        limit = SharedLimit(a, "post", 2, 0.5)
        assert [await limit.hit("dave"), await limit.hit("dave")] == [0, 0]
        assert await limit.hit("dave") == 1
        await asyncio.sleep(0.6)  # both left the window: two more, numbered on
        assert [await limit.hit("dave"), await limit.hit("dave")] == [0, 0]
        assert await limit.hit("dave") == 1
        assert [n for n, _ in await _hit_rows(db_url, "post:dave")] == [1, 2, 3, 4]
        await asyncio.sleep(0.6)
        await a.sweep()  # retention: every hit of dave's has expired
        assert await _hit_rows(db_url, "post:dave") == []
        assert [await limit.hit("dave"), await limit.hit("dave")] == [0, 0]
        assert await limit.hit("dave") == 1

        # Hits as migration 3's function took them, without a number; migration 4 again
        # (it is idempotent) numbers them in time order, and they count.
        conn = await pgdb.connect(db_url)
        try:
            await conn.execute(
                "INSERT INTO chat_cluster_hits (key, at, expires_at) SELECT 'post:erin', "
                "t, t + 60 FROM (SELECT extract(epoch FROM now()) - 3 + i AS t "
                "FROM generate_series(0, 1) i) s")
            await conn.execute(POSTGRES[3])
        finally:
            await conn.close()
        assert [n for n, _ in await _hit_rows(db_url, "post:erin")] == [1, 2]
        assert 1 <= await SharedLimit(a, "post", 2, 60.0).hit("erin") <= 60
        assert await SharedLimit(a, "post", 3, 60.0).hit("erin") == 0
        assert [n for n, _ in await _hit_rows(db_url, "post:erin")] == [1, 2, 3]
