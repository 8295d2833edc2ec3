"""Active subscriptions as Mercure describes them: presence events and the API's data.

With `HubConfig.subscriptions` on, the hub publishes a private update for each selector of
a subscriber when it connects (`active: true`) and when it leaves (`active: false`), to
the topic `/.well-known/mercure/subscriptions/{topic}/{subscriber}` (or
`.../{matchType}/{match}/{subscriber}` for a match selector). The subscriptions API lists
the active ones. Both use the one JSON-LD document per (subscriber, selector) built here,
so an event and a listing always agree. These are topics, not URLs: reading them off a
request path is web/subscriptions.py's job.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from urllib.parse import quote

from tidings.hub.subscriber import Subscriber
from tidings.hub.topics import Selector
from tidings.hub.update import RESERVED_PREFIX, Update

__all__ = [
    "SUBSCRIPTIONS_PREFIX", "ActiveSubscriptions", "describe", "listing", "presence_updates",
    "subscription_topic",
]

SUBSCRIPTIONS_PREFIX = RESERVED_PREFIX + "/subscriptions"
_MATCH_TYPE = {"match": "Exact", "urlpattern": "URLPattern"}


@dataclass(frozen=True, slots=True)
class ActiveSubscriptions:
    """The active subscriptions at or below one subscriptions topic, as the API shows
    them: each a `describe` document, plus the hub's last event id."""

    topic: str
    last_event_id: str
    subscriptions: list[dict[str, object]]


def subscription_topic(selector: Selector, subscriber_id: str) -> str:
    encoded_sub = quote(subscriber_id, safe="")
    if selector.kind == "topic":
        return f"{SUBSCRIPTIONS_PREFIX}/{quote(selector.value, safe='')}/{encoded_sub}"
    match_type = _MATCH_TYPE[selector.kind]
    return f"{SUBSCRIPTIONS_PREFIX}/{match_type}/{quote(selector.value, safe='')}/{encoded_sub}"


def describe(sub: Subscriber, selector: Selector, active: bool) -> dict[str, object]:
    """One selector of one subscriber, as a Mercure `Subscription` document."""
    topic = subscription_topic(selector, sub.id)
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


def presence_updates(sub: Subscriber, *, active: bool) -> Iterator[Update]:
    """The private updates that announce `sub` connecting (active) or leaving."""
    for selector in sub.selectors:
        doc = describe(sub, selector, active)
        yield Update.create([str(doc["id"])], json.dumps(doc), private=True, allow_reserved=True)


def listing(subscribers: Iterable[Subscriber], topic: str) -> list[dict[str, object]]:
    """The documents of the active subscriptions whose topic is `topic` or below it."""
    docs = [describe(sub, selector, True) for sub in subscribers for selector in sub.selectors]
    return [d for d in docs if str(d["id"]) == topic or str(d["id"]).startswith(topic + "/")]
