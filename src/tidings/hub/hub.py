"""The hub: registry of subscribers, publish, fan-out and replay. It knows nothing of HTTP.

An update's path: `publish()` awaits `transport.append()` (durable, assigns seq) and
returns; the one `_fan_out` task reads `transport.tail()` and offers the update's frame to
every subscriber that may see it (filtered subscribers through hub/filters.py's index).
Publishers never wait on sockets. What `publish_many()` stored (the feeds' tailers) is
fanned out right after, when it is next in seq order, and the tail skips it: either way
each update once, in seq order. When the offered
frames are written is the write scheduler's call (hub/flush.py); presence events and the
subscriptions API's data are hub/subscriptions.py's; the transport is the port
hub/transport.py defines.

A subscriber's path: `connect()` resolves Last-Event-ID to a seq L, then in one step with
no await registers the subscriber and snapshots H, the last seq fanned out. Replay covers
(L, H]; live frames above H collect in the buffer meanwhile; the writer drops any seq it has
already sent, so the seam has no gap and no duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field

from tidings.errors import BadRequest, Forbidden, ServiceUnavailable, TidingsError
from tidings.hub.auth import Claims
from tidings.hub.filters import FilterIndex, IndexKey
from tidings.hub.flush import FlushScheduler
from tidings.hub.subscriber import CloseReason, Sink, State, Subscriber, SubscriberLimits
from tidings.hub.subscriptions import ActiveSubscriptions, listing, presence_updates
from tidings.hub.topics import Selector
from tidings.hub.transport import BatchAppend, Transport
from tidings.hub.update import Update
from tidings.retry import run_with_backoff
from tidings.sse import HEARTBEAT
from tidings.tasks import cancel_and_wait

__all__ = ["EARLIEST", "Hub", "HubConfig", "Metrics", "Subscription"]

log = logging.getLogger(__name__)

EARLIEST = "earliest"
_REPLAY_PAGE = 500
# How long `stop` lets streams end after closing them.
_STOP_WAIT_S = 1.0


@dataclass(frozen=True, slots=True)
class HubConfig:
    heartbeat_s: float = 30.0
    max_subscribers: int = 20_000
    max_selectors: int = 100
    subscriptions: bool = False
    limits: SubscriberLimits = field(default_factory=SubscriberLimits)
    # Write batching: `FlushScheduler`'s linger_s, max_wait_s, slice_s and first_slice_s
    # (hub/flush.py says what each does).
    flush_linger_s: float = 0.001
    max_flush_wait_s: float = 0.05
    flush_slice_s: float = 0.010
    first_slice_s: float = 0.002


def _counter(name: str, help: str) -> int:
    """A `Metrics` field starting at 0; `name` and `help` are what exporters show."""
    return field(default=0, metadata={"name": name, "help": help})


@dataclass(slots=True)
class Metrics:
    """The hub's counters, each with its exported name and meaning (web/ops.py's /metrics
    lists every field), so a counter added here is exported with no other edit."""

    published: int = _counter("tidings_updates_published_total", "Updates published.")
    deliveries: int = _counter("tidings_deliveries_total", "Updates handed to subscribers.")
    replayed: int = _counter("tidings_replayed_total",
                             "Updates sent from history on (re)connect.")
    connects: int = _counter("tidings_connects_total", "Subscriber connections opened.")
    disconnects: int = _counter("tidings_disconnects_total", "Subscriber connections closed.")
    slow_disconnects: int = _counter("tidings_slow_disconnects_total",
                                     "Subscribers disconnected because they fell behind.")


class Subscription:
    """One subscriber's connection to the hub, as an async context manager.

    Inside `async with`: replay the history, then hand over a sink for live frames. Leaving
    it unregisters the subscriber (and publishes its presence event) whatever happened.
    """

    __slots__ = (
        "_hub", "_last_event_id_asked", "expiry", "last_event_id", "replay_range", "subscriber"
    )

    def __init__(
        self,
        hub: Hub,
        selectors: tuple[Selector, ...],
        claims: Claims | None,
        last_event_id: str | None,
        accept: Callable[[Update], bool] | None = None,
        index: IndexKey | None = None,
    ) -> None:
        self._hub = hub
        self._last_event_id_asked = last_event_id
        self.subscriber = Subscriber(
            selectors, claims, limits=hub.config.limits, on_ready=hub._flusher.ready,
            accept=accept, index_key=index,
        )
        self.replay_range = (0, 0)
        self.expiry: asyncio.TimerHandle | None = None
        # Value for the Last-Event-ID / Mercure-Last-Event-ID response headers.
        self.last_event_id = EARLIEST

    async def __aenter__(self) -> Subscription:
        await self._hub._open(self, self._last_event_id_asked)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self.expiry is not None:
            self.expiry.cancel()
        await self._hub._close(self.subscriber)

    def close(self, reason: CloseReason) -> None:
        self.subscriber.close(reason)

    async def replay(self) -> AsyncIterator[bytes]:
        """The visible updates of (L, H], in pages, each page one joined write."""
        sub = self.subscriber
        cursor, end = self.replay_range
        while cursor < end and not sub.closed:
            page = await self._hub.transport.read_after(cursor, _REPLAY_PAGE)
            parts = []
            for update in page:
                if update.seq > end:
                    break
                cursor = update.seq
                if self._hub.may_see(sub, update):
                    parts.append(update.frame)
            sub.last_sent_seq = max(sub.last_sent_seq, cursor)
            if parts:
                self._hub.metrics.replayed += len(parts)
                yield b"".join(parts)
            if len(page) < _REPLAY_PAGE:
                break

    def go_live(self, sink: Sink) -> None:
        """From now on the hub writes this subscriber's frames to `sink` as they come."""
        self.subscriber.go_live(sink)


