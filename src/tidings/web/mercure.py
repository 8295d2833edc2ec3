"""The Mercure endpoint: GET subscribes (an SSE stream), POST publishes.

A raw ASGI app rather than a Starlette response so that the stream costs one `send()` per
batch of frames and nothing else: no per-event wrapping, no polling for disconnects.
Live frames are written by the hub's flushes through a sink (web/sinks.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from urllib.parse import parse_qsl

from starlette.types import Receive, Scope, Send

from tidings.errors import (
    BadRequest,
    Forbidden,
    TidingsError,
)
from tidings.hub.auth import Claims
from tidings.hub.hub import Hub, Subscription
from tidings.hub.subscriber import CloseReason
from tidings.hub.topics import Selector, SelectorKind, compile_selector
from tidings.hub.update import RETRY_RANGE, Update, check_id
from tidings.web.access import Access, RequestParts
from tidings.web.errors import error_response
from tidings.web.sinks import sink_for

__all__ = ["SSE_HEADERS", "MercureEndpoint", "stream_subscription"]

# Subscribe query parameters that carry selectors, and their kinds (0.x and 1.0 names).
_SELECTOR_PARAMS: dict[str, SelectorKind] = {
    "topic": "topic",
    "match": "match",
    "matchExact": "match",
    "matchURLPattern": "urlpattern",
    "match_urlpattern": "urlpattern",
    # A 1.0 draft's name for RFC 6570 templates, the same matching as 0.x `topic=`.
    "matchURITemplate": "topic",
}
_MAX_SELECTOR_LENGTH = 2048

# Every event stream's headers: not cached anywhere, and not buffered by a proxy (nginx).
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"private, no-cache, no-store"),
    (b"x-accel-buffering", b"no"),
]


class MercureEndpoint:
    def __init__(self, hub: Hub, access: Access, *, uvicorn_fast_path: bool = True) -> None:
        self.hub = hub
        self.access = access
        # Whether live streams may write to uvicorn's transport directly (web/sinks.py).
        self.uvicorn_fast_path = uvicorn_fast_path

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # A plain function handing back the handler's coroutine: a stream lives for hours,
        # and every coroutine frame on its stack is memory held per subscriber.
        method = scope["method"]
        if method in ("GET", "HEAD"):
            return self.subscribe(scope, receive, send)
        if method == "POST":
            return self.publish(scope, receive, send)
        return error_response(send, 405, "use GET to subscribe or POST to publish",
                              headers=[(b"allow", b"GET, POST")])

    # -- subscribe -----------------------------------------------------------------

    def _selectors(self, parts: RequestParts) -> list[Selector]:
        selectors: list[Selector] = []
        seen: set[tuple[str, str]] = set()
        for name, value in parts.query_list:
            kind = _SELECTOR_PARAMS.get(name)
            if kind is None:
                if name.lower().startswith("match"):
                    raise BadRequest(f"unknown matcher parameter {name!r}")
                continue
            if len(value) > _MAX_SELECTOR_LENGTH:
                raise BadRequest(f"a selector is longer than {_MAX_SELECTOR_LENGTH} characters")
            if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in value):
                raise BadRequest("a selector must not contain control characters")
            if (kind, value) not in seen:
                seen.add((kind, value))
                selectors.append(compile_selector(value, kind))
        return selectors

    def _subscribe_request(
        self, scope: Scope
    ) -> tuple[list[Selector], Claims | None, str | None]:
        parts = RequestParts(scope)
        selectors = self._selectors(parts)
        claims = self.access.reader(parts)
        last_event_id = (
            parts.headers.get("last-event-id")
            or parts.query.get("lastEventID")
            or parts.query.get("last_event_id")
        )
        if last_event_id is not None:
            check_id(last_event_id, "Last-Event-ID")
        return selectors, claims, last_event_id

    async def subscribe(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            # Parsed in a helper so the request's decoded headers are not kept for the
            # stream's whole life.
            selectors, claims, last_event_id = self._subscribe_request(scope)
            subscription = self.hub.connect(selectors, claims, last_event_id)
            await subscription.__aenter__()
        except TidingsError as exc:  # refused before any header was sent
            await error_response(send, exc.status_hint, exc.message, exc=exc)
            return
        try:
            headers = [
                *SSE_HEADERS,
                (b"last-event-id", subscription.last_event_id.encode()),
                (b"mercure-last-event-id", subscription.last_event_id.encode()),
            ]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            if scope["method"] == "HEAD":
                await send({"type": "http.response.body", "body": b""})
                return
            await stream_subscription(subscription, receive, send,
                                      uvicorn_fast_path=self.uvicorn_fast_path)
        finally:
            await subscription.__aexit__(None, None, None)

    # -- publish -------------------------------------------------------------------

    async def publish(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._publish(scope, receive, send)
        except TidingsError as exc:
            await error_response(send, exc.status_hint, exc.message, exc=exc)

    async def _publish(self, scope: Scope, receive: Receive, send: Send) -> None:
        parts = RequestParts(scope)
        claims = self.access.publisher(parts, doing="publishing")
        content_type = parts.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if content_type != "application/x-www-form-urlencoded":
            raise BadRequest("the body must be application/x-www-form-urlencoded")
        body = await self.access.body(receive, parts)
        try:
            form = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError as exc:
            raise BadRequest("the body is not valid UTF-8") from exc
        update = update_from_form(form)
        if not claims.may_publish(update.topics):
            raise Forbidden("the token does not allow publishing to these topics")
        stored = await self.hub.publish(update)
        await send({
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain; charset=utf-8")],
        })
        await send({"type": "http.response.body", "body": stored.id.encode()})


async def stream_subscription(
    subscription: Subscription, receive: Receive, send: Send, *, uvicorn_fast_path: bool = True
) -> None:
    """Replay, then hand the connection to the hub's flushes until either side ends it.

    While live, this task only waits for the client to go away; the hub writes through a
    sink (web/sinks.py: uvicorn's transport itself when `uvicorn_fast_path` allows). When
    the hub closes the subscriber (slow reader, shutdown, token expiry) it interrupts that
    wait by cancelling this task, then the response is ended cleanly.
    """
    sub = subscription.subscriber
    task = asyncio.current_task()
    assert task is not None

    # In place from the start: a `send()` of the replay may wait forever on a client that
    # stopped reading, and closing the subscriber (its buffer overflowed) must end that.
    sub.on_close(task.cancel)
    try:
        try:
            async for chunk in subscription.replay():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except OSError:  # uvicorn's ClientDisconnected: the client left during replay
            sub.on_close(None)
            subscription.close(CloseReason.CLIENT_GONE)
            return
        if not sub.closed:
            subscription.go_live(sink_for(send, sub, uvicorn_fast_path=uvicorn_fast_path))
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    sub.on_close(None)
                    subscription.close(CloseReason.CLIENT_GONE)
                    return
    except asyncio.CancelledError:
        if sub.close_reason is None or task.cancelling() > 1:
            raise  # a cancellation that is not ours: let it through
        task.uncancel()
    finally:
        sub.on_close(None)
    if sub.close_reason is not CloseReason.CLIENT_GONE:
        await _end(send)


# How long ending a response may wait for a backed-up connection to drain.
_END_TIMEOUT_S = 1.0


async def _end(send: Send) -> None:
    """End the response. A connection backed up by a reader that stopped reading may never
    drain: give up then rather than pin the task (and the subscriber) forever. The server
    then closes the connection (uvicorn logs that the response was not completed)."""
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(_END_TIMEOUT_S):
            await send({"type": "http.response.body", "body": b""})


def update_from_form(form: list[tuple[str, str]]) -> Update:
    """Build an update from the publish form's fields (validation included)."""
    fields: dict[str, str] = {}
    topics: list[str] = []
    private = False
    for name, value in form:
        if name == "topic":
            topics.append(value)
        elif name == "private":
            private = True  # presence marks it private, whatever the value
        else:
            fields[name] = value
    retry_text = fields.get("retry")
    retry: int | None = None
    if retry_text is not None and retry_text != "":
        # Length first: int() of thousands of digits is slow, and refused past 4300.
        if not (retry_text.isascii() and retry_text.isdigit()) or len(retry_text) > 10:
            raise BadRequest(RETRY_RANGE)
        retry = int(retry_text)
    return Update.create(
        topics,
        fields.get("data", ""),
        id=fields.get("id") or None,
        private=private,
        type=fields.get("type") or None,
        retry=retry,
    )


