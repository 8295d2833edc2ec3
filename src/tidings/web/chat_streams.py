"""The chat's presence gate in front of the hub's endpoint.

A user is online from the moment the hub answers 200 to a subscription carrying their chat
session cookie until that stream ends, in the rooms whose topics (`topic=/chat/rooms/NAME`)
it names. The hub knows nothing of this: the gate watches the response start go by and
the call return. Subscriptions without the cookie go straight to the hub, at the cost of
one scan of the request headers.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tidings.chat.presence import Connection
from tidings.chat.service import ChatService
from tidings.web.access import RequestParts
from tidings.web.chat import SESSION_COOKIE

__all__ = ["ChatStreams"]

_SESSION_COOKIE_BYTES = SESSION_COOKIE.encode() + b"="


class ChatStreams:
    """Presence: wraps the hub's endpoint for subscriptions that carry a chat session."""

    def __init__(self, service: ChatService) -> None:
        self.service = service

    @staticmethod
    def wants(scope: Scope) -> bool:
        if scope["method"] != "GET":
            return False
        for name, value in scope["headers"]:
            if name == b"cookie" and _SESSION_COOKIE_BYTES in value:
                return True
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send,
                       inner: ASGIApp) -> None:
        parts = RequestParts(scope)
        user = await self.service.stream_user(parts.cookies.get(SESSION_COOKIE))
        if user is None:
            await inner(scope, receive, send)
            return
        rooms = await self.service.stream_rooms(
            [value for name, value in parts.query_list
             if name in ("topic", "match", "matchExact")])
        del parts
        service = self.service
        opened: list[Connection] = []

        # `wraps`: the hub's sink finds uvicorn's response cycle through `__wrapped__`
        # and writes live chunks straight to it (web/sinks.py); only the start is tracked.
        @functools.wraps(send)
        async def tracking_send(message: Message) -> None:
            if (message["type"] == "http.response.start" and message["status"] == 200
                    and not opened):
                opened.append(service.stream_opened(user, rooms))
            await send(message)

        try:
            await inner(scope, receive, tracking_send)
        finally:
            for connection in opened:
                service.stream_closed(connection)

    def wrap(self, inner: ASGIApp) -> ASGIApp:
        """The hub's endpoint with this gate in front (for the routed path)."""
        return _Gated(self, inner)


class _Gated:
    def __init__(self, gate: ChatStreams, inner: ASGIApp) -> None:
        self.gate = gate
        self.inner = inner

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # A plain function handing on the awaitable: no frame of its own kept for the
        # life of each stream.
        if self.gate.wants(scope):
            return self.gate(scope, receive, send, self.inner)
        return self.inner(scope, receive, send)
