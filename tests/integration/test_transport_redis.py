"""What the Redis transport adds to the shared contract (test_transports.py): the seq
encoding of stream entry ids, a bounded id index, failing fast (503) when Redis is away,
and a tail that resumes without loss or duplicates after its connection is killed.

Runs against the shared Redis at TIDINGS_TEST_REDIS_URL, each test in a namespace of its
own; it never restarts the server and kills only connections this test opened (by id).
Where a test must wait for the server it polls a condition until a bounded deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import cast

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis

from tests.services import REDIS_URL, PrivateRedis, require
from tidings.errors import BadRequest, ServiceUnavailable
from tidings.hub.update import Update
from tidings.transports import open_transport
from tidings.transports.redis import RedisTransport, entry_id_from_seq, seq_from_entry_id

Opener = Callable[..., Awaitable[RedisTransport]]
Fields = dict[bytes, bytes]

# -- seq encoding (no server) --------------------------------------------------------


@given(st.integers(0, 2**43 - 1), st.integers(0, 2**20 - 1))
def test_seq_round_trips_through_the_entry_id(ms: int, n: int) -> None:
    seq = seq_from_entry_id(f"{ms}-{n}")
    assert 0 <= seq < 2**63
    assert entry_id_from_seq(seq) == f"{ms}-{n}"
    assert seq_from_entry_id(entry_id_from_seq(seq).encode()) == seq


@given(st.tuples(st.integers(0, 2**43 - 1), st.integers(0, 2**20 - 1)),
       st.tuples(st.integers(0, 2**43 - 1), st.integers(0, 2**20 - 1)))
def test_seq_orders_like_the_stream(a: tuple[int, int], b: tuple[int, int]) -> None:
    seq_a, seq_b = (seq_from_entry_id(f"{ms}-{n}") for ms, n in (a, b))
    assert (seq_a < seq_b) == (a < b) and (seq_a == seq_b) == (a == b)


def test_an_entry_id_beyond_the_encoding_is_refused() -> None:
    assert entry_id_from_seq(seq_from_entry_id("7-1048575")) == "7-1048575"
    with pytest.raises(ValueError, match="2\\*\\*20"):
        seq_from_entry_id("7-1048576")


def test_the_namespace_is_checked() -> None:
    with pytest.raises(BadRequest):
        open_transport("redis://127.0.0.1:6379/0?namespace=has space")
    with pytest.raises(BadRequest):
        open_transport("redis://127.0.0.1:6379/0?namespace=")


# -- against Redis -------------------------------------------------------------------


def update(n: int, **kw: object) -> Update:
    return Update.create([f"/r/{n % 2}"], f"data {n}", **kw)  # type: ignore[arg-type]


@pytest.fixture
async def raw() -> AsyncIterator[Redis]:
    """A plain client on the test server, to inspect keys and kill connections."""
    client = Redis.from_url(require(REDIS_URL))
    yield client
    await client.aclose()


@pytest.fixture
async def namespace(raw: Redis) -> AsyncIterator[str]:
    name = "tr" + uuid.uuid4().hex[:12]
    yield name
    await raw.delete(f"{name}:updates", f"{name}:ids", f"{name}:id-ages", f"{name}:epoch")


@pytest.fixture
async def opener(namespace: str) -> AsyncIterator[Opener]:
    opened: list[RedisTransport] = []
    sep = "&" if "?" in REDIS_URL else "?"

    async def open_(**options: object) -> RedisTransport:
        transport = open_transport(f"{REDIS_URL}{sep}namespace={namespace}", **options)  # type: ignore[arg-type]
        assert isinstance(transport, RedisTransport)
        opened.append(transport)
        await transport.start()
        return transport

    yield open_
    for transport in opened:
        await transport.close()


async def until(condition: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.01)


async def connections(raw: Redis, name: str) -> list[dict[str, str]]:
    clients = await raw.client_list(_type="normal")
    return [c for c in clients if c.get("name") == name]


async def entries(raw: Redis, key: str, **options: object) -> list[tuple[bytes, Fields]]:
    return cast(list[tuple[bytes, Fields]], await raw.xrange(key, **options))  # type: ignore[arg-type]


async def kill(raw: Redis, name: str) -> int:
    """`CLIENT KILL TYPE normal`, narrowed by id to this test's connections named `name`."""
    killed = 0
    for client in await connections(raw, name):
        killed += int(await raw.client_kill_filter(_id=client["id"], _type="normal"))
    return killed


