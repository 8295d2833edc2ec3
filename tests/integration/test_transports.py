"""The contract every transport keeps, checked on each of them against real storage.

The hub relies on exactly this: one ordered history (`seq`) shared by every process on the
same storage, durable appends, replay by position, a tail that follows commit order.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.services import POSTGRES_URL, REDIS_URL, require
from tidings.errors import TransportClosed
from tidings.hub.transport import HistoryBounds, Transport
from tidings.hub.update import Update
from tidings.transports import open_transport

pytestmark = pytest.mark.anyio

Factory = Callable[..., Transport]


def _with_namespace(url: str, namespace: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}namespace={namespace}"


@pytest.fixture(params=["sqlite", "redis", "postgres"])
async def make(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Factory]:
    """Opens transports on one shared storage (as several processes would)."""
    namespace = "t" + uuid.uuid4().hex[:12]
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'h.db'}"
    elif request.param == "redis":
        url = _with_namespace(require(REDIS_URL), namespace)
    else:
        url = _with_namespace(require(POSTGRES_URL), namespace)
    opened: list[Transport] = []

    def factory(**options: object) -> Transport:
        transport = open_transport(url, **options)  # type: ignore[arg-type]
        opened.append(transport)
        return transport

    factory.kind = request.param  # type: ignore[attr-defined]
    yield factory
    for transport in opened:
        await transport.close()
    if request.param != "sqlite":
        cleanup = open_transport(url)
        await cleanup.start()
        await cleanup.destroy()  # type: ignore[attr-defined]
        await cleanup.close()


def update(n: int, **kw: object) -> Update:
    return Update.create([f"/t/{n % 3}"], f"data {n}\nline two", **kw)  # type: ignore[arg-type]


async def started(factory: Factory, **options: object) -> Transport:
    transport = factory(**options)
    await transport.start()
    return transport


async def test_append_assigns_increasing_positions_and_keeps_frames(make: Factory) -> None:
    t = await started(make)
    assert t.last_seq == 0
    stored = [await t.append(update(i, type="kind", retry=10)) for i in range(5)]
    seqs = [u.seq for u in stored]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5 and seqs[0] > 0
    assert t.last_seq == seqs[-1]
    read = await t.read_after(0, 100)
    assert [u.id for u in read] == [u.id for u in stored]
    assert [u.frame for u in read] == [u.frame for u in stored]
    assert read[0].topics == ("/t/0",) and read[0].type == "kind" and read[0].retry == 10
    assert [u.seq for u in await t.read_after(seqs[1], 2)] == seqs[2:4]
    assert isinstance(t, HistoryBounds)
    assert await t.first_seq() == seqs[0]
    found = await t.find(stored[2].id)
    assert found is not None and found.seq == seqs[2] and found.frame == stored[2].frame
    assert await t.find("urn:uuid:unknown") is None


async def test_retried_publish_is_stored_once(make: Factory) -> None:
    t = await started(make)
    one = await t.append(update(1, id="same"))
    again = await t.append(update(1, id="same"))
    assert again.seq == one.seq
    private = await t.append(update(1, id="same", private=True))
    assert private.seq > one.seq
    found = await t.find("same")
    assert found is not None and found.seq == private.seq and found.private


def shared_only(make: Factory) -> None:
    if make.kind == "sqlite":  # type: ignore[attr-defined]
        pytest.skip("the SQLite transport serves one process by design (workers need a bus)")


async def test_tail_sees_appends_of_another_process_in_order(make: Factory) -> None:
    shared_only(make)
    a, b = await started(make), await started(make)
    seen: list[Update] = []

    async def follow() -> None:
        async for u in b.tail(b.last_seq):
            seen.append(u)
            if len(seen) == 20:
                return

    follower = asyncio.create_task(follow())
    await asyncio.sleep(0.05)
    stored = [await a.append(update(i)) for i in range(10)]
    stored += [await b.append(update(i)) for i in range(10, 20)]
    await asyncio.wait_for(follower, 10)
    assert [u.id for u in seen] == [u.id for u in stored]
    assert [u.seq for u in seen] == sorted(u.seq for u in seen)


async def test_concurrent_appends_from_two_processes_form_one_order(make: Factory) -> None:
    shared_only(make)
    a, b = await started(make), await started(make)
    results = await asyncio.gather(
        *[(a if i % 2 else b).append(update(i)) for i in range(100)]
    )
    history = await a.read_after(0, 1000)
    assert sorted(u.seq for u in results) == [u.seq for u in history]
    assert {u.id for u in results} == {u.id for u in history}


async def test_tail_from_a_position_replays_what_came_after(make: Factory) -> None:
    t = await started(make)
    stored = [await t.append(update(i)) for i in range(6)]
    other = await started(make)
    seen: list[int] = []
    async for u in other.tail(stored[2].seq):
        seen.append(u.seq)
        if len(seen) == 3:
            break
    assert seen == [u.seq for u in stored[3:]]


async def test_retention_by_count(make: Factory) -> None:
    t = await started(make, history_size=10)
    stored = [await t.append(update(i)) for i in range(600)]
    assert isinstance(t, HistoryBounds)
    await t.prune()
    kept = await t.read_after(0, 10_000)
    assert 10 <= len(kept) <= 600
    assert kept[-1].seq == stored[-1].seq
    assert await t.find(stored[0].id) is None


async def test_a_new_process_starts_at_the_stored_position(make: Factory) -> None:
    t = await started(make)
    last = None
    for i in range(3):
        last = await t.append(update(i))
    assert last is not None
    again = await started(make)
    assert again.last_seq == last.seq


async def test_closed_transport_refuses(make: Factory) -> None:
    t = await started(make)
    await t.close()
    with pytest.raises(TransportClosed):
        await t.append(update(0))
