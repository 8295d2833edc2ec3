"""The hub core on the in-memory transport: no HTTP, no sockets, no sleeps."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from tidings.errors import BadRequest, ServiceUnavailable
from tidings.hub import hub as hub_module
from tidings.hub.auth import KeyConfig, decode_token
from tidings.hub.hub import Hub, HubConfig, Subscription
from tidings.hub.subscriber import CloseReason, State, SubscriberLimits
from tidings.hub.tokens import encode_token
from tidings.hub.topics import compile_selector
from tidings.hub.update import Update
from tidings.sse import EventParser
from tidings.transports import open_transport

pytestmark = pytest.mark.anyio
KEY = KeyConfig("unit-test-key-unit-test-key-unit-test-key")


async def make_hub(**config: object) -> Hub:
    hub = Hub(open_transport("memory://"), HubConfig(**config))  # type: ignore[arg-type]
    await hub.start()
    return hub


async def settle() -> None:
    """Let the fan-out task run: yields to the loop until it has nothing left to do."""
    for _ in range(5):
        await asyncio.sleep(0)


class ListSink:
    """A sink that parses what the hub writes, as a browser would."""

    def __init__(self) -> None:
        self.parser = EventParser()
        self.events: list[str] = []
        self.writes = 0
        self.changed = asyncio.Event()

    def write(self, chunk: bytes) -> bool:
        self.writes += 1
        self.events.extend(e.data for e in self.parser.feed(chunk))
        self.changed.set()
        return True


async def live(sub: Subscription) -> ListSink:
    """Replay into a sink, then hand it to the hub, as the web layer does."""
    sink = ListSink()
    async for chunk in sub.replay():
        sink.write(chunk)
    sub.go_live(sink)
    return sink


async def collect(sink: ListSink, n: int) -> list[str]:
    while len(sink.events) < n:
        sink.changed.clear()
        await asyncio.wait_for(sink.changed.wait(), 5)
    return sink.events


def sel(*topics: str) -> list:  # type: ignore[type-arg]
    return [compile_selector(t) for t in topics]


async def test_publish_fans_out_to_matching_subscribers() -> None:
    hub = await make_hub()
    async with hub.connect(sel("/a"), None) as a, hub.connect(sel("/{x}"), None) as wide:
        a_sink, wide_sink = await live(a), await live(wide)
        await hub.publish(Update.create(["/a"], "1"))
        await hub.publish(Update.create(["/b"], "2"))
        assert await collect(wide_sink, 2) == ["1", "2"]
        assert await collect(a_sink, 1) == ["1"]
    assert hub.subscriber_count == 0
    await hub.stop()


async def test_update_with_two_matching_topics_is_delivered_once() -> None:
    hub = await make_hub()
    async with hub.connect(sel("/a", "/b"), None) as sub:
        sink = await live(sub)
        await hub.publish(Update.create(["/a", "/b"], "both"))
        await hub.publish(Update.create(["/b"], "next"))
        assert await collect(sink, 2) == ["both", "next"]
    await hub.stop()


async def test_private_needs_a_matching_claim() -> None:
    hub = await make_hub()
    claims = decode_token(encode_token(KEY.key, subscribe=["/p/{id}"]), KEY)
    async with hub.connect(sel("/p/1"), claims) as ok, hub.connect(sel("/p/1"), None) as anon:
        ok_sink, anon_sink = await live(ok), await live(anon)
        await hub.publish(Update.create(["/p/1"], "secret", private=True))
        await hub.publish(Update.create(["/p/1"], "public"))
        assert await collect(ok_sink, 2) == ["secret", "public"]
        assert await collect(anon_sink, 1) == ["public"]
    await hub.stop()


async def test_a_private_update_reaches_each_subscriber_its_claims_allow() -> None:
    # Two subscribers share one token's claims (a user's windows), a third has others.
    hub = await make_hub()
    mine = decode_token(encode_token(KEY.key, subscribe=["/p/{id}"]), KEY)
    other = decode_token(encode_token(KEY.key, subscribe=["/q/{id}"]), KEY)
    async with (hub.connect(sel("/p/1"), mine) as one, hub.connect(sel("/p/1"), mine) as two,
                hub.connect(sel("/p/1"), other) as three):
        sinks = [await live(one), await live(two), await live(three)]
        await hub.publish(Update.create(["/p/1"], "secret", private=True))
        await hub.publish(Update.create(["/p/1"], "public"))
        assert await collect(sinks[0], 2) == ["secret", "public"]
        assert await collect(sinks[1], 2) == ["secret", "public"]
        assert await collect(sinks[2], 1) == ["public"]
    await hub.stop()


async def test_seam_no_gap_no_duplicate() -> None:
    """Updates published while a subscriber replays arrive once, after the replayed ones."""
    hub = await make_hub()
    first = await hub.publish(Update.create(["/s"], "0"))
    for i in range(1, 50):
        await hub.publish(Update.create(["/s"], str(i)))
    await settle()
    async with hub.connect(sel("/s"), None, last_event_id=first.id) as sub:
        # Live updates arrive before the writer has replayed anything.
        for i in range(50, 80):
            await hub.publish(Update.create(["/s"], str(i)))
        await settle()
        assert sub.subscriber.state is State.REPLAYING
        sink = await live(sub)
        assert sub.subscriber.state is State.LIVE
        assert await collect(sink, 79) == [str(i) for i in range(1, 80)]
    await hub.stop()


async def test_last_event_id_ahead_of_fan_out_drops_older_live_frames() -> None:
    hub = await make_hub()
    async with hub.connect(sel("/s"), None) as sub:
        sink = await live(sub)
        a = await hub.publish(Update.create(["/s"], "a"))
        await hub.publish(Update.create(["/s"], "b"))
        # Reconnect claiming "a" was seen before fan-out delivered it.
        async with hub.connect(sel("/s"), None, last_event_id=a.id) as again:
            again_sink = await live(again)
            assert await collect(again_sink, 1) == ["b"]
        assert await collect(sink, 2) == ["a", "b"]
    await hub.stop()


async def test_slow_subscriber_is_closed_not_grown() -> None:
    hub = await make_hub(limits=SubscriberLimits(max_frames=10))
    async with hub.connect(sel("/f"), None) as slow:
        for i in range(11):
            await hub.publish(Update.create(["/f"], str(i)))
        await settle()
        assert slow.subscriber.state is State.CLOSED
        assert slow.subscriber.close_reason is CloseReason.SLOW
    assert hub.metrics.slow_disconnects == 1
    await hub.stop()


async def test_limits_and_bad_selectors() -> None:
    hub = await make_hub(max_subscribers=1, max_selectors=2)
    with pytest.raises(BadRequest):
        async with hub.connect([], None):
            pass
    with pytest.raises(BadRequest):
        async with hub.connect(sel("/a", "/b", "/c"), None):
            pass
    async with hub.connect(sel("/a"), None):
        with pytest.raises(ServiceUnavailable):
            async with hub.connect(sel("/a"), None):
                pass
    await hub.stop()


async def test_shutdown_closes_streams() -> None:
    hub = await make_hub()
    async with hub.connect(sel("/a"), None) as sub:
        await live(sub)
        closed: list[bool] = []
        sub.subscriber.on_close(lambda: closed.append(True))
        hub.begin_shutdown()
        assert closed == [True]
        assert sub.subscriber.close_reason is CloseReason.SHUTDOWN
    await hub.stop()


async def test_stop_waits_for_the_last_stream_to_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """`stop` returns when the last subscriber unregisters, however long it may wait."""
    monkeypatch.setattr(hub_module, "_STOP_WAIT_S", 3600.0)
    hub = await make_hub()
    closed = asyncio.Event()
    left: list[int] = []

    async def stream() -> None:
        async with hub.connect(sel("/a"), None) as sub:
            await live(sub)
            sub.subscriber.on_close(closed.set)
            await closed.wait()
            await settle()  # a writer finishing its response
        left.append(hub.subscriber_count)

    task = asyncio.create_task(stream())
    await settle()
    assert hub.subscriber_count == 1
    await asyncio.wait_for(hub.stop(), 10)
    assert left == [0] and task.done()


async def test_writes_coalesce_under_load() -> None:
    """Updates published right after a flush, back to back, go out in few writes."""
    hub = await make_hub(flush_linger_s=0.05)
    async with hub.connect(sel("/c"), None) as sub:
        sink = await live(sub)
        await hub.publish(Update.create(["/c"], "first"))
        assert await collect(sink, 1) == ["first"]
        for i in range(20):
            await hub.publish(Update.create(["/c"], str(i)))
        assert await collect(sink, 21) == ["first", *[str(i) for i in range(20)]]
        assert sink.writes < 10
    await hub.stop()


async def test_a_steady_rate_is_not_held_back_by_batching() -> None:
    """An update that finds the hub idle goes out at once; one that arrives just after a
    flush (the start of a batch) waits no longer than the linger when no more follow."""
    linger = 0.3
    hub = await make_hub(flush_linger_s=linger)
    loop = asyncio.get_running_loop()
    async with hub.connect(sel("/s"), None) as sub:
        sink = await live(sub)
        await hub.publish(Update.create(["/s"], "first"))
        await collect(sink, 1)
        await asyncio.sleep(linger * 1.2)
        started = loop.time()
        await hub.publish(Update.create(["/s"], "idle"))
        await collect(sink, 2)
        assert loop.time() - started < linger / 2
        started = loop.time()
        await hub.publish(Update.create(["/s"], "busy"))  # within the linger: a batch
        await collect(sink, 3)
        assert linger / 2 < loop.time() - started < linger * 2.5
    await hub.stop()


async def test_a_large_write_pass_yields_and_later_updates_join_its_writes() -> None:
    """A write pass over many subscribers is cut into slices; an update published while
    it is under way goes out in the same write as the earlier one to those not yet
    written, in order, to everyone exactly once."""
    hub = await make_hub(flush_slice_s=0.0, first_slice_s=0.0)
    async with contextlib.AsyncExitStack() as stack:
        subs = [await stack.enter_async_context(hub.connect(sel("/p"), None))
                for _ in range(100)]
        sinks = [await live(sub) for sub in subs]
        await hub.publish(Update.create(["/p"], "one"))
        await hub.publish(Update.create(["/p"], "two"))
        for sink in sinks:
            assert await collect(sink, 2) == ["one", "two"]
        assert sum(sink.writes for sink in sinks) < 200
    await hub.stop()


async def test_fan_out_writes_subscribers_in_the_order_they_connected() -> None:
    """Connection order is roughly memory order; walking it is faster than hash order."""
    hub = await make_hub()
    written: list[int] = []

    class OrderSink(ListSink):
        def __init__(self, index: int) -> None:
            super().__init__()
            self.index = index

        def write(self, chunk: bytes) -> bool:
            written.append(self.index)
            return super().write(chunk)

    async with contextlib.AsyncExitStack() as stack:
        for index in range(50):
            sub = await stack.enter_async_context(hub.connect(sel("/o"), None))
            async for _ in sub.replay():
                pass
            sub.go_live(OrderSink(index))
        await hub.publish(Update.create(["/o"], "x"))
        await settle()
        assert written == list(range(50))
    await hub.stop()


async def test_retried_publish_is_stored_once_but_reused_ids_are_new_updates() -> None:
    hub = await make_hub()
    one = await hub.publish(Update.create(["/i"], "x", id="same"))
    again = await hub.publish(Update.create(["/i"], "x", id="same"))
    assert again.seq == one.seq
    other = await hub.publish(Update.create(["/i"], "x", id="same", private=True))
    assert other.seq > one.seq
    found = await hub.transport.find("same")
    assert found is not None and found.seq == other.seq
    await hub.stop()




async def test_stream_closes_when_the_token_expires() -> None:
    hub = await make_hub()
    claims = decode_token(encode_token(KEY.key, subscribe=["*"], expires_in_s=0.2), KEY)
    async with hub.connect(sel("/x"), claims) as sub:
        await live(sub)
        closed = asyncio.Event()
        sub.subscriber.on_close(closed.set)
        await asyncio.wait_for(closed.wait(), 5)
        assert sub.subscriber.close_reason is CloseReason.TOKEN_EXPIRED
    await hub.stop()


async def test_updates_stored_here_are_fanned_out_once_in_order_whichever_path_is_first(
) -> None:
    """`publish_many` fans out what it stored without waiting for the tail to read it back;
    the tail skips those. Interleaved with single publishes (which only the tail fans out),
    every update still arrives once, in seq order."""
    hub = await make_hub()
    async with hub.connect(sel("/s"), None) as sub:
        sink = await live(sub)

        async def batches() -> None:
            for i in range(20):
                await hub.publish_many([Update.create(["/s"], f"m{i}.{j}") for j in range(3)])

        async def singles() -> None:
            for i in range(20):
                await hub.publish(Update.create(["/s"], f"s{i}"))

        await asyncio.gather(batches(), singles())
        stored = await hub.transport.read_after(0, 1000)
        assert await collect(sink, 80) == [u.data for u in stored]
        await settle()
        assert len(sink.events) == 80
    await hub.stop()


class HeldTail:
    """The memory transport, with a tail that yields only while `flowing` is set (a slow
    bus: the tail reads an update back well after its publisher stored it)."""

    def __init__(self) -> None:
        self.inner = open_transport("memory://")
        self.flowing = asyncio.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    @property
    def last_seq(self) -> int:
        return self.inner.last_seq

    async def tail(self, after: int) -> AsyncIterator[Update]:
        async for update in self.inner.tail(after):
            await self.flowing.wait()
            yield update


async def test_a_stored_batch_is_fanned_out_before_the_tail_reads_it_and_only_once() -> None:
    transport = HeldTail()
    hub = Hub(transport)  # type: ignore[arg-type]
    await hub.start()
    async with hub.connect(sel("/s"), None) as sub:
        sink = await live(sub)
        await hub.publish_many([Update.create(["/s"], d) for d in ("a", "b")])
        assert await collect(sink, 2) == ["a", "b"]  # the tail has not read them yet
        transport.flowing.set()
        await hub.publish(Update.create(["/s"], "c"))  # this one only through the tail
        assert await collect(sink, 3) == ["a", "b", "c"]
        await settle()
        assert sink.events == ["a", "b", "c"]
    await hub.stop()


async def test_a_stored_batch_after_a_gap_is_left_to_the_tail() -> None:
    """Updates another process stored in between come first: a batch that does not follow
    the last seq fanned out is not fanned out ahead of them."""
    hub = await make_hub()
    async with hub.connect(sel("/s"), None) as sub:
        sink = await live(sub)
        last = hub._last_seq
        ahead = Update.create(["/s"], "ahead").stored(last + 2, 0.0)
        hub._fan_out_stored([ahead], 0)
        assert hub._last_seq == last and sink.events == []
        await hub.publish_many([Update.create(["/s"], "next")])
        assert await collect(sink, 1) == ["next"]
    await hub.stop()
