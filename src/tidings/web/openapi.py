"""The OpenAPI document for every HTTP endpoint, so clients can be generated and the API
fuzzed. Written by hand, all in this module: the routes are few and their shapes are the
Mercure protocol's; `tests/unit/test_openapi.py` fails on a route served but not described.
"""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tidings.version import __version__

__all__ = ["openapi", "openapi_document"]

_ERROR = {
    "description": "Error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}


def _param(name: str, where: str, kind: str = "string") -> dict[str, object]:
    """An optional query or header parameter."""
    return {"name": name, "in": where, "schema": {"type": kind}}


def _path_param(name: str) -> dict[str, object]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


_SELECTOR_PARAMS = [
    {"name": name, "in": "query", "required": False, "style": "form", "explode": True,
     "schema": {"type": "array", "items": {"type": "string"}}, "description": text}
    for name, text in (
        ("topic", "0.x selector: exact topic, RFC 6570 URI template, or *"),
        ("match", "1.0 exact matcher (or *)"),
        ("matchURLPattern", "1.0 URL pattern matcher"),
        ("match_urlpattern", "Alias of matchURLPattern"),
    )
]


_JSON_BODY = {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}}
_DOC = {"description": "The stored document",
        "content": {"application/json": {"schema": {"type": "object"}}}}
_READ_ONLY = {**_ERROR, "description": "The collection is read-only through the API (a "
                                        "watched table, or `write = \"none\"`)"}
_DELETED = {"description": "Deleted; the change's position in Tidings-Resume-Token"}
_NAME = _path_param("name")
_ID = _path_param("doc_id")
# Every query parameter that is not reserved filters on a document field (FIELD=VALUE).
_FILTERS = {"name": "filters", "in": "query", "style": "form", "explode": True,
            "schema": {"type": "object", "additionalProperties": {"type": "string"}},
            "description": "Equality filters on document fields, one FIELD=VALUE each "
                           "(dotted for nested fields; whole numbers up to 64 bits)"}
_RULES = {"read": {"enum": ["public", "private", None]},
          "write": {"enum": ["publisher", "anyone", "none", None]}}
_DEFINITION = {
    "type": "object", "additionalProperties": False,
    "properties": {**_RULES, "schema": {"type": ["object", "null"],
                                        "description": "A JSON Schema for the documents"}},
}
_COLLECTION = {"type": "object", "properties": {
    "name": {"type": "string"}, "kind": {"type": "string"}, "key": {"type": "string"},
    **_RULES, "topic": {"type": "string"}, "schema": {"type": ["object", "null"]}}}
