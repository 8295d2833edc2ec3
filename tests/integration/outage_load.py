"""The load the outage tests keep on `tidings serve` processes while storage goes away:
publishers that publish again what was refused, and subscribers that stream and resume
the way a browser's EventSource does.

Each publisher publishes `NAME-0`, `NAME-1`, ... one at a time with that id, so an update
refused with 503/507 (maybe stored after all, its answer lost) is published again with the
same id, which the hub stores once. Every count and wait is bounded; waits are on an
event the load sets whenever something happens, never on a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import httpx

from tests.conftest import open_stream, publish

TOPIC = "/outage"
# Between two publishes of one publisher, and before publishing a refused update again
# (the answer's Retry-After says seconds: far too long for a test).
PACE_S = 0.01
RETRY_S = 0.05


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    retry_after: str | None
    message: str
    took_s: float


class Follower:
    """One subscriber: streams; when the stream ends or cannot be opened, opens it again
    with the id of the last event it received (EventSource's Last-Event-ID)."""

    def __init__(self, client: httpx.AsyncClient, url: str, changed: asyncio.Event) -> None:
        self.client, self.url, self._changed = client, url, changed
        self.ids: list[str] = []
        # Each stream opened: the Last-Event-ID sent and the one the hub answered with.
        self.opened: list[tuple[str | None, str | None]] = []
        self.refused: list[int] = []

    async def run(self) -> None:
        while True:
            sent = self.ids[-1] if self.ids else None
            try:
                async with open_stream(self.client, self.url, [("topic", TOPIC)],
                                       {"Last-Event-ID": sent} if sent else {}) as stream:
                    if stream.response.status_code != 200:
                        self.refused.append(stream.response.status_code)
                    else:
                        self.opened.append((sent, stream.response.headers.get("last-event-id")))
                        self._changed.set()
                        while True:
                            event = await stream.next(timeout_s=3600)
                            if event.id is not None:
                                self.ids.append(event.id)
                                self._changed.set()
            except (httpx.HTTPError, StopAsyncIteration):
                pass  # the stream ended: open it again
            await asyncio.sleep(RETRY_S)


class Publisher:
    """Publishes `NAME-i` one after the other on one process until told to stop (or
    `limit`); a refused update is published again until it is acknowledged."""

    def __init__(self, client: httpx.AsyncClient, url: str, name: str,
                 changed: asyncio.Event) -> None:
        self.client, self.url, self.name, self._changed = client, url, name, changed
        self.acked: list[str] = []
        self.refusals: list[Refusal] = []
        self.slowest_s = 0.0

    async def run(self, stop: asyncio.Event, limit: int) -> None:
        # The stop is looked at only after an acknowledgement: an update left refused
        # might be stored after all, and would then reach subscribers unacknowledged.
        while len(self.acked) < limit and not stop.is_set():
            uid = f"{self.name}-{len(self.acked)}"
            while True:
                began = time.monotonic()
                reply = await publish(self.client, self.url, TOPIC, uid, id=uid)
                took_s = time.monotonic() - began
                self.slowest_s = max(self.slowest_s, took_s)
                if reply.status_code == 200:
                    assert reply.text == uid
                    self.acked.append(uid)
                    self._changed.set()
                    break
                is_json = reply.headers.get("content-type") == "application/json"
                self.refusals.append(Refusal(
                    reply.status_code, reply.headers.get("retry-after"),
                    reply.json().get("error", "") if is_json else reply.text, took_s))
                self._changed.set()
                await asyncio.sleep(RETRY_S)
            await asyncio.sleep(PACE_S)


class Load:
    """Followers on every process (connected before anything is published) and one
    publisher per process, as an async context manager."""

    def __init__(self, client: httpx.AsyncClient, urls: list[str], *,
                 followers_per_url: int = 2) -> None:
        self.changed = asyncio.Event()
        self.followers = [Follower(client, url, self.changed)
                          for url in urls for _ in range(followers_per_url)]
        self.publishers = [Publisher(client, url, f"p{i}", self.changed)
                           for i, url in enumerate(urls)]
        self._tasks: list[asyncio.Task[None]] = []
        self._publishing: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()

    async def __aenter__(self) -> Load:
        self._tasks = [asyncio.create_task(f.run()) for f in self.followers]
        await self.until(lambda: all(f.opened for f in self.followers), "followers connected")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for task in self._tasks + self._publishing:
            task.cancel()
        for task in self._tasks + self._publishing:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def acked(self) -> list[str]:
        return [uid for p in self.publishers for uid in p.acked]

    @property
    def refusals(self) -> list[Refusal]:
        return [r for p in self.publishers for r in p.refusals]

    async def until(self, condition: Callable[[], bool], what: str,
                    timeout_s: float = 20.0) -> None:
        """Wait until `condition()` holds, looking again whenever the load moves."""
        with anyio.fail_after(timeout_s):
            while not condition():
                for task in self._publishing:  # a publisher that failed fails the test
                    if task.done():
                        task.result()
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):  # and now and then regardless
                        await self.changed.wait()
        assert condition(), what

    def publish(self, limit: int = 2000) -> None:
        """Start (or resume) every publisher, until `stop_publishing` or `limit` each."""
        self._stop.clear()
        self._publishing = [asyncio.create_task(p.run(self._stop, limit))
                            for p in self.publishers]

    async def publish_each(self, count: int, timeout_s: float = 20.0) -> None:
        """Every publisher publishes `count` more; returns when all are acknowledged."""
        self._stop.clear()
        with anyio.fail_after(timeout_s):
            await asyncio.gather(*(p.run(self._stop, len(p.acked) + count)
                                   for p in self.publishers))

    async def stop_publishing(self, timeout_s: float = 20.0) -> None:
        self._stop.set()
        with anyio.fail_after(timeout_s):
            for task in self._publishing:
                await task
        self._publishing = []

    async def delivered(self, timeout_s: float = 20.0) -> None:
        """Wait until every follower has as many updates as were acknowledged."""
        count = len(self.acked)
        await self.until(lambda: all(len(f.ids) >= count for f in self.followers),
                         f"every follower received the {count} acknowledged updates",
                         timeout_s)

    def assert_exactly_once_in_one_order(self, expected: list[str] | None = None) -> None:
        """Every acknowledged update (or `expected`) reached every follower once, all in
        one order, in which each publisher's updates keep the order it published them."""
        wanted = set(self.acked if expected is None else expected)
        first = self.followers[0].ids
        for follower in self.followers:
            assert len(follower.ids) == len(set(follower.ids)), "a duplicate delivery"
            assert set(follower.ids) == wanted, (
                f"missing {sorted(wanted - set(follower.ids))[:10]},"
                f" unexpected {sorted(set(follower.ids) - wanted)[:10]}")
            assert follower.ids == first, "two followers saw different orders"
        for p in self.publishers:
            assert [uid for uid in first if uid.startswith(p.name + "-")] == [
                uid for uid in (expected or self.acked) if uid.startswith(p.name + "-")]


async def history(client: httpx.AsyncClient, url: str, count: int,
                  last_event_id: str = "earliest") -> tuple[str | None, list[str]]:
    """What a new subscriber resuming from `last_event_id` gets on `url`: the answered
    Last-Event-ID and the ids of the first `count` events, after which nothing comes."""
    async with open_stream(client, url, [("topic", TOPIC)],
                           {"Last-Event-ID": last_event_id}) as stream:
        assert stream.response.status_code == 200
        ids = [e.id or "" for e in await stream.take(count, timeout_s=10)]
        assert await stream.nothing_within(0.3)
        return stream.response.headers.get("last-event-id"), ids
