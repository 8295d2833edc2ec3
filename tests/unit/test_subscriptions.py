"""Active subscriptions (hub/subscriptions.py) and the API's answers for each path depth
(web/subscriptions.py), on the in-memory transport: no HTTP, no sockets."""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest

from tidings.errors import Forbidden, NotFound
from tidings.hub.auth import KeyConfig, decode_token
from tidings.hub.hub import Hub, HubConfig
from tidings.hub.subscriptions import SUBSCRIPTIONS_PREFIX, presence_updates
from tidings.hub.tokens import encode_token
from tidings.hub.topics import compile_selector
from tidings.transports import open_transport
from tidings.web.subscriptions import subscriptions_document

pytestmark = pytest.mark.anyio
KEY = KeyConfig("unit-test-key-unit-test-key-unit-test-key")
WATCHER = decode_token(encode_token(KEY.key, subscribe=[SUBSCRIPTIONS_PREFIX + "{/rest*}"]), KEY)


async def test_presence_events_and_the_listing_describe_subscriptions_alike() -> None:
    hub = Hub(open_transport("memory://"), HubConfig())
    await hub.start()
    selectors = [compile_selector("/books/1"), compile_selector("/b/*", "urlpattern")]
    async with hub.connect(selectors, None) as subscription:
        sub = subscription.subscriber
        events = [json.loads(u.data) for u in presence_updates(sub, active=True)]
        assert [e["active"] for e in events] == [True, True]
        assert all(u.private for u in presence_updates(sub, active=False))
        assert events[0]["id"] == (
            f"{SUBSCRIPTIONS_PREFIX}/{quote('/books/1', safe='')}/{quote(sub.id, safe='')}")
        assert events[1]["matchType"] == "URLPattern" and events[1]["match"] == "/b/*"

        everything = hub.subscriptions(SUBSCRIPTIONS_PREFIX, WATCHER)
        assert everything.subscriptions == events
        one_topic = SUBSCRIPTIONS_PREFIX + "/" + quote("/books/1", safe="")
        assert hub.subscriptions(one_topic, WATCHER).subscriptions == events[:1]
        with pytest.raises(Forbidden):
            hub.subscriptions(SUBSCRIPTIONS_PREFIX, None)
    assert hub.subscriptions(SUBSCRIPTIONS_PREFIX, WATCHER).subscriptions == []
    await hub.stop()


async def test_each_path_depth_gets_its_document() -> None:
    hub = Hub(open_transport("memory://"), HubConfig())
    await hub.start()
    async with hub.connect([compile_selector("/a")], None) as subscription:
        sub_id = quote(subscription.subscriber.id, safe="")

        def answer(path: str) -> dict[str, object]:
            topic = SUBSCRIPTIONS_PREFIX + (("/" + path) if path else "")
            return subscriptions_document(path, hub.subscriptions(topic, WATCHER))

        collection = answer("")
        assert collection["type"] == "Subscriptions" and collection["lastEventID"] == "earliest"
        assert len(collection["subscriptions"]) == 1  # type: ignore[arg-type]
        assert answer("%2Fa")["type"] == "Subscriptions"
        single = answer(f"%2Fa/{sub_id}")
        assert single["type"] == "Subscription" and single["lastEventID"] == "earliest"
        # An unknown subscriber of a topic: an empty collection (two segments) ...
        assert answer("%2Fa/urn%3Anobody")["subscriptions"] == []
        # ... and a match selector's unknown subscription (three segments): not found.
        with pytest.raises(NotFound):
            answer("Exact/%2Fa/urn%3Anobody")
    await hub.stop()
