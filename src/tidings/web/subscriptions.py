"""The subscriptions API: GET /.well-known/mercure/subscriptions[/{topic}[/{subscriber}]].

The request path is read here and turned into the subscriptions topic it names (the path
and the topic coincide, percent-encoding included); the hub answers with the active
subscriptions at or below that topic (`Hub.subscriptions`, hub/subscriptions.py). What
the path's depth means (the collection, one topic's subscriptions, one subscription) is
decided here, as Mercure's spec lays out the URLs.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tidings.errors import NotFound, TidingsError
from tidings.hub.hub import Hub
from tidings.hub.subscriptions import SUBSCRIPTIONS_PREFIX, ActiveSubscriptions
from tidings.web.access import Access, RequestParts, claims_for

__all__ = ["SubscriptionsAPI", "subscriptions_document"]


class SubscriptionsAPI:
    def __init__(self, hub: Hub, access: Access) -> None:
        self.hub = hub
        self.access = access

    def routes(self) -> list[Route]:
        return [
            Route(SUBSCRIPTIONS_PREFIX, self.get),
            Route(SUBSCRIPTIONS_PREFIX + "/{rest:path}", self.get),
        ]

    async def get(self, request: Request) -> Response:
        # The raw path: a topic's own slashes arrive encoded (%2F) and must stay so.
        raw = request.scope.get("raw_path", request.url.path.encode()).decode("latin-1")
        path = raw.split("?", 1)[0].removeprefix(SUBSCRIPTIONS_PREFIX).strip("/")
        topic = SUBSCRIPTIONS_PREFIX + (("/" + path) if path else "")
        try:
            claims = claims_for(RequestParts(request.scope), self.access.subscriber_key)
            doc = subscriptions_document(path, self.hub.subscriptions(topic, claims))
        except TidingsError as exc:
            return JSONResponse({"error": exc.message, "status": exc.status_hint},
                                status_code=exc.status_hint)
        return JSONResponse(doc, media_type="application/ld+json")


def subscriptions_document(path: str, active: ActiveSubscriptions) -> dict[str, object]:
    """The response for `path` (below the subscriptions URL, without surrounding slashes):
    one subscription when it names one, else the collection (NotFound for a
    subscription that is not there)."""
    matching = active.subscriptions
    if path and path.count("/") >= 1:
        single = next((d for d in matching if str(d["id"]) == active.topic), None)
        if single is not None:
            return {**single, "lastEventID": active.last_event_id}
    if path and not matching and path.count("/") >= 2:
        raise NotFound("no such subscription")
    return {
        "@context": "https://mercure.rocks/",
        "id": active.topic,
        "type": "Subscriptions",
        "lastEventID": active.last_event_id,
        "subscriptions": [{k: v for k, v in d.items() if k != "@context"} for d in matching],
    }
