"""The live stream's direct write to uvicorn's transport (web/mercure.py, `UvicornSink`).

The sink leans on uvicorn's response cycle: if an upgrade changes what it relies on, the
hub silently falls back to the slower ASGI `send()`. These tests run a real uvicorn on a
real socket and fail when that happens, and check the bytes on the wire are a correct
chunked response either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn

from tidings.hub.subscriber import Subscriber, SubscriberLimits
from tidings.hub.topics import compile_selector
from tidings.web.mercure import AsgiSink, UvicornSink, sink_for

pytestmark = pytest.mark.anyio

FRAMES = [b"id: 1\ndata: one\n\n", b"id: 2\ndata: two\ndata: lines\n\n", b": heartbeat\n\n"]


class StreamApp:
    """Writes FRAMES through `sink_for` (or a plain AsgiSink) and records the sink's type."""

    def __init__(self, *, plain: bool = False) -> None:
        self.plain = plain
        self.sinks: list[type[object]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        subscriber = Subscriber((compile_selector("/t", "topic"),), None,
                                limits=SubscriberLimits(), on_ready=lambda _: None)
        sink = AsgiSink(send, subscriber) if self.plain else sink_for(send, subscriber)
        self.sinks.append(type(sink))
        for frame in FRAMES:
            assert sink.write(frame)
        await send({"type": "http.response.body", "body": b""})


@contextlib.asynccontextmanager
async def serve(app: StreamApp) -> AsyncIterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, http="httptools", lifespan="off",
                                           log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        await task
        sock.close()


async def fetch(app: StreamApp) -> tuple[bytes, str | None]:
    async with serve(app) as url, httpx.AsyncClient() as client:
        response = await client.get(url)
    return response.content, response.headers.get("transfer-encoding")


async def test_uvicorn_streams_are_written_directly() -> None:
    app = StreamApp()
    body, encoding = await fetch(app)
    assert app.sinks == [UvicornSink]
    assert encoding == "chunked"
    assert body == b"".join(FRAMES)


async def test_direct_and_asgi_writes_put_the_same_bytes_on_the_wire() -> None:
    direct, plain = StreamApp(), StreamApp(plain=True)
    assert await fetch(direct) == await fetch(plain)
    assert plain.sinks == [AsgiSink]


def test_other_servers_get_the_asgi_sink() -> None:
    async def send(message: object) -> None:
        raise AssertionError("not called")

    subscriber = Subscriber((), None, limits=SubscriberLimits(), on_ready=lambda _: None)
    assert isinstance(sink_for(send, subscriber), AsgiSink)