class Hub:
    def __init__(self, transport: Transport, config: HubConfig | None = None) -> None:
        self.transport = transport
        # Checked once: a runtime protocol check walks the protocol's members.
        self._batch_append = transport if isinstance(transport, BatchAppend) else None
        self.config = config or HubConfig()
        self.metrics = Metrics()
        self._subscribers: set[Subscriber] = set()
        # Fan-out finds candidates through an exact-topic index; the filtered subscribers
        # of an exact topic through that topic's filter index (hub/filters.py), which
        # skips those whose filter cannot match; subscribers with any pattern selector
        # ("*", templates, URL patterns) are checked one by one. Dicts used as ordered
        # sets: fan-out walks subscribers in the order they connected, roughly their
        # order in memory, measurably faster than a set's hash order.
        self._by_topic: dict[str, dict[Subscriber, None]] = {}
        self._filtered: dict[str, FilterIndex[Subscriber]] = {}
        self._wide: dict[Subscriber, None] = {}
        self._last_seq = 0
        self._last_id: str | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        # Set while no subscriber is registered: `stop` waits on it for streams to end.
        self._no_subscribers = asyncio.Event()
        self._no_subscribers.set()
        c = self.config
        self._flusher = FlushScheduler(
            linger_s=c.flush_linger_s, max_wait_s=c.max_flush_wait_s,
            slice_s=c.flush_slice_s, first_slice_s=c.first_slice_s,
        )

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        await self.transport.start()
        self._last_seq = self.transport.last_seq
        last = await self.transport.read_after(self._last_seq - 1, 1) if self._last_seq else []
        self._last_id = last[0].id if last else None
        self._tasks = [
            asyncio.create_task(self._fan_out(), name="tidings-fan-out"),
            asyncio.create_task(self._sweep(), name="tidings-heartbeats"),
        ]

    def begin_shutdown(self) -> None:
        """Refuse new work and end every stream; safe to call more than once."""
        self._stopping = True
        for sub in list(self._subscribers):
            sub.close(CloseReason.SHUTDOWN)

    async def stop(self) -> None:
        """Close every stream, stop the background tasks, close the transport."""
        self.begin_shutdown()
        # Let writers see the close and finish their responses, for a while.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_STOP_WAIT_S):
                await self._no_subscribers.wait()
        await cancel_and_wait(*self._tasks)
        await self.transport.close()

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    # -- publishing ----------------------------------------------------------------

    async def publish(self, update: Update) -> Update:
        """Store the update; it is acknowledged (and safe) when this returns."""
        if self._stopping:
            raise ServiceUnavailable("the hub is shutting down")
        stored = await self.transport.append(update)
        self.metrics.published += 1
        return stored

    async def publish_many(self, updates: Sequence[Update]) -> None:
        """Store `updates` in this order; all are acknowledged when this returns. Together
        where the transport can (`BatchAppend`), else one after the other; either way what
        is stored when this raises is a prefix, so publishing them again (the transport
        stores each identical update once) keeps the order."""
        if not updates:
            return
        if self._stopping:
            raise ServiceUnavailable("the hub is shutting down")
        if self._batch_append is not None:
            stored = await self._batch_append.append_many(updates)
            self.metrics.published += len(updates)
        else:
            stored = []
            for update in updates:
                stored.append(await self.transport.append(update))
                self.metrics.published += 1
        if stored:
            # Right after this turn, not inside it: the publisher (a feed's tailer) goes
            # on to its next read meanwhile.
            asyncio.get_running_loop().call_soon(self._fan_out_stored, stored, 0)

    async def _fan_out(self) -> None:
        # The bus may go away (a restart, a network blip): each attempt resumes from the
        # last seq fanned out, so subscribers lose nothing.
        await run_with_backoff(self._fan_out_from_last, what="fan-out",
                               position=lambda: f"seq {self._last_seq}")

    async def _fan_out_from_last(self) -> None:
        deliver, offer = self._flusher.deliver, self._offer
        clock, slice_s = time.monotonic, self.config.flush_slice_s
        until = clock() + slice_s
        async for update in self.transport.tail(self._last_seq):
            if update.seq <= self._last_seq:
                continue  # fanned out already, as this process stored it (`publish_many`)
            deliver(offer, update)
            if clock() > until:
                # A page of updates is fanned out in slices: between them the event loop
                # runs the rest (the feeds' tailers reading their logs, publishers,
                # connections), which a long page would otherwise hold up.
                await asyncio.sleep(0)
                until = clock() + slice_s

    def _fan_out_stored(self, stored: Sequence[Update], start: int) -> None:
        """Fan out updates this process has just stored (`publish_many`), from
        `stored[start]` on, without waiting for the tail to read them back (a NOTIFY and a
        query on PostgreSQL), when they are next in line: each only if its seq follows
        the last one fanned out. At a gap (another process stored updates in between, not
        fanned out yet) the rest is left to the tail, which brings everything in seq
        order and skips what was fanned out here. In slices, like the tail."""
        deliver, offer, clock = self._flusher.deliver, self._offer, time.monotonic
        until = clock() + self.config.flush_slice_s
        for i in range(start, len(stored)):
            update = stored[i]
            if update.seq <= self._last_seq:
                continue  # the tail was first
            if update.seq != self._last_seq + 1:
                return
            deliver(offer, update)
            if clock() > until and i + 1 < len(stored):
                asyncio.get_running_loop().call_soon(self._fan_out_stored, stored, i + 1)
                return

    def _offer(self, update: Update) -> None:
        # A subscriber is in one of _by_topic, _filtered and _wide, so the three passes
        # never offer it the same update twice.
        seq, frame, topics = update.seq, update.frame, update.topics
        delivered = 0
        if update.private:
            for sub in self._exact_candidates(topics):
                if sub.claims is not None and sub.claims.may_read_private(topics):
                    delivered += sub.offer(seq, frame)
        else:
            for sub in self._exact_candidates(topics):
                delivered += sub.offer(seq, frame)
        if self._filtered:
            for sub in self._filtered_candidates(update):
                if update.private and (
                        sub.claims is None or not sub.claims.may_read_private(topics)):
                    continue
                if sub.accept is not None and sub.accept(update):
                    delivered += sub.offer(seq, frame)
        for sub in self._wide:
            if self.may_see(sub, update):
                delivered += sub.offer(seq, frame)
        self._last_seq = seq
        self._last_id = update.id
        self.metrics.deliveries += delivered

    def _exact_candidates(self, topics: tuple[str, ...]) -> Iterable[Subscriber]:
        """The unfiltered subscribers of any of `topics`, each once (a copy only when
        more than one topic has some)."""
        by_topic = self._by_topic
        if len(topics) == 1:
            return by_topic.get(topics[0], ())
        buckets = [bucket for topic in topics if (bucket := by_topic.get(topic))]
        if len(buckets) <= 1:
            return buckets[0] if buckets else ()
        merged: dict[Subscriber, None] = {}
        for bucket in buckets:
            merged |= bucket
        return merged

    def _filtered_candidates(self, update: Update) -> Iterable[Subscriber]:
        """The filtered subscribers of any of the update's topics whose filter may accept
        it, each once."""
        indexes = [index for topic in update.topics if (index := self._filtered.get(topic))]
        if len(indexes) == 1:
            return indexes[0].candidates(update)
        return dict.fromkeys(sub for index in indexes for sub in index.candidates(update))

    @staticmethod
    def may_see(sub: Subscriber, update: Update) -> bool:
        if not sub.matcher.matches_any(update.topics):
            return False
        if update.private and (
                sub.claims is None or not sub.claims.may_read_private(update.topics)):
            return False
        return sub.accept is None or sub.accept(update)

    # -- subscribing ---------------------------------------------------------------

    def connect(
        self,
        selectors: Sequence[Selector],
        claims: Claims | None,
        last_event_id: str | None = None,
        *,
        accept: Callable[[Update], bool] | None = None,
        index: IndexKey | None = None,
    ) -> Subscription:
        """`async with hub.connect(selectors, claims, last_event_id) as subscription:`

        `accept`, when given, is a further filter: only updates it returns True for are
        replayed and delivered (it must be cheap and must not raise). `index`, when given
        with it, says which updates it may accept (hub/filters.py), so that fan-out asks
        it about those only."""
        if not selectors:
            raise BadRequest("at least one topic selector (topic=, match=) is required")
        if len(selectors) > self.config.max_selectors:
            raise BadRequest(f"at most {self.config.max_selectors} selectors per subscription")
        return Subscription(self, tuple(selectors), claims, last_event_id, accept, index)

    async def _open(self, subscription: Subscription, last_event_id: str | None) -> None:
        if self._stopping:
            raise ServiceUnavailable("the hub is shutting down")
        if len(self._subscribers) >= self.config.max_subscribers:
            raise ServiceUnavailable("too many subscribers connected", retry_after_s=5)

        # Resolve the client's position before registering: this may await.
        header_id = EARLIEST
        start: int | None = None
        if last_event_id == EARLIEST:
            start = 0
        elif last_event_id is not None:
            found = await self.transport.find(last_event_id)
            if found is None:
                start = 0  # unknown or pruned: send what history has (the spec's earliest)
            else:
                start, header_id = found.seq, found.id

        # From here to registration: no await, so no update can slip between H and it.
        sub = subscription.subscriber
        end = self._last_seq
        if start is None:
            start = end
            header_id = self._last_id or EARLIEST
        sub.last_sent_seq = start
        subscription.replay_range = (start, end)
        subscription.last_event_id = header_id
        self._register(sub)
        if sub.expires_at is not None:
            # The stream must not outlive the token that authorized it.
            subscription.expiry = asyncio.get_running_loop().call_later(
                max(0.0, sub.expires_at - time.time()), sub.close, CloseReason.TOKEN_EXPIRED
            )
        self.metrics.connects += 1
        log.info("subscriber %s connected (%d selectors)", sub.id, len(sub.selectors))
        if self.config.subscriptions:
            try:
                await self._announce(sub, active=True)
            except BaseException:
                await self._close(sub)
                raise

    async def _close(self, sub: Subscriber) -> None:
        sub.close(CloseReason.CLIENT_GONE)  # keeps an earlier reason
        self._unregister(sub)
        self.metrics.disconnects += 1
        if sub.close_reason is CloseReason.SLOW:
            self.metrics.slow_disconnects += 1
        log.info("subscriber %s disconnected (%s)", sub.id,
                 sub.close_reason.value if sub.close_reason else "")
        if self.config.subscriptions and not self._stopping:
            with contextlib.suppress(TidingsError):
                await self._announce(sub, active=False)

    def _register(self, sub: Subscriber) -> None:
        self._subscribers.add(sub)
        self._no_subscribers.clear()
        # Filtered subscribers are filed apart, so the exact-topic fast path of `_offer`
        # never has to check for a filter.
        if sub.matcher.patterns or sub.matcher.matches_all:
            self._wide[sub] = None
        elif sub.accept is not None:
            for topic in sub.matcher.exact_topics:
                index = self._filtered.get(topic)
                if index is None:
                    index = self._filtered[topic] = FilterIndex()
                index.add(sub, sub.index_key)
        else:
            for topic in sub.matcher.exact_topics:
                self._by_topic.setdefault(topic, {})[sub] = None

    def _unregister(self, sub: Subscriber) -> None:
        self._subscribers.discard(sub)
        if not self._subscribers:
            self._no_subscribers.set()
        self._wide.pop(sub, None)
        for topic in sub.matcher.exact_topics:
            bucket = self._by_topic.get(topic)
            if bucket is not None:
                bucket.pop(sub, None)
                if not bucket:
                    del self._by_topic[topic]
            index = self._filtered.get(topic)
            if index is not None:
                index.remove(sub)
                if not index:
                    del self._filtered[topic]

    async def _sweep(self) -> None:
        """Heartbeats for idle streams: one pass over all subscribers, not a timer each."""
        heartbeat_s = self.config.heartbeat_s
        interval = max(0.05, min(heartbeat_s / 4, 5.0))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for sub in list(self._subscribers):
                if sub.state is State.LIVE and now - sub.last_write >= heartbeat_s:
                    sub.last_write = now
                    sub.offer(0, HEARTBEAT)

    # -- presence (active subscriptions, hub/subscriptions.py) ------------------------

    async def _announce(self, sub: Subscriber, *, active: bool) -> None:
        for update in presence_updates(sub, active=active):
            await self.publish(update)

    def subscriptions(self, topic: str, claims: Claims | None) -> ActiveSubscriptions:
        """The subscriptions API's data: the active subscriptions at or below `topic` (a
        topic under /.well-known/mercure/subscriptions). Forbidden unless `claims` may
        read that topic's private updates."""
        if claims is None or not claims.may_read_private([topic]):
            raise Forbidden("the token does not allow reading these subscriptions")
        return ActiveSubscriptions(
            topic, self._last_id or EARLIEST, listing(self._subscribers, topic)
        )
