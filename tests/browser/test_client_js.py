"""The browser client (/static/tidings.js) in headless Chromium against a real `tidings serve`.

The test page (pages/client.html) is served by the test itself on the hub's origin, so the
page imports the module from the hub's /static and subscribes without CORS. Waits are on
page state (`wait_for_function`) with bounded deadlines; no sleeps.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.browser.conftest import CHROMIUM
from tests.conftest import PUBLISHER, HubProcess, RestartableHub, token
from tests.integration.test_cli import subscribers, wait_for

PAGE = Path(__file__).parent / "pages" / "client.html"
PAGE_PATH = "/__tests__/client.html"
WAIT_MS = 20_000

if os.environ.get("CI") != "true" and not os.path.exists(CHROMIUM):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)",
                allow_module_level=True)

from playwright.sync_api import Browser, Page, Route  # noqa: E402


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert errors == [], "uncaught errors in the page"


def load(page: Page, hub: HubProcess, *, fake_clock: bool = False) -> None:
    """Open the test page on the hub's origin (served here, not by the hub)."""
    page.route(hub.url + PAGE_PATH, lambda route: route.fulfill(
        body=PAGE.read_text(), content_type="text/html; charset=utf-8"))
    if fake_clock:
        page.clock.install()
    page.goto(hub.url + PAGE_PATH)
    page.wait_for_function("window.ready === true", timeout=WAIT_MS)


def start(page: Page, **options: Any) -> None:
    page.evaluate("options => window.start(options)", options)


def wait_js(page: Page, condition: str) -> None:
    page.wait_for_function(condition, timeout=WAIT_MS)


def subscribe_live(page: Page, hub: HubProcess, topics: list[str]) -> None:
    """Load the page and subscribe it to `topics` with a short backoff (50 to 400 ms);
    returns once the subscription is live."""
    load(page, hub)
    start(page, topics=topics, initialDelayMs=50, maxDelayMs=400)
    wait_js(page, "sub.status === 'live'")


def publish(hub: HubProcess, topic: str, data: str, **fields: str) -> str:
    reply = httpx.post(hub.url + "/.well-known/mercure",
                       data={"topic": topic, "data": data, **fields},
                       headers={"Authorization": f"Bearer {PUBLISHER}"}, timeout=10)
    assert reply.status_code == 200, reply.text
    return reply.text


def resumed_from(url: str) -> str | None:
    return parse_qs(urlsplit(url).query).get("lastEventID", [None])[0]


def test_every_update_exactly_once_in_order_across_a_hub_restart(
    page: Page, restartable: RestartableHub
) -> None:
    server = restartable.start()
    subscribe_live(page, server, ["/books/{id}"])
    ids = [
        publish(server, "/books/1", json.dumps({"n": 1})),
        publish(server, "/books/2", "plain text 2"),
        publish(server, "/books/3", "3"),
    ]
    publish(server, "/authors/1", "not subscribed")
    wait_js(page, "updates.length === 3")

    server.stop(signal.SIGKILL)
    wait_js(page, "statuses.includes('reconnecting')")
    # Published while the hub on the page's port is down: through another hub process on
    # the same database, so these can only reach the page by replay from history.
    with restartable.side() as side:
        ids += [publish(side, "/books/4", "4"), publish(side, "/books/5", "5")]
    server = restartable.start()
    ids += [publish(server, "/books/6", "6")]  # right away: the page may not be back yet
    wait_js(page, "updates.length >= 6 && sub.status === 'live'")
    ids += [publish(server, "/books/7", "7")]
    wait_js(page, "updates.length >= 7")

    updates = page.evaluate("updates")
    assert [u["id"] for u in updates] == ids  # each once, in order
    assert updates[0] == {"id": ids[0], "type": "message", "data": {"n": 1},
                          "raw": '{"n": 1}', "isJson": True}
    assert updates[1]["data"] == "plain text 2" and updates[1]["isJson"] is False
    assert updates[2]["data"] == 3 and updates[2]["raw"] == "3"
    # Every new EventSource after the first resumed from the last id the page had.
    opened = page.evaluate("opened")
    assert resumed_from(opened[0]) is not None  # anchored: the hub's newest id at start
    assert ids[2] in [resumed_from(url) for url in opened[1:]]
    page.evaluate("sub.close()")


def test_status_sequence_and_close_releases_the_connection(
    page: Page, restartable: RestartableHub
) -> None:
    server = restartable.start()
    subscribe_live(page, server, ["/s"])
    server.stop()  # a graceful stop ends the stream
    wait_js(page, "sub.status === 'reconnecting'")
    server = restartable.start()
    wait_js(page, "sub.status === 'live'")
    wait_for(lambda: subscribers(server.url) == 1)
    page.evaluate("sub.close()")
    assert page.evaluate("statuses") == ["connecting", "live", "reconnecting", "live", "closed"]
    assert page.evaluate("sources.every(s => s.readyState === EventSource.CLOSED)")
    wait_for(lambda: subscribers(server.url) == 0)


def test_a_drop_before_the_first_update_loses_nothing(
    page: Page, restartable: RestartableHub
) -> None:
    server = restartable.start()
    before = publish(server, "/quiet", "before the page subscribed")
    subscribe_live(page, server, ["/quiet"])
    assert page.evaluate("sub.lastEventId") == before  # from the hub's Last-Event-ID
    server.stop(signal.SIGKILL)
    wait_js(page, "sub.status === 'reconnecting'")
    with restartable.side() as side:
        missed = publish(side, "/quiet", "while the page was away")
    server = restartable.start()
    wait_js(page, "updates.length === 1")
    assert page.evaluate("updates.map(u => u.id)") == [missed]