_COLLECTION_PATHS: dict[str, object] = {
    "/api/collections": {"get": {
        "summary": "The collections this hub serves",
        "responses": {"200": {"description": "Names and kinds",
                              "content": {"application/json": {}}}}}},
    "/api/collections/{name}": {
        "get": {
            "summary": "List documents (equality filters as query parameters, limit, cursor,"
                       " sort), with the resume token of the snapshot",
            "parameters": [_NAME,
                           _param("limit", "query", "integer"),
                           _param("cursor", "query"),
                           _param("sort", "query"),
                           _FILTERS],
            "responses": {"200": {"description": "documents, next_cursor, resume_token",
                                  "content": {"application/json": {}}},
                          "400": _ERROR, "401": _ERROR, "403": _ERROR, "404": _ERROR},
        },
        "post": {
            "summary": "Insert a document (id generated when absent)",
            "security": [{"bearer": []}], "parameters": [_NAME], "requestBody": _JSON_BODY,
            "responses": {"201": _DOC, "400": _ERROR, "401": _ERROR, "403": _ERROR,
                          "404": _ERROR, "405": _READ_ONLY, "409": _ERROR, "413": _ERROR,
                          "422": _ERROR, "503": _ERROR},
        },
        "put": {
            "summary": "Define a managed collection, kept in the database (201), or replace "
                       "its settings (200). A name the configuration file declares: 409",
            "security": [{"bearer": []}], "parameters": [_NAME],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/Definition"}}}},
            "responses": {
                **{status: {"description": "The collection", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Collection"}}}}
                   for status in ("200", "201")},
                "400": _ERROR, "401": _ERROR, "403": _ERROR, "405": _ERROR, "409": _ERROR,
                "413": _ERROR, "422": _ERROR},
        },
        "delete": {
            "summary": "Drop a collection defined in the database: its table and documents; "
                       "its watchers get a `drop` event",
            "security": [{"bearer": []}], "parameters": [_NAME],
            "responses": {"204": {"description": "Dropped"}, "400": _ERROR, "401": _ERROR,
                          "403": _ERROR, "404": _ERROR, "405": _ERROR, "409": _ERROR},
        },
    },
    "/api/collections/{name}/changes": {"get": {
        "summary": "Watch the collection's changes (MongoDB-shaped events) as SSE",
        "parameters": [_NAME,
                       _param("resume_after", "query"),
                       _param("operationType", "query"),
                       _param("Last-Event-ID", "header"),
                       _FILTERS],
        "responses": {"200": {"description": "The change stream",
                              "content": {"text/event-stream": {}}},
                      "400": _ERROR, "401": _ERROR, "404": _ERROR},
    }},
    "/api/collections/{name}/{doc_id}": {
        method: {
            "summary": summary, "parameters": [_NAME, _ID],
            **({"requestBody": _JSON_BODY} if method in ("put", "patch") else {}),
            **({"security": [{"bearer": []}]} if method != "get" else {}),
            "responses": {
                **({"204": _DELETED} if method == "delete" else {"200": _DOC}),
                "400": _ERROR, "401": _ERROR, "403": _ERROR, "404": _ERROR, "422": _ERROR,
                **({} if method == "get" else {"405": _READ_ONLY, "503": _ERROR}),
                **({"413": _ERROR} if method in ("put", "patch") else {}),
            },
        }
        for method, summary in (("get", "One document"), ("put", "Replace a document"),
                                ("patch", "Merge into a document (JSON merge patch)"),
                                ("delete", "Delete a document"))
    },
}


# -- the chat (web/chat.py) ------------------------------------------------------------

_OBJECT = {"content": {"application/json": {"schema": {"type": "object"}}}}
# (path, method, summary, request body, success status)
# What a room and a direct conversation both take, below their own path.
_CONVERSATION_OPERATIONS = (
    ("/messages", "get", "History, newest first (?before=ID&limit=N), with `last_event_id`: "
     "subscribe with it as Last-Event-ID to get every update after this page, once",
     False, "200"),
    ("/messages", "post", "Post a message ({content})", True, "201"),
    ("/messages/{id}", "patch", "Edit one's own message", True, "200"),
    ("/messages/{id}", "delete", "Delete one's own message", False, "204"),
    ("/typing", "post", "Say one is typing (ephemeral)", False, "202"),
    ("/read", "post", "Mark read ({id} optional)", False, "200"),
)


def _in_conversation(prefix: str, where: str) -> list[tuple[str, str, str, bool, str]]:
    return [(prefix + path, method, f"{summary}: {where}", body, status)
            for path, method, summary, body, status in _CONVERSATION_OPERATIONS]


_CHAT_OPERATIONS: tuple[tuple[str, str, str, bool, str], ...] = (
    ("/api/auth/signup", "post", "Sign up ({username, password}); sets the session cookies",
     True, "201"),
    ("/api/auth/login", "post", "Log in ({username, password}); sets the session cookies",
     True, "200"),
    ("/api/auth/logout", "post", "Log out: ends the session, clears the cookies", False, "204"),
    ("/api/me", "get", "The signed-in user and what its page subscribes to", False, "200"),
    ("/api/session", "get", "{user}: /api/me's answer when signed in, else null (a 200 "
     "either way, for a page deciding what to show)", False, "200"),
    ("/api/users", "get", "Every user, with whether they are online", False, "200"),
    ("/api/rooms", "get", "Rooms: members, joined, unread, online", False, "200"),
    ("/api/rooms", "post", "Create a room ({name}) and join it", True, "201"),
    ("/api/rooms/{room}", "get", "One room", False, "200"),
    ("/api/rooms/{room}/join", "post", "Join a room", False, "200"),
    ("/api/rooms/{room}/leave", "post", "Leave a room", False, "200"),
    ("/api/rooms/{room}/members", "get", "A room's members", False, "200"),
    ("/api/rooms/{room}/presence", "get", "Who is online in a room", False, "200"),
    *(_in_conversation("/api/rooms/{room}", "a room")),
    ("/api/rooms/{room}/export", "post", "Export the history ({format}: json or csv)",
     False, "202"),
    ("/api/dm", "get", "One's direct conversations, with unread counts", False, "200"),
    *(_in_conversation("/api/dm/{user}", "direct messages with a user")),
    ("/api/messages/{id}", "patch", "Edit one's own message", True, "200"),
    ("/api/messages/{id}", "delete", "Delete one's own message", False, "204"),
    ("/api/rooms/{room}/assistant", "post",
     "Ask the assistant privately ({prompt}): text/event-stream of `delta` events "
     "({text}), then `done` ({text}) or `error` ({error, text})", True, "200"),
    ("/api/rooms/{room}/assistant/{id}/cancel", "post",
     "Stop a streaming reply of the assistant (the person who asked only); it keeps its "
     "text, marked cancelled", False, "200"),
    ("/api/notifications", "post",
     "Notify a user ({user, message, type}); needs a publisher token", True, "202"),
    ("/api/tasks/{task}", "get", "A task's state (its owner only)", False, "200"),
    ("/api/tasks/{task}/download", "get", "A finished export (its owner only)", False, "200"),
)

# What the bodies and queries above hold, for clients and the fuzzer (tests/integration/
# test_fuzz.py), which otherwise sends only bodies that miss every field.
_STR = {"type": "string"}
_BODIES: dict[str, dict[str, object]] = {
    "/api/auth/signup": {"username": _STR, "password": _STR},
    "/api/auth/login": {"username": _STR, "password": _STR},
    "/api/rooms": {"name": _STR},
    "messages": {"content": _STR},
    "/read": {"id": {"type": "integer"}},
    "/export": {"format": {"type": "string", "enum": ["json", "csv"]}},
    "/assistant": {"prompt": _STR},
    "/api/notifications": {"user": _STR, "message": _STR, "type": _STR},
}
_HISTORY_QUERY = [{"name": name, "in": "query", "required": False,
                   "schema": {"type": "string", "pattern": "^[0-9]+$"}, "description": text}
                  for name, text in (("before", "Messages older than this id"),
                                     ("limit", "At most this many (1 to 100)"))]


def _body_schema(path: str) -> dict[str, object]:
    for suffix, properties in _BODIES.items():
        if path == suffix or path.endswith(suffix) or (
                suffix == "messages" and "/messages" in path):
            return {"type": "object", "properties": properties}
    return {"type": "object"}


def _chat_paths() -> dict[str, dict[str, object]]:
    """The chat's routes (the page at / is described with the others). Every call takes
    the session as the `tidings_session` cookie or a bearer token."""
    paths: dict[str, dict[str, object]] = {}
    for path, method, summary, body, status in _CHAT_OPERATIONS:
        operation: dict[str, object] = {
            "summary": summary,
            "tags": ["chat"],
            "security": [{"bearer": []}],
            "responses": {
                status: {"description": "OK", **({} if status == "204" else _OBJECT)},
                **{code: _ERROR for code in ("400", "401", "403", "404", "409", "422", "429")},
            },
        }
        names = re.findall(r"\{(\w+)\}", path)
        if names:
            operation["parameters"] = [_path_param(name) for name in names]
        if method == "get" and path.endswith("/messages"):
            operation["parameters"] = [*operation.get("parameters", []),  # type: ignore[misc]
                                       *_HISTORY_QUERY]
        if body or path.endswith(("/read", "/export")):
            operation["requestBody"] = {"required": body, "content": {"application/json": {
                "schema": _body_schema(path)}}}
        if path.endswith("/assistant"):
            operation["responses"][status] = {  # type: ignore[index]
                "description": "The reply as it arrives", "content": {
                    "text/event-stream": {"schema": {"type": "string"}}}}
        paths.setdefault(path, {})[method] = operation
    return paths


# Routes that take nothing and answer one media type: (path, summary, description, type).
_PLAIN_GETS = (
    ("/healthz", "Liveness and a few numbers", "OK", "application/json"),
    ("/metrics", "Prometheus metrics", "Metrics", "text/plain"),
    ("/openapi.json", "This document", "OpenAPI", "application/json"),
    ("/", "The chat (with --no-chat: the status page and debugger)", "HTML", "text/html"),
    ("/hub", "Status page and debugger", "HTML", "text/html"),
)


def _plain_gets() -> dict[str, object]:
    return {path: {"get": {"summary": summary, "responses": {
        "200": {"description": description, "content": {media_type: {}}}}}}
        for path, summary, description, media_type in _PLAIN_GETS}


def openapi_document(version: str) -> dict[str, object]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Tidings",
            "version": version,
            "description": "A Mercure-compatible real-time update hub over Server-Sent Events.",
        },
        "paths": {
            "/.well-known/mercure": {
                "get": {
                    "summary": "Subscribe: an SSE stream of matching updates",
                    "parameters": [
                        *_SELECTOR_PARAMS,
                        _param("lastEventID", "query"),
                        _param("last_event_id", "query"),
                        _param("authorization", "query"),
                        _param("Last-Event-ID", "header"),
                    ],
                    "responses": {
                        "200": {
                            "description": "The event stream",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}},
                        },
                        "400": _ERROR, "401": _ERROR, "503": _ERROR,
                    },
                },
                "post": {
                    "summary": "Publish an update",
                    "security": [{"bearer": []}],
                    "requestBody": {
                        "required": True,
                        "content": {"application/x-www-form-urlencoded": {"schema": {
                            "type": "object",
                            "required": ["topic"],
                            "properties": {
                                "topic": {"type": "array", "items": {"type": "string"}},
                                "data": {"type": "string"},
                                "private": {"type": "string"},
                                "id": {"type": "string"},
                                "type": {"type": "string"},
                                "retry": {"type": "string", "pattern": "^[0-9]+$"},
                            },
                        }}},
                    },
                    "responses": {
                        "200": {"description": "The update's id",
                                "content": {"text/plain": {"schema": {"type": "string"}}}},
                        "400": _ERROR, "401": _ERROR, "403": _ERROR, "413": _ERROR,
                        # Not stored: the bus or database is away (503), or the disk
                        # under the hub's own SQLite is full (507); both with Retry-After.
                        "503": _ERROR, "507": _ERROR,
                    },
                },
            },
            "/.well-known/mercure/subscriptions": {
                "get": {
                    "summary": "Active subscriptions (with --subscriptions)",
                    "security": [{"bearer": []}],
                    "responses": {"200": {"description": "JSON-LD list of subscriptions",
                                          "content": {"application/ld+json": {}}},
                                  "401": _ERROR, "403": _ERROR},
                },
            },
            "/.well-known/mercure/subscriptions/{rest}": {
                "get": {
                    "summary": "Subscriptions for a selector, or one subscription",
                    "security": [{"bearer": []}],
                    "parameters": [_path_param("rest")],
                    "responses": {"200": {"description": "JSON-LD",
                                          "content": {"application/ld+json": {}}},
                                  "401": _ERROR, "403": _ERROR, "404": _ERROR},
                },
            },
            **_COLLECTION_PATHS,
            **_plain_gets(),
            **_chat_paths(),
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "bearerFormat": "JWT"}},
            "schemas": {
                "Error": {"type": "object", "properties": {
                    "error": {"type": "string"}, "status": {"type": "integer"}}},
                "Definition": _DEFINITION,
                "Collection": _COLLECTION,
            },
        },
    }


async def openapi(request: Request) -> Response:
    """`GET /openapi.json`."""
    return JSONResponse(openapi_document(__version__))
