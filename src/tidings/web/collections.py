"""The collections API: REST over a change feed, and the watch endpoint.

    GET    /api/collections                     the collections served
    PUT    /api/collections/NAME                define a collection (201) or replace it (200)
    DELETE /api/collections/NAME                drop it, table and documents (204)
    POST   /api/collections/NAME                insert (201, the stored document)
    GET    /api/collections/NAME                list: ?FIELD=VALUE, limit, cursor, sort
    GET    /api/collections/NAME/changes        watch (text/event-stream): ?resume_after=
    GET    /api/collections/NAME/ID             one document
    PUT    /api/collections/NAME/ID             replace
    PATCH  /api/collections/NAME/ID             merge (RFC 7396)
    DELETE /api/collections/NAME/ID             delete (204)

Every answer about documents carries `Tidings-Resume-Token`: the change log's position
when it was read (or the change it made), so "load, then watch from the token" has no gap.

Defining and dropping (`feeds/definitions.py`) need a publisher token whose publish claim
matches `/collections/NAME`. The body of a PUT is `{"read", "write", "schema"}` (each
optional: private, publisher, none); a name the configuration file declares is 409.

Authorization (per collection, from the configuration): writes need a publisher token
whose publish claim matches `/collections/NAME` (`write = "publisher"`, the default), or
nothing (`"anyone"`); reads of a `read = "private"` collection (the default) need a token
whose subscribe claim matches `/collections/NAME` (or, for one document, its own topic
`/collections/NAME/ID`); public collections are open to anyone the hub lets subscribe.
"""

from __future__ import annotations

import json
from typing import cast
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from tidings.errors import (
    BadRequest,
    Forbidden,
    TidingsError,
    TokenMissing,
)
from tidings.feeds.base import ChangeFeed, Token, resolve_in
from tidings.feeds.catalog import read_only
from tidings.feeds.config import CollectionConfig, parse_definition, validate_name
from tidings.feeds.definitions import DefinesCollections, definition_json
from tidings.feeds.errors import (
    ConfigError,
    MethodNotAllowed,
    SchemaViolation,
    TokenTooOld,
    UnknownCollection,
)
from tidings.feeds.events import JSONObject
from tidings.feeds.query import ChangeFilter, ListQuery
from tidings.hub.auth import Claims
from tidings.hub.hub import Hub
from tidings.hub.topics import compile_selector
from tidings.sse import encode_event
from tidings.web.access import Access, RequestParts
from tidings.web.errors import error_headers, error_response, handles_errors
from tidings.web.json_input import parse_json_object
from tidings.web.mercure import SSE_HEADERS, stream_subscription

__all__ = ["RESUME_HEADER", "CollectionsAPI", "watched_collection"]

RESUME_HEADER = "Tidings-Resume-Token"
_JSON = "application/json"


def _error(exc: TidingsError) -> Response:
    body: dict[str, object] = {"error": exc.message, "status": exc.status_hint}
    headers = {name.decode(): value.decode() for name, value in error_headers(exc)}
    if isinstance(exc, SchemaViolation):
        body["errors"] = [dict(e) for e in exc.errors]
    if isinstance(exc, MethodNotAllowed):
        headers["Allow"] = "GET"
    return JSONResponse(body, status_code=exc.status_hint, headers=headers)


_handles_errors = handles_errors(_error)