def test_reconnect_after_a_token_refresh_resumes_with_the_new_token(
    page: Page, hub: HubProcess
) -> None:
    load(page, hub)
    page.evaluate(f"window.token = {json.dumps(token(subscribe=['/elsewhere']))}")
    page.evaluate("start({topics: ['/secret'], authorization: async () => window.token})")
    wait_js(page, "sub.status === 'live'")
    public = publish(hub, "/secret", "public")
    private = publish(hub, "/secret", "private", private="on")
    wait_js(page, "updates.length === 1")
    page.evaluate(f"window.token = {json.dumps(token(subscribe=['/secret']))}")
    page.evaluate("sub.reconnect()")
    # The replay after `public` is checked against the new token: the private update that
    # the old token could not see arrives now, and `public` does not come again.
    wait_js(page, "updates.length === 2")
    later = publish(hub, "/secret", "later")
    wait_js(page, "updates.length === 3")
    assert page.evaluate("updates.map(u => u.id)") == [public, private, later]
    assert page.evaluate("statuses") == ["connecting", "live", "reconnecting", "live"]
    last_url = page.evaluate("opened[opened.length - 1]")
    assert resumed_from(last_url) == public
    assert parse_qs(urlsplit(last_url).query)["authorization"] == [
        page.evaluate("window.token")]
    page.evaluate("sub.close()")


def test_back_online_or_visible_skips_the_backoff_and_close_stops_everything(
    page: Page, hub_factory: type[HubProcess]
) -> None:
    server = hub_factory().start()
    load(page, server, fake_clock=True)
    page.evaluate("Math.random = () => 0.999")  # the longest backoff, deterministically
    start(page, topics=["/w"], initialDelayMs=60_000, maxDelayMs=60_000)
    wait_js(page, "sub.status === 'live'")
    assert page.evaluate("listening") == 2
    server.stop(signal.SIGKILL)
    wait_js(page, "sub.status === 'reconnecting'")
    assert page.evaluate("opened.length") == 1  # waiting out a ~60 s backoff

    page.evaluate("window.dispatchEvent(new Event('online'))")
    wait_js(page, "opened.length === 2")
    wait_js(page, "sources[1].readyState === EventSource.CLOSED")  # refused again
    page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")
    wait_js(page, "opened.length === 3")
    assert [resumed_from(url) for url in page.evaluate("opened")][1:] == ["earliest"] * 2
    wait_js(page, "sources[2].readyState === EventSource.CLOSED")

    page.evaluate("sub.close()")
    assert page.evaluate("listening") == 0
    page.evaluate("window.dispatchEvent(new Event('online'))")
    page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")
    page.clock.run_for("10:00")  # any timer left would fire now
    assert page.evaluate("opened.length") == 3
    assert page.evaluate("statuses") == ["connecting", "live", "reconnecting", "closed"]


def test_repeats_are_dropped_within_a_bounded_window(page: Page, hub: HubProcess) -> None:
    """A fake hub (a routed URL) replays what the page has seen, as a hub that lost its
    place in history would; the client drops repeats among the last `dedupe` updates."""
    load(page, hub)
    requests: list[str] = []

    def frames(*events: tuple[str, str]) -> str:
        return "".join(f"id: {i}\ndata: {d}\n\n" for i, d in events)

    first = [(str(n), f"d{n}") for n in range(1, 6)]
    bodies = [
        # 1..5, then 1 again (a repeat), then id 2 reused for another update (not one).
        frames(*first, ("1", "d1"), ("2", "other")),
        # After the reconnect: the last three again, then one new update.
        frames(*first[2:], ("6", "d6")),
    ]

    def fake_hub(route: Route) -> None:
        requests.append(route.request.url)
        body = bodies[len(requests) - 1] if len(requests) <= len(bodies) else ""
        route.fulfill(status=200 if body else 204, body=body,
                      headers={"Content-Type": "text/event-stream"})

    page.route(lambda url: urlsplit(url).path == "/fake-hub", fake_hub)
    start(page, hub="/fake-hub", topics=["/d"], lastEventId="0", dedupe=5,
          initialDelayMs=20, maxDelayMs=20)
    wait_js(page, "updates.length === 7")
    page.evaluate("sub.close()")
    assert [(u["id"], u["raw"]) for u in page.evaluate("updates")] == [
        *first, ("2", "other"), ("6", "d6")]
    assert [resumed_from(url) for url in requests[:2]] == ["0", "2"]

    # The window is bounded: with room for 2, an update 3 back is delivered again.
    assert page.evaluate("""() => {
        const recent = new tidings.RecentUpdates(2);
        return [["a", "x"], ["b", "x"], ["c", "x"], ["a", "x"], ["c", "x"]]
            .map(([id, data]) => recent.add(id, "message", data));
    }""") == [True, True, True, True, False]


def test_bad_options_fail_at_once(page: Page, hub: HubProcess) -> None:
    load(page, hub)
    messages = page.evaluate("""() => [{topics: [], onUpdate() {}}, {topics: ["/t"]}].map(
        (options) => { try { tidings.subscribe(options); return null; }
                       catch (e) { return e instanceof TypeError && e.message; } })""")
    assert messages == ["subscribe: `topics` needs at least one topic selector",
                        "subscribe: `onUpdate` must be a function"]
    assert page.evaluate("opened.length") == 0