@pytest.mark.anyio
async def test_stored_positions_are_the_stream_entry_ids(
    opener: Opener, raw: Redis, namespace: str
) -> None:
    t = await opener()
    stored = [await t.append(update(i)) for i in range(5)]
    written = await entries(raw, f"{namespace}:updates")
    assert [seq_from_entry_id(entry_id) for entry_id, _ in written] == [u.seq for u in stored]
    assert written[0][1][b"id"] == stored[0].id.encode()


@pytest.mark.anyio
async def test_a_page_is_stored_in_order_and_a_repeat_once(
    opener: Opener, raw: Redis, namespace: str
) -> None:
    """`append_many` (how the tailers publish a page): in order, each repeat of an
    update already stored (a page published again after a crash) stored once."""
    t = await opener()
    page = [update(i, id=f"page-{i}") for i in range(4)]
    earlier = await t.append(page[1])
    stored = await t.append_many(page)
    written = await entries(raw, f"{namespace}:updates")
    assert [s.id for s in stored] == [u.id for u in page]
    assert stored[1].seq == earlier.seq  # the repeat: the stored one, not a new entry
    assert [seq_from_entry_id(entry_id) for entry_id, _ in written] == [
        earlier.seq, stored[0].seq, stored[2].seq, stored[3].seq]
    assert stored[0].seq < stored[2].seq < stored[3].seq
    assert t.last_seq == stored[3].seq


@pytest.mark.anyio
async def test_an_exhausted_millisecond_moves_to_the_next(
    opener: Opener, raw: Redis, namespace: str
) -> None:
    # Simulate a clock stepped back under load: the newest id is ahead of the server's
    # clock with n at the top of its 20 bits, so Redis would hand out n = 2**20 next.
    ahead_ms = int(time.time() * 1000) + 3_600_000
    await raw.xadd(f"{namespace}:updates", {"marker": "1"}, id=f"{ahead_ms}-{2**20 - 1}")
    t = await opener()
    first = await t.append(update(1))
    second = await t.append(update(2))
    assert entry_id_from_seq(first.seq) == f"{ahead_ms + 1}-0"
    assert entry_id_from_seq(second.seq) == f"{ahead_ms + 1}-1"
    ids = [entry_id for entry_id, _ in await entries(raw, f"{namespace}:updates")]
    assert ids[-2:] == [f"{ahead_ms + 1}-0".encode(), f"{ahead_ms + 1}-1".encode()]
    found = await t.find(first.id)
    assert found is not None and found.seq == first.seq


@pytest.mark.anyio
async def test_trimming_keeps_the_id_index_bounded(
    opener: Opener, raw: Redis, namespace: str
) -> None:
    t = await opener(history_size=10)
    stored = [await t.append(update(i)) for i in range(1000)]
    stream, ids, ages = (f"{namespace}:{k}" for k in ("updates", "ids", "id-ages"))

    async def check_index() -> int:
        kept = await raw.xlen(stream)
        index = await raw.hgetall(ids)
        assert len(index) == await raw.zcard(ages)
        first_ms = seq_from_entry_id((await entries(raw, stream, count=1))[0][0]) >> 20
        live = {entry_id for entry_id, _ in await entries(raw, stream)}
        # An id may outlive its entry only within the first kept entry's millisecond.
        for entry_id in set(index.values()) - live:
            assert seq_from_entry_id(entry_id) >> 20 == first_ms
        return kept

    kept = await check_index()
    assert kept < 1000  # MAXLEN ~ trimmed while appending, not only in prune()
    assert await raw.hlen(ids) < 1000
    await t.prune()
    assert await check_index() == 10  # and the index holds no id older than those 10
    assert await t.find(stored[0].id) is None and await t.find(stored[989].id) is None
    assert [u.id for u in await t.read_after(0, 100)] == [u.id for u in stored[990:]]
    assert await t.first_seq() == stored[990].seq


@pytest.mark.anyio
async def test_a_reused_id_keeps_one_index_entry(
    opener: Opener, raw: Redis, namespace: str
) -> None:
    t = await opener()
    for i in range(5):
        await t.append(update(i, id="again"))
    assert await raw.hlen(f"{namespace}:ids") == 1
    found = await t.find("again")
    assert found is not None and found.data == "data 4" and found.seq == t.last_seq


@pytest.mark.anyio
async def test_prune_applies_the_age_limit(opener: Opener, raw: Redis, namespace: str) -> None:
    t = await opener(history_max_age_s=3600)
    # An update from 1970, written the way the transport writes them.
    old = update(0, id="old")
    await raw.xadd(f"{namespace}:updates", {
        "id": old.id, "topics": '["/r/0"]', "data": old.data, "private": "0", "type": "",
        "retry": "", "created_at": "1.0", "frame": old.frame}, id="1000-0")
    await raw.hset(f"{namespace}:ids", "old", "1000-0")
    await raw.zadd(f"{namespace}:id-ages", {"old": 1000})
    assert await t.find("old") is not None
    new = await t.append(update(1))
    assert await t.prune() == 1
    assert await t.find("old") is None
    assert await raw.hget(f"{namespace}:ids", "old") is None
    assert [u.id for u in await t.read_after(0, 10)] == [new.id]


