"""The Mercure endpoint: GET subscribes (an SSE stream), POST publishes.

A raw ASGI app rather than a Starlette response so that the stream costs one `send()` per
batch of frames and nothing else: no per-event wrapping, no polling for disconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Coroutine
from typing import Any
from urllib.parse import parse_qsl

from starlette.types import Receive, Scope, Send

from tidings.errors import (
    BadRequest,
    Forbidden,
    TidingsError,
)
from tidings.hub.auth import Claims
from tidings.hub.hub import Hub, Subscription
from tidings.hub.subscriber import CloseReason, Subscriber
from tidings.hub.topics import Selector, SelectorKind, compile_selector
from tidings.hub.update import Update
from tidings.web.access import Access, RequestParts
from tidings.web.errors import error_response

__all__ = ["MercureEndpoint", "sink_for", "stream_subscription"]

log = logging.getLogger(__name__)

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


class MercureEndpoint:
    def __init__(self, hub: Hub, access: Access) -> None:
        self.hub = hub
        self.access = access

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
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"private, no-cache, no-store"),
                (b"x-accel-buffering", b"no"),
                (b"last-event-id", subscription.last_event_id.encode()),
                (b"mercure-last-event-id", subscription.last_event_id.encode()),
            ]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            if scope["method"] == "HEAD":
                await send({"type": "http.response.body", "body": b""})
                return
            await stream_subscription(subscription, receive, send)
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


async def stream_subscription(subscription: Subscription, receive: Receive, send: Send) -> None:
    """Replay, then hand the connection to the hub's flushes until either side ends it.

    While live, this task only waits for the client to go away; the hub writes through an
    `AsgiSink`. When the hub closes the subscriber (slow reader, shutdown, token expiry) it
    interrupts that wait by cancelling this task, then the response is ended cleanly.
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
            subscription.go_live(sink_for(send, sub))
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


class AsgiSink:
    """Writes a chunk with the ASGI `send` without a task switch when it can.

    `send()` returns a coroutine; it is stepped right here. Under uvicorn a body write
    finishes in that first step (the bytes go to the socket buffer) unless the connection
    is paused by flow control, in which case the coroutine is resumed when the future it
    waits on completes, and the subscriber is told when it has drained. One task switch per
    delivery costs more than the write itself, so this is the hot path of fan-out.
    """

    __slots__ = ("_send", "_subscriber")

    def __init__(self, send: Send, subscriber: Subscriber) -> None:
        self._send = send
        self._subscriber = subscriber

    def write(self, chunk: bytes) -> bool:
        coroutine = self._send({"type": "http.response.body", "body": chunk, "more_body": True})
        return self._step(coroutine)  # type: ignore[arg-type]

    def _step(self, coroutine: Coroutine[Any, Any, None]) -> bool:
        try:
            waiting_on = coroutine.send(None)
        except StopIteration:
            return True
        except Exception as exc:  # ClientDisconnected (an OSError) or a closed response
            log.debug("write to subscriber %s failed: %r", self._subscriber.id, exc)
            self._subscriber.close(CloseReason.CLIENT_GONE)
            return True
        if isinstance(waiting_on, asyncio.Future):
            # What asyncio.Task does with a future a coroutine yields.
            waiting_on._asyncio_future_blocking = False
            waiting_on.add_done_callback(lambda _: self._resume(coroutine))
        else:  # a bare yield (sleep(0)): try again on the next loop iteration
            asyncio.get_running_loop().call_soon(self._resume, coroutine)
        return False

    def _resume(self, coroutine: Coroutine[Any, Any, None]) -> None:
        if self._step(coroutine):
            self._subscriber.drained()


def sink_for(send: Send, subscriber: Subscriber) -> AsgiSink | UvicornSink:
    """The cheapest way to write this response's live chunks: straight to the socket when
    the server is uvicorn's httptools protocol, else through the ASGI `send`."""
    cycle = getattr(send, "__self__", None)
    if UvicornSink.fits(cycle):
        return UvicornSink(cycle, send, subscriber)
    return AsgiSink(send, subscriber)


class UvicornSink:
    """Writes chunks to uvicorn's transport itself, framed as uvicorn would frame them.

    Fan-out's cost is one write per subscriber per flush, and uvicorn's `send()` around
    that write (a message dict, a coroutine, its checks) costs more than the write's own
    Python work: measured here, it is most of the CPU per delivery after the syscall.
    This is the only place that knows uvicorn's internals: the response cycle that `send`
    is bound to, with `transport`, `flow` (write paused), `disconnected` and
    `chunked_encoding`. `fits()` checks all of them, so a uvicorn that changes them gets
    the plain `AsgiSink` (tests/integration/test_fast_path.py notices that). Everything but
    live chunks (headers, replay, the end of the response) still goes through `send`, and
    whenever uvicorn would wait (writing paused by flow control) so does this sink.
    """

    __slots__ = ("_cycle", "_send", "_subscriber", "_transport")

    def __init__(self, cycle: Any, send: Send, subscriber: Subscriber) -> None:
        self._cycle = cycle
        self._transport = cycle.transport
        self._send = send
        self._subscriber = subscriber

    @staticmethod
    def fits(cycle: object) -> bool:
        return (
            type(cycle).__module__ == "uvicorn.protocols.http.httptools_impl"
            and type(cycle).__name__ == "RequestResponseCycle"
            and getattr(cycle, "chunked_encoding", None) is True
            and getattr(cycle, "response_started", None) is True
            and getattr(cycle, "response_complete", None) is False
            and isinstance(getattr(getattr(cycle, "flow", None), "write_paused", None), bool)
            and callable(getattr(getattr(cycle, "transport", None), "write", None))
        )

    def write(self, chunk: bytes) -> bool:
        cycle = self._cycle
        if cycle.flow.write_paused or cycle.disconnected:
            # uvicorn's send() waits for the drain, or sees the client gone. Made here, not
            # kept: memory per idle subscriber counts.
            return AsgiSink(self._send, self._subscriber).write(chunk)
        try:
            self._transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        except Exception as exc:  # a transport closed under us
            log.debug("write to subscriber %s failed: %r", self._subscriber.id, exc)
            self._subscriber.close(CloseReason.CLIENT_GONE)
        return True


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
        if not (retry_text.isascii() and retry_text.isdigit()):
            raise BadRequest("retry must be ASCII digits")
        retry = int(retry_text)
    return Update.create(
        topics,
        fields.get("data", ""),
        id=fields.get("id") or None,
        private=private,
        type=fields.get("type") or None,
        retry=retry,
    )


