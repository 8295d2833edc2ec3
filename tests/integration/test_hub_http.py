"""The hub over real HTTP: a `tidings serve` process, httpx clients, real SQLite files."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.conftest import PUBLISHER, HubProcess, open_stream, publish, token

pytestmark = pytest.mark.anyio


async def test_publish_then_receive_live(hub: HubProcess) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        async with open_stream(client, hub.url, [("topic", "/books/1")]) as stream:
            assert stream.response.status_code == 200
            assert stream.response.headers["content-type"].startswith("text/event-stream")
            assert stream.response.headers["cache-control"].startswith("private, no-cache")
            assert stream.response.headers["x-accel-buffering"] == "no"
            reply = await publish(client, hub.url, "/books/1", "line one\n\nline three",
                                  type="book", retry="1500")
            assert reply.status_code == 200
            assert reply.headers["content-type"].startswith("text/plain")
            assert reply.text.startswith("urn:uuid:")
            event = await stream.next()
            assert (event.id, event.event, event.data, event.retry) == (
                reply.text, "book", "line one\n\nline three", 1500)


async def test_wire_format_one_data_line_per_line(hub: HubProcess) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        async with open_stream(client, hub.url, [("topic", "t")]) as stream:
            await publish(client, hub.url, "t", "a\n\nb", id="fixed-id")
            raw = b""
            async for chunk in stream.response.aiter_raw():
                raw += chunk
                if raw.endswith(b"\n\n"):
                    break
            assert raw == b"id: fixed-id\ndata: a\ndata: \ndata: b\n\n"


async def test_selectors_templates_match_and_urlpattern(hub: HubProcess) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        template = [("topic", "https://example.com/books/{id}")]
        exact = [("match", "https://example.com/books/2")]
        pattern = [("matchURLPattern", "https://example.com/books/:id")]
        template_1_0 = [("matchURITemplate", "https://example.com/books/{id}")]
        async with (
            open_stream(client, hub.url, template) as by_template,
            open_stream(client, hub.url, template_1_0) as by_template_1_0,
            open_stream(client, hub.url, exact) as by_exact,
            open_stream(client, hub.url, pattern) as by_pattern,
        ):
            for n in (1, 2):
                await publish(client, hub.url, f"https://example.com/books/{n}", str(n))
            await publish(client, hub.url, "https://example.com/authors/1", "no")
            assert [e.data for e in await by_template.take(2)] == ["1", "2"]
            assert [e.data for e in await by_template_1_0.take(2)] == ["1", "2"]
            assert [e.data for e in await by_pattern.take(2)] == ["1", "2"]
            assert (await by_exact.next()).data == "2"
            assert await by_exact.nothing_within(0.3)


async def test_private_updates_reach_only_authorized_subscribers(hub: HubProcess) -> None:
    reader = token(subscribe=["/secret/{id}"])
    async with httpx.AsyncClient(timeout=10) as client:
        async with (
            open_stream(client, hub.url, [("topic", "/secret/1"), ("topic", "/open")],
                        {"Authorization": f"Bearer {reader}"}) as allowed,
            open_stream(client, hub.url, [("topic", "/secret/1"), ("topic", "/open")]) as anon,
        ):
            await publish(client, hub.url, "/secret/1", "hidden", private="on")
            await publish(client, hub.url, "/open", "public")
            assert [e.data for e in await allowed.take(2)] == ["hidden", "public"]
            assert [e.data for e in await anon.take(1)] == ["public"]


async def test_token_in_cookie_and_query(hub: HubProcess) -> None:
    reader = token(subscribe=["*"])
    async with (
        httpx.AsyncClient(timeout=10) as client, open_stream(client, hub.url, [("topic", "/p")],
                    {"Cookie": f"mercureAuthorization={reader}"}) as by_cookie,
        open_stream(client, hub.url, [("topic", "/p"), ("authorization", reader)]) as by_q,
    ):
        await publish(client, hub.url, "/p", "x", private="")
        assert (await by_cookie.next()).data == "x"
        assert (await by_q.next()).data == "x"


async def test_reconnect_with_last_event_id_replays_exactly_once(hub: HubProcess) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        ids = [(await publish(client, hub.url, "/r", str(i))).text for i in range(10)]
        for how in ("header", "lastEventID", "last_event_id"):
            headers = {"Last-Event-ID": ids[3]} if how == "header" else {}
            params = [("topic", "/r")] + ([(how, ids[3])] if how != "header" else [])
            async with open_stream(client, hub.url, params, headers) as stream:
                assert stream.response.headers["last-event-id"] == ids[3]
                assert stream.response.headers["mercure-last-event-id"] == ids[3]
                assert [e.data for e in await stream.take(6)] == [str(i) for i in range(4, 10)]
                await publish(client, hub.url, "/r", "live")
                assert (await stream.next()).data == "live"
            ids.append("unused")


async def test_earliest_and_unknown_id_send_all_history(hub: HubProcess) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        for i in range(3):
            await publish(client, hub.url, "/e", str(i))
        for last in ("earliest", "urn:uuid:never-published"):
            async with open_stream(client, hub.url, [("topic", "/e")],
                                   {"Last-Event-ID": last}) as stream:
                assert stream.response.headers["last-event-id"] == "earliest"
                assert [e.data for e in await stream.take(3)] == ["0", "1", "2"]


async def test_seam_between_replay_and_live_under_concurrent_publishing(
    hub: HubProcess,
) -> None:
    """Reconnect while a publisher keeps publishing: every update once, in order."""
    total = 400
    async with httpx.AsyncClient(timeout=20) as client:
        first = (await publish(client, hub.url, "/seam", "0")).text

        async def publisher() -> None:
            for i in range(1, total):
                assert (await publish(client, hub.url, "/seam", str(i))).status_code == 200

        task = asyncio.create_task(publisher())
        seen: list[int] = []
        last = first
        # Reconnect several times mid-stream, each time from the last id received.
        for _ in range(5):
            async with open_stream(client, hub.url, [("topic", "/seam")],
                                   {"Last-Event-ID": last}) as stream:
                for event in await stream.take(40, timeout_s=20):
                    seen.append(int(event.data))
                    assert event.id is not None
                    last = event.id
        await task
        async with open_stream(client, hub.url, [("topic", "/seam")],
                               {"Last-Event-ID": last}) as stream:
            for event in await stream.take(total - 1 - len(seen), timeout_s=20):
                seen.append(int(event.data))
            assert await stream.nothing_within(0.3)
        assert seen == list(range(1, total))


async def test_history_survives_restart(hub_factory: type[HubProcess]) -> None:
    server = hub_factory().start()
    async with httpx.AsyncClient(timeout=10) as client:
        first = (await publish(client, server.url, "/d", "before")).text
        second = (await publish(client, server.url, "/d", "acked")).text
    server.stop()
    server = hub_factory().start()
    async with httpx.AsyncClient(timeout=10) as client:
        async with open_stream(client, server.url, [("topic", "/d")],
                               {"Last-Event-ID": first}) as stream:
            event = await stream.next()
            assert (event.id, event.data) == (second, "acked")


async def test_publish_authorization(hub: HubProcess) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        no_token = await client.post(hub.url + "/.well-known/mercure", data={"topic": "/a"})
        assert no_token.status_code == 401
        assert no_token.headers["www-authenticate"].startswith("Bearer")
        bad = await publish(client, hub.url, "/a", "x", token_="not.a.jwt")
        assert bad.status_code == 401
        assert "invalid_token" in bad.headers["www-authenticate"]
        wrong_key = token(publish=["*"]).rsplit(".", 1)[0] + ".c2lnbmF0dXJl"
        assert (await publish(client, hub.url, "/a", "x", token_=wrong_key)).status_code == 401
        expired = token(publish=["*"], expires_in_s=-60)
        assert (await publish(client, hub.url, "/a", "x", token_=expired)).status_code == 401
        narrow = token(publish=["/allowed/{id}"])
        assert (await publish(client, hub.url, "/allowed/1", "x", token_=narrow)).status_code == 200
        denied = await publish(client, hub.url, "/other", "x", token_=narrow)
        assert denied.status_code == 403
        none_alg = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJtZXJjdXJlIjp7InB1Ymxpc2giOlsiKiJdfX0."
        assert (await publish(client, hub.url, "/a", "x", token_=none_alg)).status_code == 401
        reserved = await publish(client, hub.url, "/.well-known/mercure/subscriptions/x/y", "f")
        assert reserved.status_code == 403


@pytest.mark.parametrize(
    ("fields", "status"),
    [
        ({"retry": "abc"}, 400),
        ({"retry": "-1"}, 400),
        ({"id": "#fragment"}, 400),
        ({"id": "a\nb"}, 400),
        ({"type": "a\rb"}, 400),
    ],
)
async def test_publish_bad_fields(hub: HubProcess, fields: dict[str, str], status: int) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        reply = await publish(client, hub.url, "/bad", "x", **fields)
        assert reply.status_code == status
        assert reply.json()["error"]


async def test_bad_input_is_4xx(hub_factory: type[HubProcess]) -> None:
    server = hub_factory("--max-body", "1000", "--max-selectors", "3").start()
    url = server.url + "/.well-known/mercure"
    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.get(url)).status_code == 400
        many = [("topic", f"/t/{i}") for i in range(4)]
        assert (await client.get(url, params=many)).status_code == 400
        assert (await client.get(url, params={"matchFoo": "x"})).status_code == 400
        assert (await client.get(url, params={"topic": "/{bad"})).status_code == 400
        big = await publish(client, server.url, "/big", "x" * 2000)
        assert big.status_code == 413
        assert (await client.get(url, params={"topic": "/a"},
                                 headers={"Authorization": "Bearer junk"})).status_code == 401
        no_topic = await client.post(url, content="data=x", headers={
            "Authorization": f"Bearer {PUBLISHER}",
            "Content-Type": "application/x-www-form-urlencoded"})
        assert no_topic.status_code == 400
        assert (await client.put(url)).status_code == 405


async def test_no_anonymous_requires_token(hub_factory: type[HubProcess]) -> None:
    server = hub_factory("--no-anonymous").start()
    async with httpx.AsyncClient(timeout=10) as client:
        reply = await client.get(server.url + "/.well-known/mercure", params={"topic": "/x"})
        assert reply.status_code == 401
        assert reply.headers["www-authenticate"].startswith("Bearer")


async def test_too_many_connections_is_503(hub_factory: type[HubProcess]) -> None:
    server = hub_factory("--max-subscribers", "2").start()
    async with httpx.AsyncClient(timeout=10) as client:
        async with (open_stream(client, server.url, [("topic", "/a")]),
                    open_stream(client, server.url, [("topic", "/a")])):
            third = await client.get(server.url + "/.well-known/mercure", params={"topic": "/a"})
            assert third.status_code == 503
            assert int(third.headers["retry-after"]) > 0


async def test_heartbeat_comment_when_idle(hub_factory: type[HubProcess]) -> None:
    server = hub_factory("--heartbeat", "0.2").start()
    async with httpx.AsyncClient(timeout=10) as client:
        async with open_stream(client, server.url, [("topic", "/quiet")]) as stream:
            raw = b""
            async for chunk in stream.response.aiter_raw():
                raw += chunk
                if raw.count(b":\n\n") >= 2:
                    break
            assert raw.startswith(b":\n\n")


async def test_presence_events_and_subscriptions_api(hub: HubProcess) -> None:
    watcher = token(subscribe=["/.well-known/mercure/subscriptions{/topic}{/subscriber}",
                               "/.well-known/mercure/subscriptions"])
    auth = {"Authorization": f"Bearer {watcher}"}
    async with httpx.AsyncClient(timeout=10) as client:
        async with open_stream(
            client, hub.url,
            [("topic", "/.well-known/mercure/subscriptions{/topic}{/subscriber}")], auth,
        ) as presence:
            async with open_stream(client, hub.url, [("topic", "/room/1")]):
                own = json.loads((await presence.next()).data)  # the watcher's own
                assert own["topic"].startswith("/.well-known/mercure/subscriptions")
                joined = json.loads((await presence.next()).data)
                assert joined["type"] == "Subscription"
                assert joined["topic"] == "/room/1"
                assert joined["active"] is True
                listing = await client.get(hub.url + "/.well-known/mercure/subscriptions",
                                           headers=auth)
                assert listing.status_code == 200
                body = listing.json()
                assert body["type"] == "Subscriptions"
                topics = [s.get("topic") for s in body["subscriptions"]]
                assert "/room/1" in topics
                single = await client.get(hub.url + joined["id"], headers=auth)
                assert single.status_code == 200
                assert single.json()["subscriber"] == joined["subscriber"]
            left = json.loads((await presence.next()).data)
            assert (left["active"], left["subscriber"]) == (False, joined["subscriber"])
        denied = await client.get(hub.url + "/.well-known/mercure/subscriptions")
        assert denied.status_code == 403


async def test_health_metrics_openapi_index(hub: HubProcess) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.get(hub.url + "/healthz")).json()["status"] == "ok"
        await publish(client, hub.url, "/m", "x")
        metrics = (await client.get(hub.url + "/metrics")).text
        assert "tidings_updates_published_total 1" in metrics
        assert "tidings_slow_disconnects_total" in metrics
        doc = (await client.get(hub.url + "/openapi.json")).json()
        assert "/.well-known/mercure" in doc["paths"]
        index = await client.get(hub.url + "/")
        assert index.status_code == 200 and "Tidings" in index.text




async def test_cors_for_browsers_on_another_origin(hub_factory: type[HubProcess]) -> None:
    server = hub_factory("--cors-origins", "http://app.example").start()
    origin = {"Origin": "http://app.example"}
    async with httpx.AsyncClient(timeout=10) as client:
        preflight = await client.options(server.url + "/.well-known/mercure", headers={
            **origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://app.example"
        async with open_stream(client, server.url, [("topic", "/c")], origin) as stream:
            assert stream.response.headers["access-control-allow-origin"] == "http://app.example"
            assert stream.response.headers["access-control-allow-credentials"] == "true"
            await publish(client, server.url, "/c", "cross-origin")
            assert (await stream.next()).data == "cross-origin"
