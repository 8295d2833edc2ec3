"""A private answer of the assistant as a Starlette response: `text/event-stream` with
`delta` events (`{"text"}`) as the reply arrives, then `done` (`{"text"}`: all of it) or
`error` (`{"error", "text"}`: what came before).

The upstream request lives in the response's own task, inside `async with reply`: when the
caller goes away, the reply is unwound there and the endpoint's connection closed at once,
never by a generator finalizer. How the response learns that the caller left follows
Starlette's `StreamingResponse`: on ASGI spec 2.4 and later a send to a gone client raises,
so nothing else runs; before 2.4 (uvicorn reports 2.3, and drops such sends silently) one
listener task, in a task group with the response, waits for `http.disconnect`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from tidings.errors import TidingsError
from tidings.sse import encode_event

__all__ = ["AssistantStream"]

Reply = contextlib.AbstractAsyncContextManager[AsyncIterator[str]]


class _CallerLeft(Exception):
    """A send failed (ASGI >= 2.4): the caller is gone."""


def _json_event(event: str, data: dict[str, object]) -> bytes:
    return encode_event(json.dumps(data, ensure_ascii=False, separators=(",", ":")),
                        event=event)


def _spec_version(scope: Scope) -> tuple[int, ...]:
    return tuple(map(int, scope.get("asgi", {}).get("spec_version", "2.0").split(".")))


class AssistantStream(Response):
    """The reply `reply` (opened once the response has started) as an event stream."""

    media_type = "text/event-stream"

    def __init__(self, reply: Reply, background: BackgroundTask | None = None) -> None:
        self._reply = reply
        self.status_code = 200
        self.background = background
        # No body and so no content-length: the stream ends when the reply does.
        self.init_headers({"cache-control": "private, no-cache, no-store",
                           "x-accel-buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if _spec_version(scope) >= (2, 4):
                await self._stream(send)
            else:
                await self._stream_until_disconnect(receive, send)
        except _CallerLeft:
            return  # no background work for a caller who left (Starlette: ClientDisconnect)
        if self.background is not None:
            await self.background()

    async def _stream_until_disconnect(self, receive: Receive, send: Send) -> None:
        """`_stream` in this task, and one listener task: the body has been read, so the
        next message is the caller leaving, and the listener's `_CallerLeft` makes the
        task group cancel `_stream`. Any other cancellation (shutdown) goes on up."""

        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            raise _CallerLeft

        try:
            async with asyncio.TaskGroup() as group:
                listener = group.create_task(listen())
                await self._stream(send)
                listener.cancel()
        except* _CallerLeft:
            raise _CallerLeft from None

    async def _stream(self, send: Send) -> None:
        await self._send(send, {"type": "http.response.start", "status": self.status_code,
                                "headers": self.raw_headers})
        text: list[str] = []
        try:
            async with self._reply as pieces:
                async for piece in pieces:
                    text.append(piece)
                    await self._send(send, {"type": "http.response.body",
                                            "body": _json_event("delta", {"text": piece}),
                                            "more_body": True})
            last = _json_event("done", {"text": "".join(text)})
        except TidingsError as exc:  # AssistantFailed, or the database went away
            last = _json_event("error", {"error": exc.message, "text": "".join(text)})
        except TimeoutError:
            last = _json_event("error", {"error": "the reply took too long",
                                         "text": "".join(text)})
        await self._send(send, {"type": "http.response.body", "body": last,
                                "more_body": False})

    @staticmethod
    async def _send(send: Send, message: dict[str, object]) -> None:
        try:
            await send(message)
        except OSError as exc:  # uvicorn's ClientDisconnected on ASGI >= 2.4
            raise _CallerLeft from exc
