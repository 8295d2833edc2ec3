"""The Python client (tidings.client) against a real `tidings serve`: resume across a
restart with no loss and no repeat, auth errors raised instead of retried, 503 retried,
token refresh, and the sync wrapper."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import httpx
import pytest

from tests.conftest import PUBLISHER, HubProcess, RestartableHub, free_port, open_stream, token
from tidings.client import (
    AuthError,
    Client,
    HubError,
    HubUnreachable,
    PublishError,
    Subscription,
    SyncClient,
    TokenSource,
    publish_sync,
)
from tidings.errors import BadRequest
from tidings.feeds.sqlite import watch_table
from tidings.hub.tokens import encode_token
from tidings.sse import Event

pytestmark = pytest.mark.anyio

def fast(url: str, token: TokenSource | None = None,
         transport: httpx.AsyncBaseTransport | None = None) -> Client:
    """A client that retries quickly."""
    return Client(url, token=token, transport=transport, backoff_base_s=0.05, max_backoff_s=0.5)


async def until(predicate: Callable[[], bool], timeout_s: float = 15) -> None:
    with anyio.fail_after(timeout_s):
        while not predicate():
            await asyncio.sleep(0.02)


async def wait_subscribers(url: str, n: int, timeout_s: float = 15) -> None:
    async with httpx.AsyncClient(timeout=2) as http:
        with anyio.fail_after(timeout_s):
            while (await http.get(url + "/healthz")).json()["subscribers"] != n:
                await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def consuming(subscription: Subscription) -> AsyncIterator[asyncio.Queue[Event]]:
    """Iterate `subscription` in a task; its events land in the queue."""
    queue: asyncio.Queue[Event] = asyncio.Queue()

    async def consume() -> None:
        async for event in subscription:
            queue.put_nowait(event)

    task = asyncio.create_task(consume())
    try:
        yield queue
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await subscription.aclose()


async def take(queue: asyncio.Queue[Event], n: int, timeout_s: float = 15) -> list[Event]:
    with anyio.fail_after(timeout_s):
        return [await queue.get() for _ in range(n)]


async def test_publish_then_receive_typed_private_and_json(hub: HubProcess) -> None:
    reader = token(subscribe=["/c/{n}"])
    async with Client(hub.url, token=PUBLISHER) as publisher, Client(hub.url, token=reader) as c:
        events = c.subscribe(["/c/{n}"])
        async with consuming(events) as queue:
            await wait_subscribers(hub.url, 1)
            ids = [
                await publisher.publish("/c/1", json.dumps({"title": "Dune"})),
                await publisher.publish(["/c/2", "/other"], "a\n\nb", type="book", retry=900,
                                        id="fixed"),
                await publisher.publish("/c/3", "secret", private=True),
            ]
            got = await take(queue, 3)
    assert ids[0].startswith("urn:uuid:") and ids[1] == "fixed"
    assert [e.id for e in got] == ids
    assert json.loads(got[0].data) == {"title": "Dune"}
    assert (got[1].event, got[1].data, got[1].retry) == ("book", "a\n\nb", 900)
    assert got[2].data == "secret"
    assert events.last_event_id == ids[-1]


async def test_subscribe_survives_a_hub_restart_without_loss_or_repeat(
    restartable: RestartableHub,
) -> None:
    server = restartable.start()
    async with fast(server.url, PUBLISHER) as client:
        events = client.subscribe(["/r/{n}"])
        async with consuming(events) as queue:
            await wait_subscribers(server.url, 1)
            ids = [await client.publish(f"/r/{n}", str(n)) for n in (1, 2, 3)]
            assert [e.id for e in await take(queue, 3)] == ids

            server.stop(signal.SIGKILL)
            # Published while the hub at this port is down, through another hub process
            # on the same database: these can only arrive by replay from history.
            with restartable.side() as side:
                async with Client(side.url, token=PUBLISHER) as other:
                    ids += [await other.publish(f"/r/{n}", str(n)) for n in (4, 5)]
            server = restartable.start()
            ids.append(await client.publish("/r/6", "6"))  # right away
            got = await take(queue, 3)
            ids.append(await client.publish("/r/7", "7"))
            got += await take(queue, 1)
            # A repeat would be queued before this one.
            sentinel = await client.publish("/r/8", "8")
            assert [e.id for e in await take(queue, 1)] == [sentinel]
    assert [e.id for e in got] == ids[3:]
    assert [e.data for e in got] == ["4", "5", "6", "7"]
    assert events.connects >= 2 and events.last_event_id == sentinel


async def test_a_drop_before_the_first_event_loses_nothing(
    restartable: RestartableHub,
) -> None:
    server = restartable.start()
    async with fast(server.url, PUBLISHER) as client:
        before = await client.publish("/quiet", "before")
        events = client.subscribe("/quiet")
        async with consuming(events) as queue:
            # The stream's Last-Event-ID header: where a resume must start.
            await until(lambda: events.last_event_id is not None)
            assert events.last_event_id == before
            server.stop(signal.SIGKILL)
            with restartable.side() as side:
                async with Client(side.url, token=PUBLISHER) as other:
                    missed = await other.publish("/quiet", "while away")
            server = restartable.start()
            assert [e.id for e in await take(queue, 1)] == [missed]


async def test_subscribe_without_topics_fails_before_connecting() -> None:
    async with Client(f"http://127.0.0.1:{free_port()}") as client:  # nothing listens
        started = time.monotonic()
        with pytest.raises(BadRequest, match="at least one topic"):
            client.subscribe([])
        assert time.monotonic() - started < 1


async def test_auth_errors_are_raised_not_retried(
    hub_factory: type[HubProcess], tmp_path: Path
) -> None:
    db = tmp_path / "tidings.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT)")
        conn.commit()
    watch_table(f"sqlite:///{db}", "orders", read="private")
    server = hub_factory("--no-anonymous").start()
    forged = encode_token("another-key-another-key-another-key!", subscribe=["*"])
    cases: list[tuple[str | None, int]] = [(None, 401), (forged, 401)]
    for credentials, status in cases:
        async with fast(server.url, credentials) as client:
            events = client.subscribe(["/a"])
            with anyio.fail_after(5), pytest.raises(AuthError) as caught:
                await anext(events)
            assert caught.value.status == status and events.connects == 0
    async with fast(server.url, token(subscribe=["*"])) as client:
        # 403: a valid token whose publish claim does not cover the topic.
        with anyio.fail_after(5), pytest.raises(AuthError) as denied:
            await client.publish("/a", "x")
        assert denied.value.status == 403 and "403" in str(denied.value)
        assert isinstance(denied.value, PublishError)
    async with fast(server.url, token(subscribe=["/elsewhere"])) as client:
        # 403 on a stream: the token may not read the private table's changes.
        with anyio.fail_after(5), pytest.raises(AuthError) as hidden:
            await anext(client.watch("orders"))
        assert hidden.value.status == 403


async def test_an_expired_token_ends_the_subscription_unless_a_fresh_one_is_supplied(
    hub_factory: type[HubProcess],
) -> None:
    server = hub_factory().start()
    short = token(subscribe=["*"], expires_in_s=1.5)
    minted: list[str] = []

    def fresh() -> str:
        minted.append(token(subscribe=["*"], expires_in_s=1.5))
        return minted[-1]

    async with Client(server.url, token=PUBLISHER) as publisher, \
            fast(server.url, short) as expiring, \
            fast(server.url, fresh) as refreshing:
        ending = expiring.subscribe(["/x"])
        lasting = refreshing.subscribe(["/x"])
        async with consuming(lasting) as queue:
            await wait_subscribers(server.url, 1)
            first_event = asyncio.create_task(anext(ending))
            await wait_subscribers(server.url, 2)
            first = await publisher.publish("/x", "private 1", private=True)
            assert (await first_event).id == first
            assert [e.id for e in await take(queue, 1)] == [first]
            # The hub closes the stream at exp; reconnecting with the same token is a 401.
            with anyio.fail_after(10), pytest.raises(AuthError) as caught:
                await anext(ending)
            assert caught.value.status == 401
            # Meanwhile the other subscription reconnected with a fresh token each time.
            await until(lambda: len(minted) >= 3)
            second = await publisher.publish("/x", "private 2", private=True)
            assert [e.id for e in await take(queue, 1)] == [second]


async def test_a_full_hub_is_retried_until_there_is_room(
    hub_factory: type[HubProcess],
) -> None:
    server = hub_factory("--max-subscribers", "1").start()
    statuses: list[int] = []

    class Recording(httpx.AsyncHTTPTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            response = await super().handle_async_request(request)
            if request.method == "GET":
                statuses.append(response.status_code)
            return response

    async with httpx.AsyncClient(timeout=10) as http, \
            fast(server.url, PUBLISHER, Recording()) as client:
        async with open_stream(http, server.url, [("topic", "/full")]) as holder:
            assert holder.response.status_code == 200
            events = client.subscribe(["/full"])
            async with consuming(events) as queue:
                await until(lambda: statuses.count(503) >= 2)  # Retry-After: 5, capped
                await holder.response.aclose()  # room for one: the subscription gets in
                await until(lambda: 200 in statuses)
                sent = await client.publish("/full", "in")
                assert [e.id for e in await take(queue, 1)] == [sent]


def test_sync_client_and_publish_sync(hub: HubProcess) -> None:
    first = publish_sync(hub.url, "/sync", "one", token=PUBLISHER)
    with SyncClient(hub.url, token=PUBLISHER) as client:
        second = client.publish("/sync", "two")
        with client.subscribe(["/sync"], "earliest") as events:
            got = [next(events), next(events)]
            assert events.last_event_id == second
    assert [(e.id, e.data) for e in got] == [(first, "one"), (second, "two")]


def test_an_unreachable_hub_is_one_line_in_the_cli() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(HubUnreachable) as caught:
        publish_sync(url, "/x", "y", token=PUBLISHER, retries=0)
    assert isinstance(caught.value, OSError) and not isinstance(caught.value, HubError)
    done = subprocess.run([sys.executable, "-m", "tidings", "publish", "/x", "y", "--url", url,
                           "--token", PUBLISHER], capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items()
                               if not k.startswith("TIDINGS_")})
    assert done.returncode == 1
    assert "cannot reach" in done.stderr and "Traceback" not in done.stderr


async def test_closing_the_client_ends_an_iteration_in_another_task(hub: HubProcess) -> None:
    client = Client(hub.url, token=PUBLISHER)
    events = client.subscribe(["/closing"])
    got: list[Event] = []

    async def consume() -> None:
        async for event in events:
            got.append(event)

    task = asyncio.create_task(consume())
    await wait_subscribers(hub.url, 1)
    await client.aclose()
    with anyio.fail_after(5):
        await task  # ends quietly: no exception, no reconnection
    await wait_subscribers(hub.url, 0)
    assert got == [] and events.connects == 1
