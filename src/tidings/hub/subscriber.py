"""One subscriber: its selectors, its claims, and a bounded buffer of frames to write.

Lifecycle (a table, so it is easy to check):

    REPLAYING --go_live()--> LIVE --close()--> CLOSED
        \\-------------------------close()------/

`offer()` is called by fan-out and never awaits: it appends the frame to a bounded buffer.
The hub's flush hands the joined buffer to the subscriber's `Sink` (the web layer's
connection) in one write. A subscriber whose buffer passes its bounds is closed (it resumes
from history when it reconnects) so that a slow reader costs neither publishers nor other
readers.
"""

from __future__ import annotations

import enum
import functools
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from tidings.hub.auth import Claims
from tidings.hub.filters import IndexKey
from tidings.hub.topics import Matcher, Selector
from tidings.hub.update import Update

__all__ = ["CloseReason", "Sink", "State", "Subscriber", "SubscriberLimits"]


class Sink(Protocol):
    """Where a live subscriber's bytes go: the web layer's connection."""

    def write(self, chunk: bytes) -> bool:
        """Write without waiting. True when done; False when the write is still in
        progress, in which case the sink calls `Subscriber.drained()` once it is done."""
        ...


# Subscribers with the same selectors (say, every reader of one room) share one Matcher.
_matcher = functools.lru_cache(maxsize=4096)(Matcher)


class State(enum.Enum):
    REPLAYING = "replaying"
    LIVE = "live"
    CLOSED = "closed"


_TRANSITIONS: dict[State, frozenset[State]] = {
    State.REPLAYING: frozenset({State.LIVE, State.CLOSED}),
    State.LIVE: frozenset({State.CLOSED}),
    State.CLOSED: frozenset(),
}


class CloseReason(enum.Enum):
    CLIENT_GONE = "client gone"
    SLOW = "slow consumer"
    TOKEN_EXPIRED = "token expired"
    SHUTDOWN = "shutdown"


@dataclass(frozen=True, slots=True)
class SubscriberLimits:
    max_frames: int = 1000
    max_bytes: int = 8 << 20


class Subscriber:
    __slots__ = (
        "_backlog",
        "_floor",
        "_frames",
        "_max_bytes",
        "_max_frames",
        "_on_close",
        "_on_ready",
        "accept",
        "buffered_bytes",
        "busy",
        "claims",
        "close_reason",
        "closed",
        "dirty",
        "expires_at",
        "id",
        "index_key",
        "last_sent_seq",
        "last_write",
        "live",
        "matcher",
        "selectors",
        "sink",
        "state",
    )

    def __init__(
        self,
        selectors: tuple[Selector, ...],
        claims: Claims | None,
        *,
        limits: SubscriberLimits,
        on_ready: Callable[[Subscriber], None],
        subscriber_id: str | None = None,
        accept: Callable[[Update], bool] | None = None,
        index_key: IndexKey | None = None,
    ) -> None:
        self.id = subscriber_id or f"urn:uuid:{uuid.uuid4()}"
        # A server-side filter on top of the selectors (the collections' watch endpoint).
        # Called in fan-out and replay for each candidate update: it must be cheap and
        # must not raise. `index_key` says which updates it may accept (hub/filters.py),
        # so that fan-out asks it only about those.
        self.accept = accept
        self.index_key = index_key if accept is not None else None
        self.selectors = selectors
        self.matcher = _matcher(selectors)
        self.claims = claims
        self.state = State.REPLAYING
        # Mirrors of `state` as plain booleans: `offer` runs once per delivery.
        self.live = False
        self.closed = False
        self.close_reason: CloseReason | None = None
        self._max_frames = limits.max_frames
        self._max_bytes = limits.max_bytes
        # While replaying, live frames wait here with their seq, so that the ones replay
        # also sent can be dropped when going live. Seq 0 marks a frame outside history.
        self._backlog: list[tuple[int, bytes]] | None = []  # None once live
        # While live, frames to write. Lists, not deques: always drained whole, and an
        # empty deque costs 600 B per idle subscriber.
        self._frames: list[bytes] = []
        # Live frames with a seq at or below this were sent already (by replay).
        self._floor = 0
        self.buffered_bytes = 0
        # Set by the hub: called when a LIVE subscriber has frames and no flush pending.
        self._on_ready = on_ready
        self._on_close: Callable[[], object] | None = None
        self.sink: Sink | None = None
        self.dirty = False  # waiting in the hub's flush list
        self.busy = False  # the sink is still writing the previous chunk
        self.last_sent_seq = 0
        self.last_write = time.monotonic()
        self.expires_at = claims.expires_at if claims is not None else None

    def _move(self, new: State) -> None:
        if new not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"subscriber cannot go from {self.state} to {new}")
        self.state = new
        self.live = new is State.LIVE
        self.closed = new is State.CLOSED

    def offer(self, seq: int, frame: bytes) -> bool:
        """Queue a frame for the writer. False when nothing was queued: the subscriber is
        (now) closed because its buffer overflowed, or replay already sent this frame."""
        if self.closed:
            return False
        size = self.buffered_bytes + len(frame)
        if self.live:
            if seq and seq <= self._floor:
                return False  # replay sent it already
            frames = self._frames
            if len(frames) >= self._max_frames or size > self._max_bytes:
                self.close(CloseReason.SLOW)
                return False
            frames.append(frame)
            self.buffered_bytes = size
            if not self.dirty and not self.busy:
                self.dirty = True
                self._on_ready(self)
            return True
        backlog = self._backlog
        if backlog is None or len(backlog) >= self._max_frames or size > self._max_bytes:
            self.close(CloseReason.SLOW)
            return False
        backlog.append((seq, frame))
        self.buffered_bytes = size
        return True

    def take(self) -> bytes:
        """Everything buffered, joined into one write."""
        frames = self._frames
        if not frames:
            return b""
        chunk = frames[0] if len(frames) == 1 else b"".join(frames)
        frames.clear()
        self.buffered_bytes = 0
        return chunk

    def go_live(self, sink: Sink) -> None:
        """Replay is done: from now on the hub's flushes write to `sink`."""
        self.sink = sink
        self._floor = floor = self.last_sent_seq
        backlog, self._backlog = self._backlog or [], None
        self._frames = [frame for seq, frame in backlog if seq == 0 or seq > floor]
        self.buffered_bytes = sum(len(frame) for frame in self._frames)
        self._move(State.LIVE)
        if self._frames and not self.dirty:
            self.dirty = True
            self._on_ready(self)

    def flush(self, now: float) -> None:
        """Hand everything buffered to the sink in one write (called by the hub)."""
        self.dirty = False
        if self.busy or not self.live:
            return
        chunk = self.take()
        if chunk and self.sink is not None:
            self.last_write = now
            self.busy = not self.sink.write(chunk)

    def drained(self) -> None:
        """The sink finished a write that could not complete at once."""
        self.busy = False
        if self._frames and not self.dirty and self.live:
            self.dirty = True
            self._on_ready(self)

    def on_close(self, callback: Callable[[], object] | None) -> None:
        """Run `callback` when the subscriber is closed (the web layer ends the response)."""
        self._on_close = callback

    def close(self, reason: CloseReason) -> None:
        if self.state is State.CLOSED:
            return
        self._move(State.CLOSED)
        self.close_reason = reason
        self._frames = []
        self._backlog = None
        self.buffered_bytes = 0
        callback, self._on_close = self._on_close, None
        if callback is not None:
            callback()
