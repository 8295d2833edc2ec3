"""The hub: registry of subscribers, fan-out, replay, presence. It knows nothing of HTTP.

An update's path: `publish()` awaits `transport.append()` (durable, assigns seq) and
returns; the one `_fan_out` task reads `transport.tail()` and offers the update's frame to
every subscriber that may see it. Publishers never wait on sockets.

A subscriber's path: `connect()` resolves Last-Event-ID to a seq L, then in one step with
no await registers the subscriber and snapshots H, the last seq fanned out. Replay covers
(L, H]; live frames above H collect in the buffer meanwhile; the writer drops any seq it has
already sent, so the seam has no gap and no duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote

from tidings.errors import BadRequest, NotFound, ServiceUnavailable, TidingsError
from tidings.hub.auth import Claims
from tidings.hub.subscriber import CloseReason, Sink, State, Subscriber, SubscriberLimits
from tidings.hub.topics import Selector
from tidings.hub.update import RESERVED_PREFIX, Update
from tidings.retry import run_with_backoff
from tidings.sse import HEARTBEAT
from tidings.transports.base import Transport

__all__ = ["EARLIEST", "Hub", "HubConfig", "Metrics", "Subscription"]

log = logging.getLogger(__name__)

EARLIEST = "earliest"
SUBSCRIPTIONS_PREFIX = RESERVED_PREFIX + "/subscriptions"
_MATCH_TYPE = {"match": "Exact", "urlpattern": "URLPattern"}
_REPLAY_PAGE = 500


@dataclass(frozen=True, slots=True)
class HubConfig:
    heartbeat_s: float = 30.0
    max_subscribers: int = 20_000
    max_selectors: int = 100
    subscriptions: bool = False
    limits: SubscriberLimits = field(default_factory=SubscriberLimits)
    # Fan-out writes (one write costs far more than one more frame in it, so batching
    # pays, but only when updates come faster than write passes end):
    # - An update that finds the hub idle is offered to its subscribers and written at once.
    # - One that arrives within `flush_linger_s` of the end of the previous write pass (a
    #   publisher keeping the hub busy) starts a batch: its pass waits `flush_linger_s`, and
    #   longer while updates keep coming closer together than that, until the batch is as
    #   old as the previous pass took (at most `max_flush_wait_s`).
    # - A write pass yields to the event loop every `flush_slice_s` (the first time after
    #   `first_slice_s` for an update that found the hub idle: a publisher whose
    #   acknowledgement waits on a bus reply that came with the update's own fan-out then
    #   has it at once), so that a large fan-out does
    #   not stall publishes and connections, and updates published meanwhile share the
    #   writes still to come.
    # Updates at a steady rate below saturation thus wait at most `flush_linger_s`.
    flush_linger_s: float = 0.001
    max_flush_wait_s: float = 0.05
    flush_slice_s: float = 0.010
    first_slice_s: float = 0.002


@dataclass(slots=True)
class Metrics:
    published: int = 0
    deliveries: int = 0
    connects: int = 0
    disconnects: int = 0
    slow_disconnects: int = 0
    replayed: int = 0


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
    ) -> None:
        self._hub = hub
        self._last_event_id_asked = last_event_id
        self.subscriber = Subscriber(
            selectors, claims, limits=hub.config.limits, on_ready=hub._on_ready,
            accept=accept,
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
        self.config = config or HubConfig()
        self.metrics = Metrics()
        self._subscribers: set[Subscriber] = set()
        # Fan-out finds candidates through an exact-topic index; subscribers with any
        # pattern selector ("*", templates, URL patterns) are checked one by one. Dicts
        # used as ordered sets: fan-out walks subscribers in the order they connected,
        # roughly their order in memory, measurably faster than a set's hash order.
        self._by_topic: dict[str, dict[Subscriber, None]] = {}
        self._wide: dict[Subscriber, None] = {}
        self._last_seq = 0
        self._last_id: str | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._ready: list[Subscriber] = []
        self._flush_handle: asyncio.Handle | None = None
        self._last_flush_end = 0.0
        self._last_flush_took = 0.0
        self._batch_started = 0.0
        self._last_update_at = 0.0
        # When the write pass under way (over several slices) started.
        self._pass_started: float | None = None

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
        # Let writers see the close and finish their responses.
        for _ in range(50):
            if not self._subscribers:
                break
            await asyncio.sleep(0.02)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
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

    async def _fan_out(self) -> None:
        # The bus may go away (a restart, a network blip): each attempt resumes from the
        # last seq fanned out, so subscribers lose nothing.
        await run_with_backoff(self._fan_out_from_last, what="fan-out",
                               position=lambda: f"seq {self._last_seq}")

    async def _fan_out_from_last(self) -> None:
        async for update in self.transport.tail(self._last_seq):
            self._deliver(update)

    def _deliver(self, update: Update) -> None:
        idle = self._flush_handle is None and (
            time.monotonic() - self._last_flush_end >= self.config.flush_linger_s)
        self._offer(update)
        self._last_update_at = time.monotonic()
        if idle and self._flush_handle is not None:
            # An update that found the hub idle is written now, not after a turn of the
            # event loop (the flush `_on_ready` scheduled).
            self._flush_handle.cancel()
            self._flush(self.config.first_slice_s)

    def _offer(self, update: Update) -> None:
        seq, frame, topics = update.seq, update.frame, update.topics
        delivered = 0
        if len(topics) == 1:
            candidates: dict[Subscriber, None] | tuple[()] = self._by_topic.get(topics[0], ())
        else:
            candidates = {}
            for topic in topics:
                candidates |= self._by_topic.get(topic, {})
        if update.private:
            for sub in candidates:
                if sub.claims is not None and sub.claims.may_read_private(topics):
                    delivered += sub.offer(seq, frame)
        else:
            for sub in candidates:
                delivered += sub.offer(seq, frame)
        for sub in self._wide:
            if sub not in candidates and self.may_see(sub, update):
                delivered += sub.offer(seq, frame)
        self._last_seq = seq
        self._last_id = update.id
        self.metrics.deliveries += delivered

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
    ) -> Subscription:
        """`async with hub.connect(selectors, claims, last_event_id) as subscription:`

        `accept`, when given, is a further filter: only updates it returns True for are
        replayed and delivered (it must be cheap and must not raise)."""
        if not selectors:
            raise BadRequest("at least one topic selector (topic=, match=) is required")
        if len(selectors) > self.config.max_selectors:
            raise BadRequest(f"at most {self.config.max_selectors} selectors per subscription")
        return Subscription(self, tuple(selectors), claims, last_event_id, accept)

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
        # Filtered subscribers go through `may_see` (with the wide ones), so the exact-topic
        # fast path of `_deliver` never has to check for a filter.
        if sub.matcher.patterns or sub.matcher.matches_all or sub.accept is not None:
            self._wide[sub] = None
        else:
            for topic in sub.matcher.exact_topics:
                self._by_topic.setdefault(topic, {})[sub] = None

    def _unregister(self, sub: Subscriber) -> None:
        self._subscribers.discard(sub)
        self._wide.pop(sub, None)
        for topic in sub.matcher.exact_topics:
            bucket = self._by_topic.get(topic)
            if bucket is not None:
                bucket.pop(sub, None)
                if not bucket:
                    del self._by_topic[topic]

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

    # -- flushing ------------------------------------------------------------------

    def _on_ready(self, sub: Subscriber) -> None:
        self._ready.append(sub)
        if self._flush_handle is None:
            loop = asyncio.get_running_loop()
            now = time.monotonic()
            if now - self._last_flush_end < self.config.flush_linger_s:
                self._batch_started = now
                self._flush_handle = loop.call_later(self.config.flush_linger_s, self._linger)
            else:
                self._flush_handle = loop.call_soon(self._flush)

    def _linger(self) -> None:
        """A batch's timer: flush, or wait on while updates keep coming."""
        now = time.monotonic()
        linger = self.config.flush_linger_s
        max_wait = min(max(self._last_flush_took, linger), self.config.max_flush_wait_s)
        until = min(self._last_update_at + linger, self._batch_started + max_wait)
        if until - now > 0.0001:
            self._flush_handle = asyncio.get_running_loop().call_later(until - now, self._linger)
        else:
            self._flush()

    def _flush(self, slice_s: float | None = None) -> None:
        """One slice of a write pass over the ready subscribers (`flush_slice_s` long unless
        told otherwise); the next slice is scheduled behind whatever else the event loop
        has to do."""
        self._flush_handle = None
        ready = self._ready
        start = time.monotonic()
        if self._pass_started is None:
            self._pass_started = start
        until = start + (self.config.flush_slice_s if slice_s is None else slice_s)
        done = 0
        for sub in ready:
            sub.flush(start)
            done += 1
            if not done & 31 and time.monotonic() > until:
                break
        del ready[:done]
        if ready:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)
        else:
            self._end_pass(self._pass_started, time.monotonic())

    def _end_pass(self, started: float, end: float) -> None:
        self._pass_started = None
        self._last_flush_took = end - started
        self._last_flush_end = end

    # -- presence (active subscriptions) ---------------------------------------------

    @staticmethod
    def _subscription_topic(selector: Selector, subscriber_id: str) -> str:
        encoded_sub = quote(subscriber_id, safe="")
        if selector.kind == "topic":
            return f"{SUBSCRIPTIONS_PREFIX}/{quote(selector.value, safe='')}/{encoded_sub}"
        match_type = _MATCH_TYPE[selector.kind]
        return f"{SUBSCRIPTIONS_PREFIX}/{match_type}/{quote(selector.value, safe='')}/{encoded_sub}"

    def _describe(self, sub: Subscriber, selector: Selector, active: bool) -> dict[str, object]:
        topic = self._subscription_topic(selector, sub.id)
        doc: dict[str, object] = {
            "@context": "https://mercure.rocks/",
            "id": topic,
            "type": "Subscription",
            "subscriber": sub.id,
            "active": active,
        }
        if selector.kind == "topic":
            doc["topic"] = selector.value
        else:
            doc["matchType"] = _MATCH_TYPE[selector.kind]
            doc["match"] = selector.value
        if sub.claims is not None and sub.claims.payload is not None:
            doc["payload"] = sub.claims.payload
        return doc

    async def _announce(self, sub: Subscriber, *, active: bool) -> None:
        for selector in sub.selectors:
            doc = self._describe(sub, selector, active)
            update = Update.create(
                [str(doc["id"])], json.dumps(doc), private=True, allow_reserved=True
            )
            await self.publish(update)

    def subscriptions(self, path: str, claims: Claims | None) -> dict[str, object]:
        """The subscriptions API: `path` is below /.well-known/mercure/subscriptions."""
        from tidings.errors import Forbidden

        full = SUBSCRIPTIONS_PREFIX + (("/" + path) if path else "")
        if claims is None or not claims.may_read_private([full]):
            raise Forbidden("the token does not allow reading these subscriptions")
        docs = [
            self._describe(sub, selector, True)
            for sub in self._subscribers
            for selector in sub.selectors
        ]
        matching = [d for d in docs if str(d["id"]) == full or str(d["id"]).startswith(full + "/")]
        last_id = self._last_id or EARLIEST
        if path and path.count("/") >= 1 and any(str(d["id"]) == full for d in matching):
            single = next(d for d in matching if str(d["id"]) == full)
            return {**single, "lastEventID": last_id}
        if path and not matching and path.count("/") >= 2:
            raise NotFound("no such subscription")
        return {
            "@context": "https://mercure.rocks/",
            "id": full,
            "type": "Subscriptions",
            "lastEventID": last_id,
            "subscriptions": [{k: v for k, v in d.items() if k != "@context"} for d in matching],
        }
