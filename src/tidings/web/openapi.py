"""The OpenAPI document for every HTTP endpoint, so clients can be generated and the API
fuzzed. Written by hand: the routes are few and their shapes are the Mercure protocol's."""

from __future__ import annotations

from tidings.web.chat import openapi_paths as chat_paths

__all__ = ["openapi_document"]

_ERROR = {
    "description": "Error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}
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
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
_ID = {"name": "doc_id", "in": "path", "required": True, "schema": {"type": "string"}}
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
                           {"name": "limit", "in": "query", "schema": {"type": "integer"}},
                           {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                           {"name": "sort", "in": "query", "schema": {"type": "string"}}],
            "responses": {"200": {"description": "documents, next_cursor, resume_token",
                                  "content": {"application/json": {}}},
                          "400": _ERROR, "401": _ERROR, "403": _ERROR, "404": _ERROR},
        },
        "post": {
            "summary": "Insert a document (id generated when absent)",
            "security": [{"bearer": []}], "parameters": [_NAME], "requestBody": _JSON_BODY,
            "responses": {"201": _DOC, "400": _ERROR, "401": _ERROR, "403": _ERROR,
                          "404": _ERROR, "409": _ERROR, "413": _ERROR, "422": _ERROR},
        },
    },
    "/api/collections/{name}/changes": {"get": {
        "summary": "Watch the collection's changes (MongoDB-shaped events) as SSE",
        "parameters": [_NAME,
                       {"name": "resume_after", "in": "query", "schema": {"type": "string"}},
                       {"name": "operationType", "in": "query", "schema": {"type": "string"}},
                       {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}}],
        "responses": {"200": {"description": "The change stream",
                              "content": {"text/event-stream": {}}},
                      "400": _ERROR, "401": _ERROR, "404": _ERROR},
    }},
    "/api/collections/{name}/{doc_id}": {
        method: {
            "summary": summary, "parameters": [_NAME, _ID],
            **({"requestBody": _JSON_BODY} if method in ("put", "patch") else {}),
            **({"security": [{"bearer": []}]} if method != "get" else {}),
            "responses": {"200": _DOC, "400": _ERROR, "401": _ERROR, "403": _ERROR,
                          "404": _ERROR, "422": _ERROR},
        }
        for method, summary in (("get", "One document"), ("put", "Replace a document"),
                                ("patch", "Merge into a document (JSON merge patch)"),
                                ("delete", "Delete a document"))
    },
}


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
                        {"name": "lastEventID", "in": "query", "schema": {"type": "string"}},
                        {"name": "last_event_id", "in": "query", "schema": {"type": "string"}},
                        {"name": "authorization", "in": "query", "schema": {"type": "string"}},
                        {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}},
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
                    "parameters": [{"name": "rest", "in": "path", "required": True,
                                    "schema": {"type": "string"}}],
                    "responses": {"200": {"description": "JSON-LD",
                                          "content": {"application/ld+json": {}}},
                                  "401": _ERROR, "403": _ERROR, "404": _ERROR},
                },
            },
            **_COLLECTION_PATHS,
            "/healthz": {"get": {"summary": "Liveness and a few numbers",
                                 "responses": {"200": {"description": "OK",
                                                       "content": {"application/json": {}}}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics",
                                 "responses": {"200": {"description": "Metrics",
                                                       "content": {"text/plain": {}}}}}},
            "/openapi.json": {"get": {"summary": "This document",
                                      "responses": {"200": {"description": "OpenAPI",
                                                            "content": {"application/json": {}}}}}},
            "/": {"get": {"summary": "The chat (with --no-chat: the status page and debugger)",
                          "responses": {"200": {"description": "HTML",
                                                "content": {"text/html": {}}}}}},
            "/hub": {"get": {"summary": "Status page and debugger",
                             "responses": {"200": {"description": "HTML",
                                                   "content": {"text/html": {}}}}}},
            **chat_paths(),
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "bearerFormat": "JWT"}},
            "schemas": {"Error": {"type": "object", "properties": {
                "error": {"type": "string"}, "status": {"type": "integer"}}}},
        },
    }
