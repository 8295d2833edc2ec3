"""The write scheduler (hub/flush.py) on a fake clock and a fake loop: no sockets, no sleeps.

Time moves only when a test (or a sink standing for a slow write) moves it, and scheduled
callbacks run only when the test runs the loop, so every timing rule is checked exactly.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

from tidings.hub.flush import FlushScheduler
from tidings.hub.subscriber import Subscriber, SubscriberLimits
from tidings.hub.topics import compile_selector
from tidings.hub.update import Update

LINGER = 0.001
MAX_WAIT = 0.05
SLICE = 0.010
FIRST_SLICE = 0.002


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeHandle:
    def __init__(self, when: float, callback: Callable[[], object]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """`call_soon`/`call_later` into a queue ordered by due time, then by scheduling."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self._queue: list[tuple[float, int, FakeHandle]] = []
        self._order = itertools.count()

    def call_soon(self, callback: Callable[[], object]) -> FakeHandle:
        return self.call_later(0.0, callback)

    def call_later(self, delay: float, callback: Callable[[], object]) -> FakeHandle:
        handle = FakeHandle(self.clock.now + delay, callback)
        heapq.heappush(self._queue, (handle.when, next(self._order), handle))
        return handle

    @property
    def pending(self) -> list[FakeHandle]:
        return [h for _, _, h in sorted(self._queue) if not h.cancelled]

    def run_once(self) -> int:
        """One loop iteration: run what is due now (not what it schedules meanwhile)."""
        due = []
        while self._queue and self._queue[0][0] <= self.clock.now:
            due.append(heapq.heappop(self._queue)[2])
        for handle in due:
            if not handle.cancelled:
                handle.callback()
        return len(due)

    def advance(self, seconds: float) -> None:
        self.clock.now += seconds
        while self.run_once():
            pass


class RecordingSink:
    def __init__(self, clock: FakeClock, write_s: float = 0.0) -> None:
        self.clock = clock
        self.write_s = write_s  # how long each write takes, on the fake clock
        self.writes: list[bytes] = []
        self.times: list[float] = []  # when each write started

    def write(self, chunk: bytes) -> bool:
        self.writes.append(chunk)
        self.times.append(self.clock.now)
        self.clock.now += self.write_s
        return True


class Rig:
    def __init__(self, subscribers: int = 1, write_s: float = 0.0) -> None:
        self.clock = FakeClock()
        self.loop = FakeLoop(self.clock)
        self.flusher = FlushScheduler(
            linger_s=LINGER, max_wait_s=MAX_WAIT, slice_s=SLICE, first_slice_s=FIRST_SLICE,
            clock=self.clock, loop=self.loop,
        )
        self.subs: list[Subscriber] = []
        self.sinks: list[RecordingSink] = []
        for _ in range(subscribers):
            sub = Subscriber((compile_selector("/t", "topic"),), None,
                             limits=SubscriberLimits(), on_ready=self.flusher.ready)
            sink = RecordingSink(self.clock, write_s)
            sub.go_live(sink)
            self.subs.append(sub)
            self.sinks.append(sink)
        self.seq = 0

    def offer(self, update: Update) -> None:
        for sub in self.subs:
            sub.offer(update.seq, update.frame)

    def publish(self, data: str) -> bytes:
        self.seq += 1
        update = Update.create(["/t"], data).stored(self.seq, self.clock.now)
        self.flusher.deliver(self.offer, update)
        return update.frame


def test_an_update_that_finds_the_hub_idle_is_written_in_the_same_turn() -> None:
    rig = Rig()
    frame = rig.publish("idle")
    assert rig.sinks[0].writes == [frame]
    assert rig.loop.pending == []  # nothing left for a later turn


def test_a_burst_within_the_linger_is_one_write() -> None:
    rig = Rig()
    first = rig.publish("first")
    rig.clock.now += LINGER / 2  # within the linger of the end of the first pass
    burst = [rig.publish("a"), rig.publish("b")]
    rig.clock.now += LINGER / 4
    burst.append(rig.publish("c"))
    assert rig.sinks[0].writes == [first]  # waiting for the batch to fill
    rig.loop.advance(LINGER / 2)
    assert rig.sinks[0].writes == [first]  # the last update came less than a linger ago
    rig.loop.advance(LINGER)
    assert rig.sinks[0].writes == [first, b"".join(burst)]


def test_a_batch_waits_at_most_as_long_as_the_last_pass_took() -> None:
    # A pass over 100 subscribers whose writes take 0.1 ms each: 10 ms.
    rig = Rig(subscribers=100, write_s=0.0001)
    rig.publish("first")
    rig.loop.advance(0)
    assert abs(rig.flusher.last_pass_s - 0.010) < 1e-9
    started = rig.clock.now
    # Updates keep coming closer together than the linger: the batch is flushed when it
    # is as old as the last pass took, not when they stop.
    while not rig.sinks[0].writes[1:]:
        rig.publish("more")
        rig.loop.advance(LINGER / 2)
    assert 0.010 <= rig.sinks[0].times[1] - started < 0.010 + LINGER


def test_a_batch_never_waits_longer_than_max_flush_wait() -> None:
    rig = Rig(subscribers=40, write_s=0.005)  # a pass of 200 ms
    rig.publish("first")
    while rig.loop.run_once():
        pass
    assert rig.flusher.last_pass_s > MAX_WAIT
    started = rig.clock.now
    while not rig.sinks[0].writes[1:]:
        rig.publish("more")
        rig.loop.advance(LINGER / 2)
    assert MAX_WAIT <= rig.sinks[0].times[1] - started < MAX_WAIT + LINGER


def test_a_long_pass_yields_in_slices_and_later_updates_join_its_writes() -> None:
    rig = Rig(subscribers=100, write_s=0.001)  # 1 ms per write: 32 writes pass any slice
    one = rig.publish("one")
    # The first slice (of an update that found the hub idle) stopped at the first check
    # of the clock, after 32 subscribers, and the rest waits for the next loop turn.
    assert [len(s.writes) for s in rig.sinks] == [1] * 32 + [0] * 68
    assert len(rig.loop.pending) == 1
    two = rig.publish("two")  # published between slices
    rig.loop.run_once()
    assert [len(s.writes) for s in rig.sinks] == [1] * 64 + [0] * 36
    rig.loop.advance(0)
    assert all(s.writes == [one, two] for s in rig.sinks[:32])  # their own pass, later
    assert all(s.writes == [one + two] for s in rig.sinks[32:])  # one joined write
    assert rig.loop.pending == []


def test_a_pass_records_how_long_it_took_over_all_its_slices() -> None:
    rig = Rig(subscribers=64, write_s=0.001)
    started = rig.clock.now
    rig.publish("x")
    assert rig.flusher.last_pass_s == 0.0  # not over: one slice of two
    rig.loop.advance(0)
    assert abs(rig.flusher.last_pass_s - (rig.clock.now - started)) < 1e-9
    assert abs(rig.flusher.last_pass_s - 0.064) < 1e-9