@pytest.mark.anyio
async def test_namespaces_do_not_share_history(opener: Opener) -> None:
    t = await opener()
    await t.append(update(1, id="mine"))
    other = open_transport(f"{require(REDIS_URL)}?namespace=tr{uuid.uuid4().hex[:12]}")
    await other.start()
    try:
        assert other.last_seq == 0 and await other.find("mine") is None
    finally:
        await other.close()


@pytest.mark.anyio
async def test_a_publish_fails_fast_when_redis_is_unreachable() -> None:
    t = open_transport("redis://127.0.0.1:1/0?namespace=nowhere")
    began = time.monotonic()
    with pytest.raises(ServiceUnavailable, match="the bus is unavailable"):
        await t.start()
    with pytest.raises(ServiceUnavailable, match="the bus is unavailable"):
        await t.append(update(1))
    with pytest.raises(ServiceUnavailable):
        await anext(aiter(t.tail(0)))
    assert time.monotonic() - began < 3.0
    await t.close()


@pytest.mark.anyio
async def test_a_publish_fails_fast_when_redis_hangs() -> None:
    # A server that accepts connections and never answers; socket_timeout in the URL
    # reaches redis-py alongside the namespace.
    stalled: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stalled.append(writer)

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    t = open_transport(f"redis://127.0.0.1:{port}/0?namespace=hung&socket_timeout=0.2")
    began = time.monotonic()
    try:
        with pytest.raises(ServiceUnavailable):
            await t.append(update(1))
        assert time.monotonic() - began < 3.0
    finally:
        await t.close()
        for writer in stalled:
            writer.close()
        server.close()
        await server.wait_closed()


@pytest.mark.anyio
async def test_the_tail_resumes_after_its_connection_is_killed(
    opener: Opener, raw: Redis, namespace: str
) -> None:
    publisher, follower = await opener(), await opener()
    seen: list[Update] = []

    async def follow(after: int) -> None:
        async for u in follower.tail(after):
            seen.append(u)

    async def blocked_in_xread() -> bool:
        tails = await connections(raw, f"tidings:{namespace}:tail")
        return any("b" in c["flags"] and c["cmd"] == "xread" for c in tails)

    task = asyncio.create_task(follow(follower.last_seq))
    stored = [await publisher.append(update(i)) for i in range(5)]

    async def seen_all() -> bool:
        return len(seen) == len(stored)

    await until(seen_all)
    await until(blocked_in_xread)
    # Kill the blocked read and the publisher's connections too (a restart, as the hub
    # would see it); both clients belong to this test's namespace only.
    assert await kill(raw, f"tidings:{namespace}:tail") >= 1
    await kill(raw, f"tidings:{namespace}")
    with pytest.raises(ServiceUnavailable):
        await asyncio.wait_for(task, 10)
    # Published while nobody was tailing: the resumed tail must deliver these once.
    stored += [await publisher.append(update(i)) for i in range(5, 10)]
    task = asyncio.create_task(follow(seen[-1].seq))
    stored += [await publisher.append(update(i)) for i in range(10, 15)]
    try:
        await until(seen_all)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert [u.id for u in seen] == [u.id for u in stored]
    assert [u.seq for u in seen] == [u.seq for u in stored]
    assert follower.last_seq == stored[-1].seq


@pytest.mark.anyio
async def test_close_ends_a_blocked_tail(opener: Opener, raw: Redis, namespace: str) -> None:
    t = await opener()
    seen: list[Update] = []

    async def follow() -> None:
        async for u in t.tail(0):
            seen.append(u)

    task = asyncio.create_task(follow())

    async def blocked() -> bool:
        return bool(await connections(raw, f"tidings:{namespace}:tail"))

    await until(blocked)
    await t.close()
    await asyncio.wait_for(task, 5)  # returns: the end of the tail, not an error
    assert seen == []


# -- a stream that lost its history (Redis back empty) --------------------------------


async def first_items(t: RedisTransport, after: int, count: int) -> list[Update]:
    """The first `count` updates `tail(after)` yields (its continuity check included)."""
    seen: list[Update] = []
    async with contextlib.aclosing(t.tail(after)) as tail:
        async for u in tail:
            seen.append(u)
            if len(seen) == count:
                break
    return seen


