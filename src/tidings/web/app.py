"""The ASGI application: thin routes over the hub."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import FrameType
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from tidings import __version__
from tidings.chat import ChatConfig, ChatService
from tidings.chat.assistant import AssistantConfig
from tidings.errors import TidingsError
from tidings.feeds import Retention, load_config, open_feed
from tidings.hub.auth import KeyConfig
from tidings.hub.hub import Hub, HubConfig
from tidings.hub.subscriber import SubscriberLimits
from tidings.settings import Settings
from tidings.transports import open_transport
from tidings.web.access import Access, RequestParts, claims_for
from tidings.web.chat import ChatAPI, ChatStreams
from tidings.web.collections import RESUME_HEADER, CollectionsAPI
from tidings.web.mercure import MercureEndpoint
from tidings.web.openapi import openapi_document

__all__ = ["SETTINGS_ENV", "TidingsApp", "app_from_environment", "create_app"]

STATIC = Path(__file__).parent / "static"
# Worker processes read their settings from here (the parent process writes it).
SETTINGS_ENV = "TIDINGS_SETTINGS_JSON"


def _end_streams_on_signals(hub: Hub) -> None:
    """On SIGTERM/SIGINT, end every stream, then let the server's own handler run.

    SSE streams never end by themselves, so a server's graceful shutdown would wait for
    them until its timeout. The server (uvicorn, in each worker process too) has installed
    its handlers before the lifespan starts; ours wraps them and is dropped when the server
    restores the original handlers on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        return  # signals are only delivered to the main thread
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)

        def handler(signum: int, frame: FrameType | None, previous: Any = previous) -> None:
            loop.call_soon_threadsafe(hub.begin_shutdown)
            if callable(previous):
                previous(signum, frame)

        signal.signal(sig, handler)


def app_from_environment() -> TidingsApp:
    """The app factory worker processes use (`uvicorn --factory`)."""
    return create_app(Settings.from_json(os.environ[SETTINGS_ENV]))


def _key(settings: Settings, key: str) -> KeyConfig | None:
    if not key:
        return None
    return KeyConfig(
        key=key,
        algorithm=settings.jwt_algorithm,
        audience=settings.jwt_audience or None,
        issuer=settings.jwt_issuer or None,
    )