def _document_response(document: JSONObject, token: Token, status: int = 200,
                       headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(document, status_code=status,
                        headers={RESUME_HEADER: str(token), **(headers or {})})


class CollectionsAPI:
    def __init__(
        self,
        feed: ChangeFeed | None,
        hub: Hub,
        access: Access,
        *,
        uvicorn_fast_path: bool = True,
    ) -> None:
        self.feed = feed
        self.hub = hub
        self.access = access
        self.uvicorn_fast_path = uvicorn_fast_path  # see web/sinks.py
        # The watch endpoint, a plain ASGI app: web/app.py may call it directly.
        self.watch = _WatchEndpoint(self)

    def routes(self) -> list[Route]:
        return [
            Route("/api/collections", self.index, methods=["GET"]),
            Route("/api/collections/{name}", self.collection_root,
                  methods=["GET", "POST", "PUT", "DELETE"]),
            Route("/api/collections/{name}/changes", self.watch, methods=["GET"]),
            Route("/api/collections/{name}/{doc_id}", self.document,
                  methods=["GET", "PUT", "PATCH", "DELETE"]),
        ]

    # -- helpers -------------------------------------------------------------------------

    def _collection(self, name: str) -> tuple[ChangeFeed, CollectionConfig]:
        if self.feed is None:
            raise UnknownCollection(f"no collection named {name!r}")
        return self.feed, self.feed.collection(name)

    def authorize_read(self, parts: RequestParts, collection: CollectionConfig,
                       doc_id: str | None = None) -> Claims | None:
        claims = self.access.reader(parts)
        if collection.private:
            if claims is None:
                raise TokenMissing(f"{collection.name} is private: reading it needs a "
                                   f"token whose subscribe claim matches {collection.topic}")
            topics = [collection.topic]
            if doc_id is not None:
                topics.append(f"{collection.topic}/{quote(doc_id, safe='')}")
            if not claims.may_read_private(topics):
                raise Forbidden(f"the token's subscribe claim does not cover {collection.topic}")
        return claims

    def _authorize_write(self, request: Request, collection: CollectionConfig) -> None:
        if not collection.writable:
            raise read_only(collection)
        if collection.write == "anyone":
            return
        claims = self.access.publisher(RequestParts(request.scope),
                                       doing=f"writing to {collection.name}")
        if not claims.may_publish([collection.topic]):
            raise Forbidden(f"the token's publish claim does not cover {collection.topic}")

    async def _body(self, request: Request) -> JSONObject:
        body = await self.access.body(request.receive, RequestParts(request.scope))
        try:
            return cast(JSONObject, parse_json_object(body, "the body"))
        except ValueError as exc:
            raise BadRequest(str(exc)) from None

    # -- endpoints ---------------------------------------------------------------------

    @_handles_errors
    async def index(self, request: Request) -> Response:
        collections = [] if self.feed is None else [
            {"name": c.name, "kind": c.kind, "key": c.key, "read": c.read, "write": c.write,
             "topic": c.topic}
            for c in self.feed.collections.values()
        ]
        return JSONResponse({"collections": collections})

    def _authorize_definition(self, request: Request, name: str) -> None:
        topic = f"/collections/{name}"
        claims = self.access.publisher(RequestParts(request.scope),
                                       doing=f"defining or dropping {name}")
        if not claims.may_publish([topic]):
            raise Forbidden(f"the token's publish claim does not cover {topic}")

    def _definer(self) -> DefinesCollections:
        if self.feed is None:
            raise ConfigError("collections need a database file or PostgreSQL (--db "
                              "sqlite:///FILE or postgresql://...)")
        if not isinstance(self.feed, DefinesCollections):
            raise MethodNotAllowed("this database's collections cannot be defined here")
        return self.feed

    async def _define(self, request: Request, name: str) -> Response:
        self._authorize_definition(request, name)
        definer = self._definer()
        config = parse_definition(name, await self._body(request))
        created = await definer.define(config)
        body = definition_json(config)
        if created:
            return JSONResponse(body, status_code=201,
                                headers={"Location": f"/api/collections/{name}"})
        return JSONResponse(body)

    async def _drop(self, request: Request, name: str) -> Response:
        self._authorize_definition(request, name)
        definer = self._definer()
        await definer.undefine(validate_name(name))
        return Response(status_code=204)

    @_handles_errors
    async def collection_root(self, request: Request) -> Response:
        name = request.path_params["name"]
        if request.method == "PUT":
            return await self._define(request, name)
        if request.method == "DELETE":
            return await self._drop(request, name)
        feed, collection = self._collection(name)
        if request.method == "POST":
            self._authorize_write(request, collection)
            result = await feed.insert(collection.name, await self._body(request))
            doc_id = str(result.document.get("id"))
            location = f"/api/collections/{collection.name}/{quote(doc_id, safe='')}"
            return _document_response(result.document, result.token, 201,
                                      {"Location": location})
        parts = RequestParts(request.scope)
        self.authorize_read(parts, collection)
        page = await feed.list(collection.name, ListQuery.from_params(parts.query_list))
        return JSONResponse(
            {"documents": list(page.documents), "next_cursor": page.next_cursor,
             "resume_token": str(page.token)},
            headers={RESUME_HEADER: str(page.token)},
        )

    @_handles_errors
    async def document(self, request: Request) -> Response:
        feed, collection = self._collection(request.path_params["name"])
        doc_id = request.path_params["doc_id"]
        method = request.method
        if method == "GET":
            self.authorize_read(RequestParts(request.scope), collection, doc_id)
            snapshot = await feed.get(collection.name, doc_id)
            return _document_response(snapshot.document, snapshot.token)
        self._authorize_write(request, collection)
        if method == "DELETE":
            result = await feed.delete(collection.name, doc_id)
            return Response(status_code=204, headers={RESUME_HEADER: str(result.token)})
        body = await self._body(request)
        if method == "PUT":
            result = await feed.replace(collection.name, doc_id, body)
        else:
            result = await feed.update(collection.name, doc_id, body)
        return _document_response(result.document, result.token)


def watched_collection(path: str) -> str | None:
    """NAME for the path `/api/collections/NAME/changes` (as the route reads it), else
    None."""
    prefix, suffix = "/api/collections/", "/changes"
    if not (path.startswith(prefix) and path.endswith(suffix)):
        return None
    name = path[len(prefix):-len(suffix)]
    return name if name and "/" not in name else None


def _resume_text(parts: RequestParts) -> str | None:
    """`Last-Event-ID` (an EventSource reconnecting) wins over `?resume_after=`, which
    also takes MongoDB's form of a token, `{"_data": "..."}`."""
    text = parts.headers.get("last-event-id") or parts.query.get("resume_after")
    if text and text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except ValueError:
            raise BadRequest("malformed resume token") from None
        if not isinstance(value, dict) or not isinstance(value.get("_data"), str):
            raise BadRequest("malformed resume token")
        return str(value["_data"])
    return text or None


class _WatchEndpoint:
    """`GET /api/collections/NAME/changes`: a hub subscription to `/collections/NAME`.

    The resume token is resolved here first (malformed or unknown: 400; too old for the
    retained log: one `event: error` with a JSON message, then the stream ends), then the
    stream is the hub's: replay after the token, then live, heartbeats, slow-reader
    protection, shutdown."""

    def __init__(self, api: CollectionsAPI) -> None:
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        api = self.api
        try:
            feed, collection = api._collection(scope["path_params"]["name"])
            parts = RequestParts(scope)
            claims = api.authorize_read(parts, collection)
            changes = ChangeFilter.from_params(parts.query_list)
            resume = _resume_text(parts)
            last_event_id: str | None = None
            if resume is not None:
                try:
                    point = await resolve_in(feed, collection.name, resume)
                except TokenTooOld as exc:
                    await _error_event(send, exc)
                    return
                last_event_id = point.last_event_id
            selectors = [compile_selector(collection.topic, "topic")]
            connection = api.hub.connect(
                selectors, claims, last_event_id,
                accept=None if changes.everything else changes.predicate(),
                index=changes.index(),
            )
        except TidingsError as exc:
            await error_response(send, exc.status_hint, exc.message, exc=exc)
            return
        try:
            async with connection as subscription:
                header_id = str(resume or subscription.last_event_id).encode()
                await send({"type": "http.response.start", "status": 200, "headers": [
                    *SSE_HEADERS,
                    (b"last-event-id", header_id),
                ]})
                await stream_subscription(subscription, receive, send,
                                          uvicorn_fast_path=api.uvicorn_fast_path)
        except TidingsError as exc:  # refused by the hub before any header (503)
            await error_response(send, exc.status_hint, exc.message, exc=exc)


async def _error_event(send: Send, exc: TidingsError) -> None:
    """A stream of one `event: error` (JSON message), then the end: an EventSource sees
    why, instead of silence or a reconnect loop on a 4xx."""
    data = json.dumps({"error": exc.message, "status": exc.status_hint,
                       "code": "resume_token_too_old"})
    await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
    await send({"type": "http.response.body", "body": encode_event(data, event="error")})
