"""The live stream's direct write to uvicorn's transport (web/sinks.py, `UvicornSink`).

The sink leans on uvicorn's response cycle: if an upgrade changes what it relies on, the
hub silently falls back to the slower ASGI `send()`. These tests run a real uvicorn on a
real socket and fail when that happens (so the uvicorn pin in pyproject.toml is raised
only with them green), check the bytes on the wire are a correct chunked response either
way, and that the `uvicorn_fast_path` setting switches the direct write off.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import socket
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from packaging.requirements import Requirement

from tests.conftest import KEY, SSEStream, open_stream, publish
from tidings.hub.subscriber import Subscriber, SubscriberLimits
from tidings.hub.topics import compile_selector
from tidings.settings import Settings
from tidings.web.app import TidingsApp, create_app
from tidings.web.sinks import AsgiSink, UvicornSink, sink_for

pytestmark = pytest.mark.anyio

FRAMES = [b"id: 1\ndata: one\n\n", b"id: 2\ndata: two\ndata: lines\n\n", b": heartbeat\n\n"]


class StreamApp:
    """Writes FRAMES through `sink_for` (or a plain AsgiSink) and records the sink's type."""

    def __init__(self, *, plain: bool = False) -> None:
        self.plain = plain
        self.sinks: list[type[object]] = []
        self.fits: list[bool] = []  # whether uvicorn's response cycle has what the sink uses

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        subscriber = Subscriber((compile_selector("/t", "topic"),), None,
                                limits=SubscriberLimits(), on_ready=lambda _: None)
        self.fits.append(UvicornSink.fits(getattr(send, "__self__", None)))
        sink = AsgiSink(send, subscriber) if self.plain else sink_for(send, subscriber)
        self.sinks.append(type(sink))
        for frame in FRAMES:
            assert sink.write(frame)
        await send({"type": "http.response.body", "body": b""})


@contextlib.asynccontextmanager
async def serve(app: Any, lifespan: str = "off") -> AsyncIterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, http="httptools", lifespan=lifespan,
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


def test_the_installed_uvicorn_is_in_the_pinned_range() -> None:
    """What these tests pass on is what pyproject.toml allows, and nothing newer."""
    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    [pin] = [Requirement(r) for r in project["project"]["dependencies"]
             if Requirement(r).name == "uvicorn"]
    assert any(spec.operator == "<" for spec in pin.specifier), "uvicorn needs an upper bound"
    assert importlib.metadata.version("uvicorn") in pin.specifier


async def test_uvicorn_streams_are_written_directly() -> None:
    app = StreamApp()
    body, encoding = await fetch(app)
    assert app.fits == [True], "uvicorn's response cycle changed: UvicornSink no longer fits"
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


async def live_sinks(settings: Settings) -> list[type[object]]:
    """The sink types of the hub's subscribers once a stream is live, in the full app."""
    app = create_app(settings)
    assert isinstance(app, TidingsApp)
    async with serve(app, lifespan="on") as url, httpx.AsyncClient(timeout=10) as client:
        base = url.rstrip("/")
        async with open_stream(client, base, [("topic", "/fast")]) as stream:
            assert (await publish(client, base, "/fast", "x")).status_code == 200
            assert (await stream.next()).data == "x"  # live: written by the hub's flush
            return [type(sub.sink) for sub in app.hub._subscribers]


@pytest.mark.parametrize("fast_path", [True, False])
async def test_the_setting_switches_the_fast_path(fast_path: bool) -> None:
    settings = Settings(db="memory://", jwt_key=KEY, chat=False, uvicorn_fast_path=fast_path)
    assert await live_sinks(settings) == [UvicornSink if fast_path else AsgiSink]


@pytest.mark.parametrize(("fast_path", "cors"), [(True, False), (False, False), (True, True)])
async def test_collection_watches_take_the_fast_path_too(
        tmp_path: Path, fast_path: bool, cors: bool) -> None:
    """`GET /api/collections/NAME/changes` skips Starlette as the hub does (unless CORS is
    configured), so its live writes go straight to uvicorn's transport as well."""
    config = tmp_path / "tidings.toml"
    config.write_text('[collections.notes]\nread = "public"\nwrite = "anyone"\n')
    settings = Settings(db=f"sqlite:///{tmp_path / 'feed.db'}", config=str(config),
                        jwt_key=KEY, chat=False, uvicorn_fast_path=fast_path,
                        cors_origins=("https://example.com",) if cors else ())
    app = create_app(settings)
    async with serve(app, lifespan="on") as url, httpx.AsyncClient(timeout=10) as client:
        base = url.rstrip("/")
        request = client.build_request("GET", base + "/api/collections/notes/changes")
        response = await client.send(request, stream=True)
        try:
            assert response.status_code == 200
            stream = SSEStream(response)
            inserted = await client.post(base + "/api/collections/notes", json={"n": 1})
            assert inserted.status_code == 201
            event = await stream.next()
            while not event.data:  # a comment or a heartbeat
                event = await stream.next()
            assert json.loads(event.data)["fullDocument"]["n"] == 1
            sinks = [type(sub.sink) for sub in app.hub._subscribers]
        finally:
            await response.aclose()
        missing = await client.get(base + "/api/collections/nothing/changes")
        assert missing.status_code == 404  # the endpoint's own errors, either way
    assert sinks == [UvicornSink if fast_path and not cors else AsgiSink]


async def test_a_signed_in_chat_window_takes_the_fast_path(tmp_path: Path) -> None:
    """The chat counts a signed-in user's streams for presence by wrapping `send`; the
    hub's sink sees through that wrapper."""
    settings = Settings(db=f"sqlite:///{tmp_path / 'chat.db'}", jwt_key=KEY, chat=True)
    app = create_app(settings)
    async with serve(app, lifespan="on") as url, httpx.AsyncClient(timeout=10) as client:
        base = url.rstrip("/")
        signed_up = await client.post(base + "/api/auth/signup",
                                      json={"username": "ada", "password": "correct horse battery"})
        assert signed_up.status_code == 201, signed_up.text
        async with open_stream(client, base, [("topic", "/fast")]) as stream:
            assert (await publish(client, base, "/fast", "x")).status_code == 200
            assert (await stream.next()).data == "x"
            sinks = [type(sub.sink) for sub in app.hub._subscribers]
    assert sinks == [UvicornSink]
