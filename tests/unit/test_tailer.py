"""The tailer on the memory transport, with a log in a list: no sockets, no database.

What every backend relies on: entries are published in order, the cursor is saved only
after the hub acknowledged, a failed attempt starts over from the saved cursor (and the
transport stores each republished update once), a wake-up makes it read at once, and
`wait_published` returns when the tailer has published a position, and a steady stream is
read in pages (`busy_read_every_s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tidings.errors import ServiceUnavailable
from tidings.feeds.tailer import Entry, Tailer
from tidings.hub.hub import Hub
from tidings.hub.update import Update
from tidings.transports import open_transport

pytestmark = pytest.mark.anyio


class ListLog:
    """A log in a list; `fail_save_once` makes the first save raise (after publishing)."""

    def __init__(self, entries: int = 0, *, fail_save_once: bool = False) -> None:
        self.rows: list[int] = list(range(1, entries + 1))
        self.saved = 0
        self.saves: list[int] = []
        self.leads = 0
        self.reads: list[tuple[int, int]] = []  # (after, saved then)
        self.found: list[tuple[float, int]] = []  # reads that found entries: (began, how many)
        self.fail_save_once = fail_save_once
        self._changed = asyncio.Condition()

    async def saved_through(self, cursor: int) -> None:
        """Until a save reaches `cursor` (bounded by the caller's timeout)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.saved >= cursor)

    def append(self, count: int) -> None:
        last = self.rows[-1] if self.rows else 0
        self.rows += range(last + 1, last + 1 + count)

    @contextlib.asynccontextmanager
    async def lead(self, wake: asyncio.Event) -> AsyncIterator[int]:
        self.leads += 1
        yield self.saved

    async def read(self, after: int, limit: int) -> list[Entry]:
        self.reads.append((after, self.saved))
        began = time.monotonic()
        await asyncio.sleep(0)  # a read takes a while: the publish of a page read ahead runs
        page = [(seq, Update.create(["/log"], str(seq), id=f"log-{seq}"))
                for seq in self.rows if seq > after][:limit]
        if page:
            self.found.append((began, len(page)))
        return page

    async def save(self, cursor: int) -> None:
        await asyncio.sleep(0)  # a save takes a while too: a read ahead runs meanwhile
        if self.fail_save_once:
            self.fail_save_once = False
            raise ServiceUnavailable("the database went away")
        async with self._changed:
            self.saved = cursor
            self.saves.append(cursor)
            self._changed.notify_all()

    async def wait(self, wake: asyncio.Event) -> None:
        await wake.wait()


def saved_cursor(log: ListLog) -> Callable[[], Awaitable[int]]:
    async def saved() -> int:
        return log.saved

    return saved


async def started(log: ListLog, batch: int = 3, read_ahead: bool = False,
                  busy_read_every_s: float = 0.0) -> tuple[Hub, Tailer]:
    hub = Hub(open_transport("memory://"))
    await hub.start()
    tailer = Tailer(log, hub, what="test log", unit="entry", batch=batch,
                    read_ahead=read_ahead, busy_read_every_s=busy_read_every_s)
    tailer.start()
    return hub, tailer


async def stored(hub: Hub) -> list[str]:
    return [u.id for u in await hub.transport.read_after(0, 1000)]


@pytest.mark.parametrize("read_ahead", [False, True])
async def test_publishes_in_order_and_saves_after_each_batch(read_ahead: bool) -> None:
    log = ListLog(7)
    hub, tailer = await started(log, read_ahead=read_ahead)
    try:
        async with asyncio.timeout(5):
            await log.saved_through(7)
        assert await stored(hub) == [f"log-{n}" for n in range(1, 8)]
        assert log.saves == [3, 6, 7]  # batches of 3, each saved after its publishes
        log.append(2)
        tailer.wake()
        await tailer.wait_published(9, saved_cursor(log), timeout_s=5, poll_s=0.01)
        assert tailer.leading and tailer.published == 9
    finally:
        await tailer.stop()
        await hub.stop()


@pytest.mark.parametrize("read_ahead", [False, True])
async def test_a_failed_save_republishes_from_the_saved_cursor_once(read_ahead: bool) -> None:
    log = ListLog(2, fail_save_once=True)
    hub, tailer = await started(log, read_ahead=read_ahead)
    try:
        async with asyncio.timeout(5):
            await log.saved_through(2)
        assert log.leads == 2  # the first attempt failed at its save and started over
        assert await stored(hub) == ["log-1", "log-2"]  # republished, stored once
    finally:
        await tailer.stop()
        await hub.stop()


async def test_read_ahead_reads_the_next_page_before_this_one_is_saved() -> None:
    log = ListLog(7)
    hub, tailer = await started(log, read_ahead=True)
    try:
        async with asyncio.timeout(5):
            await log.saved_through(7)
        # Each page after the first is read while the one before it is published.
        assert log.reads[:3] == [(0, 0), (3, 0), (6, 3)]
        assert await stored(hub) == [f"log-{n}" for n in range(1, 8)]
    finally:
        await tailer.stop()
        await hub.stop()


@pytest.mark.parametrize("read_ahead", [False, True])
async def test_a_steady_stream_is_read_in_pages_at_most_every_busy_interval(
        read_ahead: bool) -> None:
    log = ListLog()
    hub, tailer = await started(log, batch=500, read_ahead=read_ahead,
                                busy_read_every_s=0.05)
    try:
        for _ in range(100):  # an entry every 2 ms or more, each with a wake-up
            log.append(1)
            tailer.wake()
            await asyncio.sleep(0.002)
        await tailer.wait_published(100, saved_cursor(log), timeout_s=5, poll_s=0.01)
        assert await stored(hub) == [f"log-{n}" for n in range(1, 101)]
        began = [at for at, _ in log.found]
        # (Read back to back, each read found an entry or two, a few ms apart.)
        assert all(b - a >= 0.049 for a, b in itertools.pairwise(began))
        assert len(log.found) < 50
    finally:
        await tailer.stop()
        await hub.stop()


async def test_full_pages_and_a_first_entry_are_read_at_once_later_ones_wait() -> None:
    log = ListLog(7)
    hub, tailer = await started(log, batch=3, busy_read_every_s=10)
    try:
        # Pages of 3, 3 and 1, none of them waiting ten seconds: the full ones say that
        # more is there, and the first read had found nothing before.
        await tailer.wait_published(7, saved_cursor(log), timeout_s=5, poll_s=0.01)
        log.append(1)
        tailer.wake()
        # Entries are coming (a read found some just now): the next read waits.
        with pytest.raises(ServiceUnavailable):
            await tailer.wait_published(8, saved_cursor(log), timeout_s=0.3, poll_s=0.01)
        assert [n for _, n in log.found] == [3, 3, 1]
    finally:
        await tailer.stop()
        await hub.stop()


async def test_wait_published_times_out_while_behind() -> None:
    hub = Hub(open_transport("memory://"))
    tailer = Tailer(ListLog(), hub, what="test log", unit="entry")

    with pytest.raises(ServiceUnavailable, match="behind"):
        await tailer.wait_published(1, saved_cursor(ListLog()), timeout_s=0.05, poll_s=0.01)


class SwallowingLog(ListLog):
    """A log whose wait swallows the first cancellation, as library code closing a
    connection may."""

    def __init__(self) -> None:
        super().__init__(1)
        self.swallowed = 0
        self.waiting = asyncio.Event()

    async def wait(self, wake: asyncio.Event) -> None:
        self.waiting.set()
        try:
            await wake.wait()
        except asyncio.CancelledError:
            if self.swallowed:
                raise
            self.swallowed += 1


async def test_stop_ends_the_loop_even_when_a_cancellation_is_swallowed() -> None:
    log = SwallowingLog()
    hub, tailer = await started(log)
    try:
        async with asyncio.timeout(5):
            await log.waiting.wait()
        stopping = asyncio.create_task(tailer.stop())
        done, _ = await asyncio.wait({stopping}, timeout=4)
        if not done:  # (before the fix: it waits forever) cancelled, so the test ends
            stopping.cancel()
        assert stopping in done
        assert log.swallowed == 1
    finally:
        await hub.stop()