def create_app(settings: Settings) -> TidingsApp:
    transport = open_transport(
        settings.history_url,
        history_size=settings.history_size,
        history_max_age_s=settings.history_max_age,
    )
    hub = Hub(
        transport,
        HubConfig(
            heartbeat_s=settings.heartbeat,
            max_subscribers=settings.max_subscribers,
            max_selectors=settings.max_selectors,
            subscriptions=settings.subscriptions,
            limits=SubscriberLimits(max_frames=settings.subscriber_buffer),
        ),
    )
    access = Access(
        publisher_key=_key(settings, settings.publisher_key),
        subscriber_key=_key(settings, settings.subscriber_key),
        anonymous=settings.anonymous,
        max_body=settings.max_body,
    )
    mercure = MercureEndpoint(hub, access)
    # Collections and their change feed (docs/feeds.md): idle unless configured/watched.
    feed = open_feed(
        settings.db,
        hub,
        config=load_config(settings.config) if settings.config else None,
        retention=Retention(settings.changes_size, settings.changes_max_age),
    )
    collections = CollectionsAPI(feed, hub, access)
    # The chat (docs/chat.md): the page at /, its API, presence from its hub streams. Its
    # presence and rate limits live in one process, so it is off with several workers.
    chat: ChatService | None = None
    chat_api: ChatAPI | None = None
    chat_streams: ChatStreams | None = None
    if settings.chat and settings.workers <= 1:
        chat = ChatService(hub, ChatConfig(
            db_url=settings.db,
            session_ttl_s=settings.chat_session_ttl,
            rate_messages=settings.chat_rate_messages,
            rate_window_s=settings.chat_rate_window,
            assistant=AssistantConfig(
                url=settings.assistant_url, model=settings.assistant_model,
                key=settings.assistant_key, timeout_s=settings.assistant_timeout,
                max_prompt=settings.assistant_max_prompt),
        ), access.subscriber_key)
        chat_api = ChatAPI(chat, publisher_key=access.publisher_key)
        chat_streams = ChatStreams(chat)
    started = time.time()

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def healthz(request: Request) -> Response:
        return JSONResponse({
            "status": "ok",
            "version": __version__,
            "subscribers": hub.subscriber_count,
            "last_seq": hub.transport.last_seq,
            "uptime_s": round(time.time() - started, 1),
            "pid": os.getpid(),
        })

    async def metrics(request: Request) -> Response:
        m = hub.metrics
        lines = [
            ("tidings_subscribers", "gauge", "Subscribers connected now.", hub.subscriber_count),
            ("tidings_updates_published_total", "counter", "Updates published.", m.published),
            ("tidings_deliveries_total", "counter", "Updates handed to subscribers.",
             m.deliveries),
            ("tidings_replayed_total", "counter", "Updates sent from history on (re)connect.",
             m.replayed),
            ("tidings_connects_total", "counter", "Subscriber connections opened.", m.connects),
            ("tidings_disconnects_total", "counter", "Subscriber connections closed.",
             m.disconnects),
            ("tidings_slow_disconnects_total", "counter",
             "Subscribers disconnected because they fell behind.", m.slow_disconnects),
        ]
        text = "".join(
            f"# HELP {name} {help_}\n# TYPE {name} {kind}\n{name} {value}\n"
            for name, kind, help_, value in lines
        )
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def subscriptions(request: Request) -> Response:
        raw = request.scope.get("raw_path", request.url.path.encode()).decode("latin-1")
        path = raw.split("?", 1)[0].removeprefix("/.well-known/mercure/subscriptions")
        try:
            claims = claims_for(RequestParts(request.scope), access.subscriber_key)
            doc = hub.subscriptions(path.strip("/"), claims)
        except TidingsError as exc:
            return JSONResponse({"error": exc.message, "status": exc.status_hint},
                                status_code=exc.status_hint)
        return JSONResponse(doc, media_type="application/ld+json")

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_document(__version__))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await hub.start()
        if feed is not None:
            await feed.start()
        if chat is not None:
            await chat.start()
        _end_streams_on_signals(hub)
        # Everything imported and built so far lives as long as the process. Keeping it
        # out of the cyclic GC's sight makes a full collection (which otherwise stalls
        # every stream for tens of milliseconds) walk only what connections allocate.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            try:
                if chat is not None:
                    await chat.stop()
            finally:
                try:
                    if feed is not None:
                        await feed.stop()
                finally:
                    await hub.stop()

    middleware = []
    if settings.cors_origins:
        middleware.append(Middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_credentials="*" not in settings.cors_origins,
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Last-Event-ID", "Content-Type", "Cache-Control"],
            expose_headers=["Last-Event-ID", "Mercure-Last-Event-ID", RESUME_HEADER],
        ))
    app = Starlette(
        routes=[
            *(chat_api.routes() if chat_api is not None else [Route("/", index)]),
            Route("/hub", index),
            Route("/healthz", healthz),
            Route("/metrics", metrics),
            Route("/openapi.json", openapi),
            Route("/.well-known/mercure",
                  chat_streams.wrap(mercure) if chat_streams is not None else mercure,
                  methods=["GET", "HEAD", "POST"]),
            Route("/.well-known/mercure/subscriptions", subscriptions),
            Route("/.well-known/mercure/subscriptions/{rest:path}", subscriptions),
            *collections.routes(),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        middleware=middleware,
        lifespan=lifespan,
    )
    return TidingsApp(app, hub, None if settings.cors_origins else mercure, chat_streams)


class TidingsApp:
    """The ASGI app: hub requests go straight to the Mercure endpoint, the rest to Starlette.

    Each layer of Starlette's middleware and routing keeps a coroutine frame alive for
    the whole life of a stream; skipping them saves about 2 KiB per idle subscriber. The
    endpoint handles its own errors. With CORS configured (`fast_path` None) everything
    goes through Starlette so that the CORS middleware sees hub requests too.
    """

    def __init__(self, app: Starlette, hub: Hub, fast_path: MercureEndpoint | None,
                 chat_streams: ChatStreams | None = None) -> None:
        self.app = app
        self.hub = hub
        self.fast_path = fast_path
        # Subscriptions with a chat session cookie pass the chat's presence gate first.
        self.chat_streams = chat_streams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.fast_path is not None
            and scope["type"] == "http"
            and scope["path"] == "/.well-known/mercure"
        ):
            if self.chat_streams is not None and self.chat_streams.wants(scope):
                await self.chat_streams(scope, receive, send, self.fast_path)
            else:
                await self.fast_path(scope, receive, send)
        else:
            await self.app(scope, receive, send)
