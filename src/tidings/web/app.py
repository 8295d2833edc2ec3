"""The ASGI application: the parts `create_app` builds from the settings, mounted side by
side. Each part is a thin layer over the hub, a feed or the chat; none holds business
logic.

    /                         the chat's page (`web/chat.py`), or the hub page (`pages.py`)
    /hub, /static             the hub's status page and debugger (`pages.py`)
    /healthz, /metrics        for operators (`ops.py`)
    /openapi.json             every route described (`openapi.py`)
    /.well-known/mercure      subscribe and publish (`mercure.py`; presence: `chat_streams.py`)
    /.well-known/mercure/subscriptions   the subscriptions API (`subscriptions.py`)
    /api/collections/...      documents and their changes (`collections.py`)
    /api/...                  the chat (`chat.py`)
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import multiprocessing
import os
import signal
import sys

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from tidings.chat import ChatConfig, ChatService
from tidings.chat.assistant import AssistantConfig
from tidings.chat.model import is_shared_db
from tidings.feeds import FeedConfig, Retention, load_config, open_feeds
from tidings.feeds.base import ChangeFeed
from tidings.hub.auth import KeyConfig
from tidings.hub.hub import Hub, HubConfig
from tidings.hub.subscriber import SubscriberLimits
from tidings.settings import Settings
from tidings.transports import open_transport
from tidings.web.access import Access
from tidings.web.chat import ChatAPI
from tidings.web.chat_streams import ChatStreams
from tidings.web.collections import RESUME_HEADER, CollectionsAPI, watched_collection
from tidings.web.errors import router_error
from tidings.web.lifespan import lifespan
from tidings.web.mercure import MercureEndpoint
from tidings.web.openapi import openapi
from tidings.web.ops import Ops
from tidings.web.pages import hub_page_routes, static_files
from tidings.web.subscriptions import SubscriptionsAPI

__all__ = ["SETTINGS_ENV", "TidingsApp", "app_from_environment", "create_app"]

# Worker processes read their settings from here (the parent process writes it).
SETTINGS_ENV = "TIDINGS_SETTINGS_JSON"

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def app_from_environment() -> TidingsApp:
    """The app factory worker processes use (`uvicorn --factory`)."""
    _end_with_the_supervisor()
    return create_app(Settings.from_json(os.environ[SETTINGS_ENV]))


def _end_with_the_supervisor() -> None:
    """A `--workers` process stops (SIGTERM: its graceful shutdown) when the process that
    started it dies, even by SIGKILL; else it would go on serving the port, tailing and
    holding its leases with nobody left to stop it. Linux only (prctl)."""
    if sys.platform != "linux":
        return
    supervisor = multiprocessing.parent_process()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if supervisor is not None and os.getppid() != supervisor.pid:
        os.kill(os.getpid(), signal.SIGTERM)  # it died before the line above


def create_app(settings: Settings) -> TidingsApp:
    hub = _hub(settings)
    access = _access(settings)
    # Collections and their change feed (docs/feeds.md): idle unless configured/watched.
    feed = _feed(settings, hub)
    chat = _chat(settings, hub, access)
    chat_streams = ChatStreams(chat) if chat is not None else None
    fast = settings.uvicorn_fast_path
    mercure = MercureEndpoint(hub, access, uvicorn_fast_path=fast)
    # Subscriptions with a chat session cookie pass the chat's presence gate first.
    hub_endpoint = chat_streams.wrap(mercure) if chat_streams is not None else mercure
    collections = CollectionsAPI(feed, hub, access, uvicorn_fast_path=fast)
    routes: list[BaseRoute] = [
        *(ChatAPI(chat, publisher_key=access.publisher_key).routes() if chat is not None
          else []),
        *hub_page_routes(at_root=chat is None),
        *Ops(hub, feed, chat).routes(),
        Route("/openapi.json", openapi),
        Route("/.well-known/mercure", hub_endpoint, methods=["GET", "HEAD", "POST"]),
        *SubscriptionsAPI(hub, access).routes(),
        *collections.routes(),
        static_files(),
    ]
    app = Starlette(routes=routes, middleware=_middleware(settings),
                    lifespan=lifespan(hub, feed, chat),
                    exception_handlers={HTTPException: router_error})
    if settings.cors_origins:
        return TidingsApp(app, hub, None)
    return TidingsApp(app, hub, hub_endpoint, collections.watch)


# -- the parts, from the settings ------------------------------------------------------------


def _key(settings: Settings, key: str) -> KeyConfig | None:
    if not key:
        return None
    return KeyConfig(
        key=key,
        algorithm=settings.jwt_algorithm,
        audience=settings.jwt_audience or None,
        issuer=settings.jwt_issuer or None,
    )


def _hub(settings: Settings) -> Hub:
    transport = open_transport(
        settings.history_url,
        history_size=settings.history_size,
        history_max_age_s=settings.history_max_age,
    )
    return Hub(
        transport,
        HubConfig(
            heartbeat_s=settings.heartbeat,
            max_subscribers=settings.max_subscribers,
            max_selectors=settings.max_selectors,
            subscriptions=settings.subscriptions,
            limits=SubscriberLimits(max_frames=settings.subscriber_buffer),
        ),
    )


def _access(settings: Settings) -> Access:
    return Access(
        publisher_key=_key(settings, settings.publisher_key),
        subscriber_key=_key(settings, settings.subscriber_key),
        anonymous=settings.anonymous,
        max_body=settings.max_body,
    )


def _feed(settings: Settings, hub: Hub) -> ChangeFeed | None:
    config = load_config(settings.config) if settings.config else FeedConfig()
    if settings.mongo or settings.mongo_watch:
        config = dataclasses.replace(config, mongodb=config.mongodb.with_watched(
            settings.mongo, settings.mongo_watch))
    return open_feeds(
        settings.db,
        hub,
        config=config,
        retention=Retention(settings.changes_size, settings.changes_max_age),
        pg_capture=settings.pg_capture,
        pg_slot_read=settings.pg_slot_read,
    )


def _chat(settings: Settings, hub: Hub, access: Access) -> ChatService | None:
    """The chat (docs/chat.md), unless turned off. On several workers it needs its tables
    in PostgreSQL, where the processes share them (and presence, rate limits, replies and
    exports: `chat/cluster.py`); on SQLite it is off there."""
    if not settings.chat:
        return None
    if settings.workers > 1 and not is_shared_db(settings.db):
        log.warning("chat: off, because --workers %d needs the chat's tables shared: use "
                    "--db postgresql://... (or --workers 1, or --no-chat to silence this)",
                    settings.workers)
        return None
    return ChatService(hub, ChatConfig(
        db_url=settings.db,
        session_ttl_s=settings.chat_session_ttl,
        rate_messages=settings.chat_rate_messages,
        rate_window_s=settings.chat_rate_window,
        heartbeat_s=settings.chat_heartbeat,
        assistant=AssistantConfig(
            url=settings.assistant_url, model=settings.assistant_model,
            key=settings.assistant_key, timeout_s=settings.assistant_timeout,
            max_prompt=settings.assistant_max_prompt),
    ), access.subscriber_key)


def _middleware(settings: Settings) -> list[Middleware]:
    if not settings.cors_origins:
        return []
    return [Middleware(
        CORSMiddleware,
        allow_origins=list(settings.cors_origins),
        allow_credentials="*" not in settings.cors_origins,
        allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
        allow_headers=["Authorization", "Last-Event-ID", "Content-Type", "Cache-Control"],
        expose_headers=["Last-Event-ID", "Mercure-Last-Event-ID", RESUME_HEADER],
    )]


class TidingsApp:
    """The ASGI app: hub requests go straight to the Mercure endpoint, watches of a
    collection (`GET /api/collections/NAME/changes`) straight to the watch endpoint, the
    rest to Starlette.

    Each layer of Starlette's middleware and routing keeps a coroutine frame alive for
    the whole life of a stream; skipping them saves about 2 KiB per idle subscriber, and
    a stream's `send` is then uvicorn's own, which its live writes skip (web/sinks.py).
    Both endpoints handle their own errors. With CORS configured (`fast_path` None)
    everything goes through Starlette so that the CORS middleware sees these requests too.
    """

    def __init__(self, app: Starlette, hub: Hub, fast_path: ASGIApp | None,
                 watch: ASGIApp | None = None) -> None:
        self.app = app
        self.hub = hub
        self.fast_path = fast_path
        self.watch = watch if fast_path is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.fast_path is not None
            and scope["type"] == "http"
            and scope["path"] == "/.well-known/mercure"
        ):
            await self.fast_path(scope, receive, send)
        elif (
            self.watch is not None
            and scope["type"] == "http"
            and scope["method"] == "GET"
            and (name := watched_collection(scope["path"])) is not None
        ):
            await self.watch({**scope, "path_params": {"name": name}}, receive, send)
        else:
            await self.app(scope, receive, send)
