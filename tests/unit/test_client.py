"""The Python client without a network: backoff, the repeat window, and subscriptions over
httpx's MockTransport (resume, repeats, which statuses are retried and which raised)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from tidings import client as client_module
from tidings.client import (
    AuthError,
    Backoff,
    Client,
    HubError,
    HubUnreachable,
    PublishError,
    RecentEvents,
    TokenTooOld,
)
from tidings.errors import BadRequest, TidingsError
from tidings.sse import Event

pytestmark = pytest.mark.anyio

HUB = "http://hub.test"


def test_backoff_is_exponential_full_jitter_capped_and_resettable() -> None:
    top = Backoff(base_s=0.1, max_s=1.0, rand=lambda: 1.0)
    assert [round(top.next_delay_s(), 3) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    top.reset()
    assert top.next_delay_s() == pytest.approx(0.1)
    assert Backoff(rand=lambda: 0.0).next_delay_s() == 0.0
    many = Backoff(base_s=0.1, max_s=1.0, attempt=10_000)
    assert 0.0 <= many.next_delay_s() <= 1.0  # no overflow however long the outage


def test_recent_events_drop_repeats_within_a_bounded_window() -> None:
    recent = RecentEvents(2)
    a, b, c = (Event(data=d, id=d) for d in "abc")
    assert [recent.add(e) for e in (a, b, a, c, a, c)] == [True, True, False, True, True, False]
    assert len(recent) == 2
    # The same id reused for another update (Mercure allows it) is not a repeat.
    assert recent.add(Event(data="other", id="c"))
    assert recent.add(Event(data="x")) and recent.add(Event(data="x"))  # no id: no check
    off = RecentEvents(0)
    assert off.add(a) and off.add(a)


def frames(*events: tuple[str, str]) -> bytes:
    return b"".join(f"id: {i}\ndata: {d}\n\n".encode() for i, d in events)


def stream(body: bytes, **headers: str) -> httpx.Response:
    return httpx.Response(200, content=body,
                          headers={"content-type": "text/event-stream", **headers})


@contextlib.contextmanager
def hub(*answers: httpx.Response | Exception) -> Iterator[tuple[Client, list[httpx.Request]]]:
    """A client whose hub answers each request with the next of `answers` (the last one
    repeats) and records the requests."""
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        answer = answers[min(len(requests), len(answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer

    client = Client(HUB, token="T", backoff_base_s=0.001, max_backoff_s=0.01,
                    transport=httpx.MockTransport(handler))
    yield client, requests


def resumed_from(request: httpx.Request) -> str | None:
    value = request.url.params.get("lastEventID")
    return None if value is None else str(value)


async def take(events: AsyncIterator[Event], n: int) -> list[Event]:
    return [await anext(events) for _ in range(n)]


async def test_subscribe_resumes_after_the_last_id_and_drops_repeats() -> None:
    with hub(
        stream(frames(("1", "a"), ("2", "b")), **{"last-event-id": "0"}),
        httpx.ConnectError("refused"),
        httpx.Response(503, json={"error": "busy", "status": 503}),
        stream(frames(("2", "b"), ("3", "c"))),  # a hub that resumed too early
    ) as (client, requests):
        async with client, client.subscribe(["/t/{n}", "/u"]) as events:
            got = await take(events, 3)
            assert [(e.id, e.data) for e in got] == [("1", "a"), ("2", "b"), ("3", "c")]
            assert events.last_event_id == client.last_event_id == "3"
            assert events.connects == 2
    first = requests[0]
    assert first.url.params.get_list("topic") == ["/t/{n}", "/u"]
    assert first.headers["authorization"] == "Bearer T"
    assert first.headers["accept"] == "text/event-stream"
    assert resumed_from(first) is None
    assert [resumed_from(r) for r in requests[1:]] == ["2", "2", "2"]


async def test_a_fresh_subscription_resumes_from_the_hubs_newest_id_at_connect() -> None:
    with hub(stream(b"", **{"last-event-id": "urn:newest"}), stream(frames(("x", "1")))) as (
        client, requests
    ):
        async with client, client.subscribe("/t") as events:
            assert [e.id for e in await take(events, 1)] == ["x"]
    assert [resumed_from(r) for r in requests] == [None, "urn:newest"]
    assert requests[0].url.params.get_list("topic") == ["/t"]  # a str is one topic


@pytest.mark.parametrize("status", [401, 403])
async def test_auth_errors_are_raised_not_retried(status: int) -> None:
    answer = httpx.Response(status, json={"error": "no", "status": status})
    with hub(answer) as (client, requests):
        async with client:
            with pytest.raises(AuthError) as caught:
                await anext(client.subscribe(["/t"]))
            with pytest.raises(PublishError):
                await client.publish("/t", "x")
    assert caught.value.status == status and caught.value.reason == "no"
    assert str(caught.value) == f"{status}: no"
    assert len(requests) == 2  # one each: no retries


async def test_other_client_errors_are_raised_and_server_errors_retried() -> None:
    with hub(httpx.Response(400, text="bad selector")) as (client, requests):
        async with client:
            with pytest.raises(HubError, match="400: bad selector") as caught:
                await anext(client.subscribe(["/t"]))
    assert not isinstance(caught.value, AuthError) and len(requests) == 1
    with hub(httpx.Response(502), httpx.Response(429, headers={"retry-after": "0"}),
             httpx.Response(200, text="urn:1")) as (client, requests):
        async with client:
            assert await client.publish("/t", "x", id="urn:1") == "urn:1"
    assert len(requests) == 3
    # The retries carry the same id, so the hub stores a retried update once.
    assert {r.content for r in requests} == {requests[0].content}


async def test_publish_makes_an_id_so_retries_are_safe() -> None:
    with hub(httpx.ReadTimeout("lost"), httpx.Response(200, text="ok")) as (client, requests):
        async with client:
            await client.publish(["/a", "/b"], "x", type="t", private=True)
    sent = [dict(httpx.QueryParams(r.content.decode()).multi_items()) for r in requests]
    assert sent[0] == sent[1]
    assert sent[0]["id"].startswith("urn:uuid:") and sent[0]["private"] == "on"
    form = httpx.QueryParams(requests[0].content.decode())
    assert form.get_list("topic") == ["/a", "/b"] and form["type"] == "t"


async def test_a_publish_refused_for_a_full_disk_is_retried_with_the_same_id() -> None:
    full = {"error": "the update was not stored: ... is full", "status": 507}
    with hub(httpx.Response(507, json=full, headers={"Retry-After": "0"}),
             httpx.Response(200, text="ok")) as (client, requests):
        async with client:
            assert await client.publish("/t", "x") == "ok"
    sent = [dict(httpx.QueryParams(r.content.decode()).multi_items()) for r in requests]
    assert len(sent) == 2 and sent[0] == sent[1]


async def test_an_unreachable_hub_is_a_connection_error_after_the_retries() -> None:
    with hub(httpx.ConnectError("refused")) as (client, requests):
        async with client:
            with pytest.raises(HubUnreachable) as caught:
                await client.publish("/t", "x", retries=2)
    assert isinstance(caught.value, ConnectionError) and isinstance(caught.value, TidingsError)
    assert len(requests) == 3


async def test_bad_calls_fail_before_anything_is_sent() -> None:
    with hub(httpx.Response(500)) as (client, requests):
        async with client:
            with pytest.raises(BadRequest, match="at least one topic"):
                client.subscribe([])
            with pytest.raises(BadRequest, match="at least one topic"):
                await client.publish([], "x")
        with pytest.raises(RuntimeError, match="closed"):
            client.subscribe(["/t"])
    assert requests == []


async def test_token_functions_are_called_for_each_connection() -> None:
    tokens = iter(["one", "two"])
    requests: list[httpx.Request] = []
    bodies = [stream(frames(("1", "a"))), stream(frames(("2", "b")))]

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return bodies[len(requests) - 1]

    async def fresh() -> str:
        return next(tokens)

    async with Client(HUB, token=fresh, backoff_base_s=0.001,
                      transport=httpx.MockTransport(handler)) as client:
        events = client.subscribe(["/t"])
        assert [e.id for e in await take(events, 2)] == ["1", "2"]
    assert [r.headers["authorization"] for r in requests] == ["Bearer one", "Bearer two"]


async def test_closing_the_client_closes_its_subscriptions() -> None:
    with hub(stream(frames(("1", "a")))) as (client, _):
        events = client.subscribe(["/t"])
        await anext(events)
        await client.aclose()
        with pytest.raises(StopAsyncIteration):
            await anext(events)


def collection_hub(*changes: httpx.Response) -> contextlib.AbstractContextManager[
        tuple[Client, list[httpx.Request]]]:
    """A hub serving one collection `m` (key `id`, one document) and then `changes`."""
    index = httpx.Response(200, json={"collections": [{"name": "m", "key": "id"}]})
    page = httpx.Response(200, json={"documents": [{"id": "a", "room": "r"}],
                                     "next_cursor": None, "resume_token": "T0"})
    return hub(index, page, *changes)


async def test_watch_sends_its_filters_to_the_hub_and_does_not_filter_again() -> None:
    change = '{"operationType": "insert", "documentKey": {"id": "b"}}'
    with collection_hub(stream(f"id: T1\ndata: {change}\n\n".encode())) as (client, sent):
        async with contextlib.aclosing(
                client.watch("m", room="r", n=5, operationType="insert")) as events:
            snapshot, inserted = await anext(events), await anext(events)
    assert snapshot["operationType"] == "snapshot" and snapshot["documentKey"] == {"id": "a"}
    assert inserted["documentKey"] == {"id": "b"}  # the hub's filter decides, not the client
    _, listing, watching = sent
    assert listing.url.path == "/api/collections/m"
    assert sorted(listing.url.params.multi_items()) == [("limit", "1000"), ("n", "5"),
                                                        ("room", "r")]
    assert watching.url.path == "/api/collections/m/changes"
    assert sorted(watching.url.params.multi_items()) == [
        ("n", "5"), ("operationType", "insert"), ("resume_after", "T0"), ("room", "r")]


async def test_watch_raises_token_too_old_from_the_hubs_error_event() -> None:
    gone = b'event: error\ndata: {"error": "too old", "status": 410}\n\n'
    with collection_hub(stream(gone)) as (client, _):
        async with contextlib.aclosing(client.watch("m")) as events:
            await anext(events)
            with pytest.raises(TokenTooOld) as caught:
                await anext(events)
    assert caught.value.status == 410 and caught.value.reason == "too old"
    assert isinstance(caught.value, HubError)


ROOT = Path(__file__).parents[2]
DOCS = ROOT / "docs" / "clients.md"
MODULE_JS = ROOT / "src" / "tidings" / "web" / "static" / "tidings.js"


def test_docs_cover_the_python_client_and_every_browser_option() -> None:
    docs = DOCS.read_text()
    assert client_module.__all__ == sorted(client_module.__all__)
    internal = {"Backoff", "RecentEvents", "SyncSubscription", "TokenSource"}
    for name in set(client_module.__all__) - internal:
        assert re.search(rf"\b{name}\b", docs), f"docs/clients.md: {name}"
    options = set(re.findall(r"\bo\.(\w+)", MODULE_JS.read_text()))
    assert {"topics", "onUpdate", "onStatus", "lastEventId", "authorization"} <= options
    for option in options:
        assert re.search(rf"`{option}[`(]", docs), f"docs/clients.md: the {option} option"
    assert "useTidings" in docs