@pytest.mark.anyio
async def test_a_lost_history_is_told_once_and_seqs_stay_above_it(
    opener: Opener, raw: Redis, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    t = await opener()
    stream = f"{namespace}:updates"
    await t.append(update(0))
    # An entry ten minutes ahead of the server's clock (a server whose clock ran ahead
    # wrote it): the fan-out's cursor ends up there.
    fields = (await entries(raw, stream))[0][1]
    ahead_ms = int(time.time() * 1000) + 600_000
    await raw.xadd(stream, {**fields, b"id": b"ahead"}, id=f"{ahead_ms}-0")  # type: ignore[arg-type]
    seen = await first_items(t, 0, 2)
    assert seen[-1].id == "ahead" and t.last_seq == seen[-1].seq
    # Redis comes back empty (as after a restart without persistence).
    await raw.delete(stream, f"{namespace}:ids", f"{namespace}:id-ages", f"{namespace}:epoch")
    caplog.set_level(logging.WARNING, logger="tidings.transports.redis")
    tail = asyncio.create_task(first_items(t, t.last_seq, 1))
    fresh = await t.append(update(1))
    # Placed above the cursor (the clock is behind it), so the tail is not left waiting.
    assert fresh.seq > seen[-1].seq
    assert [u.id for u in await asyncio.wait_for(tail, 10)] == [fresh.id]
    lost = [r.getMessage() for r in caplog.records if "lost the history" in r.getMessage()]
    assert len(lost) == 1 and f"up to seq {seen[-1].seq}" in lost[0]
    assert await t.find("ahead") is None  # a resume from it is `earliest`
    assert (await t.find(fresh.id)) == fresh
    # The next append goes on from there, in order.
    assert (await t.append(update(2))).seq > fresh.seq


@pytest.mark.anyio
async def test_newest_entries_lost_under_newer_ones_are_a_lost_history(
    opener: Opener, raw: Redis, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis back from an `appendfsync everysec` file that missed its last writes, and an
    append before the tail reconnects: the stream's last id is above what the tail read,
    but the entries it read last are gone while older ones remain."""
    t = await opener()
    stored = [await t.append(update(i)) for i in range(4)]
    await raw.xdel(f"{namespace}:updates", *(entry_id_from_seq(u.seq) for u in stored[2:]))
    fresh = await t.append(update(4))
    caplog.set_level(logging.WARNING, logger="tidings.transports.redis")
    assert [u.id for u in await first_items(t, stored[3].seq, 1)] == [fresh.id]
    lost = [r.getMessage() for r in caplog.records if "lost the history" in r.getMessage()]
    assert len(lost) == 1 and f"up to seq {stored[3].seq}" in lost[0]


@pytest.mark.anyio
async def test_history_removed_by_retention_is_not_a_lost_history(
    opener: Opener, caplog: pytest.LogCaptureFixture
) -> None:
    t = await opener(history_size=2)
    stored = [await t.append(update(i)) for i in range(5)]
    assert await t.prune() == 3
    caplog.set_level(logging.WARNING, logger="tidings.transports.redis")
    # A tail resuming from a trimmed entry (a process that fell behind retention), or
    # from one that is still there: nothing was lost by Redis.
    assert [u.id for u in await first_items(t, stored[0].seq, 2)] == [u.id for u in stored[3:]]
    assert [u.id for u in await first_items(t, stored[3].seq, 1)] == [stored[4].id]
    assert not [r for r in caplog.records if "lost the history" in r.getMessage()]


# -- what start says of Redis's persistence -----------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("private_redis", ["appendonly"], indirect=True)
async def test_start_says_when_redis_may_lose_acknowledged_updates(
    private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    """`appendfsync always` keeps every acknowledged update: nothing to say. `everysec`
    may lose the last second or two at a crash, and no append-only file loses it all at
    a restart: one warning at start, naming the setting."""
    caplog.set_level(logging.WARNING, logger="tidings.transports.redis")
    raw = Redis.from_url(private_redis.url)

    async def said() -> list[str]:
        caplog.clear()
        transport = open_transport(f"{private_redis.url}?namespace=p")
        await transport.start()
        await transport.close()
        return [r.getMessage() for r in caplog.records]

    try:
        assert await said() == []
        await raw.config_set("appendfsync", "everysec")
        [warning] = await said()
        assert "appendfsync everysec" in warning and "appendfsync always" in warning
        await raw.config_set("appendonly", "no")
        [warning] = await said()
        assert "(appendonly no)" in warning
    finally:
        await raw.aclose()
