"""When fan-out's buffered frames are written: the hub's write scheduler.

Fan-out (`Hub._offer`) only appends frames to subscribers' buffers; a subscriber with
something to write tells the scheduler (`ready`), and a write pass hands each ready
buffer, joined, to its connection in one write. One write costs far more than one more
frame in it, so batching pays, but only when updates come faster than write passes end:

- An update that finds the hub idle is offered to its subscribers and written at once, in
  the same turn of the event loop (`deliver`).
- One that arrives within `linger_s` of the end of the previous write pass (a publisher
  keeping the hub busy) starts a batch: its pass waits `linger_s`, and longer while
  updates keep coming closer together than that, until the batch is as old as the
  previous pass took (at most `max_wait_s`).
- A write pass yields to the event loop every `slice_s` (the first time after
  `first_slice_s` for an update that found the hub idle: a publisher whose
  acknowledgement waits on a bus reply that came with the update's own fan-out then has
  it at once), so that a large fan-out does not stall publishes and connections, and
  updates published meanwhile share the writes still to come.

Updates at a steady rate below saturation thus wait at most `linger_s`.

Time and scheduling are injected (a monotonic clock, and the loop's `call_soon` /
`call_later`), so tests/unit/test_flush.py drives all of this with a fake clock and no
sockets. The scheduler never awaits: it runs inside fan-out's turn or in loop callbacks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

from tidings.hub.subscriber import Subscriber
from tidings.hub.update import Update

__all__ = ["Cancellable", "FlushScheduler", "Scheduling"]


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class Scheduling(Protocol):
    """The two event-loop calls the scheduler uses (an asyncio loop has both)."""

    def call_soon(self, callback: Callable[[], object]) -> Cancellable: ...

    def call_later(self, delay: float, callback: Callable[[], object]) -> Cancellable: ...


class FlushScheduler:
    __slots__ = (
        "_batch_started",
        "_clock",
        "_first_slice_s",
        "_handle",
        "_last_end",
        "_last_took",
        "_last_update_at",
        "_linger_s",
        "_loop",
        "_max_wait_s",
        "_pass_started",
        "_ready",
        "_slice_s",
    )

    def __init__(
        self,
        *,
        linger_s: float,
        max_wait_s: float,
        slice_s: float,
        first_slice_s: float,
        clock: Callable[[], float] = time.monotonic,
        loop: Scheduling | None = None,
    ) -> None:
        self._linger_s = linger_s
        self._max_wait_s = max_wait_s
        self._slice_s = slice_s
        self._first_slice_s = first_slice_s
        self._clock = clock
        # None: the running loop at each scheduling (the hub is built before its loop runs).
        self._loop = loop
        # Subscribers with frames to write, in the order they became ready.
        self._ready: list[Subscriber] = []
        # The scheduled slice or batch timer; None when no flush is pending.
        self._handle: Cancellable | None = None
        self._last_end = 0.0  # when the last complete write pass ended
        self._last_took = 0.0  # how long it took
        self._batch_started = 0.0
        self._last_update_at = 0.0
        # When the write pass under way (over several slices) started.
        self._pass_started: float | None = None

    @property
    def last_pass_s(self) -> float:
        """How long the last complete write pass took, over all its slices."""
        return self._last_took

    def _scheduling(self) -> Scheduling:
        return self._loop or asyncio.get_running_loop()

    def deliver(self, offer: Callable[[Update], object], update: Update) -> None:
        """Fan `update` out with `offer` (which makes subscribers ready); when it found
        the hub idle, write it now, not after a turn of the event loop."""
        clock = self._clock
        idle = self._handle is None and clock() - self._last_end >= self._linger_s
        offer(update)
        self._last_update_at = clock()
        if idle and self._handle is not None:
            # Cancel the flush `ready` scheduled and do it here.
            self._handle.cancel()
            self._flush(self._first_slice_s)

    def ready(self, sub: Subscriber) -> None:
        """A live subscriber has frames and no flush pending (its `on_ready`)."""
        self._ready.append(sub)
        if self._handle is None:
            now = self._clock()
            if now - self._last_end < self._linger_s:
                self._batch_started = now
                self._handle = self._scheduling().call_later(self._linger_s, self._linger)
            else:
                self._handle = self._scheduling().call_soon(self._flush)

    def _linger(self) -> None:
        """A batch's timer: flush, or wait on while updates keep coming."""
        now = self._clock()
        linger = self._linger_s
        max_wait = min(max(self._last_took, linger), self._max_wait_s)
        until = min(self._last_update_at + linger, self._batch_started + max_wait)
        if until - now > 0.0001:
            self._handle = self._scheduling().call_later(until - now, self._linger)
        else:
            self._flush()

    def _flush(self, slice_s: float | None = None) -> None:
        """One slice of a write pass over the ready subscribers (`slice_s` long unless
        told otherwise); the next slice is scheduled behind whatever else the event loop
        has to do."""
        self._handle = None
        ready = self._ready
        clock = self._clock
        start = clock()
        started = self._pass_started
        if started is None:
            started = self._pass_started = start
        until = start + (self._slice_s if slice_s is None else slice_s)
        done = 0
        for sub in ready:
            sub.flush(start)
            done += 1
            if not done & 31 and clock() > until:
                break
        del ready[:done]
        if ready:
            self._handle = self._scheduling().call_soon(self._flush)
        else:
            end = clock()
            self._pass_started = None
            self._last_took = end - started
            self._last_end = end
