"""Error responses: one small JSON shape for every 4xx/5xx the hub answers, and the
decorator that turns a route's `TidingsError` into its response."""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable
from typing import TypeVar

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Send

from tidings.errors import (
    Forbidden,
    ServiceUnavailable,
    TidingsError,
    TokenMissing,
    Unauthorized,
)

__all__ = ["error_response", "handles_errors", "router_error"]

API = TypeVar("API")
Handler = Callable[[API, Request], Awaitable[Response]]


def handles_errors(
    respond: Callable[[TidingsError], Response],
) -> Callable[[Handler[API]], Handler[API]]:
    """A route method whose `TidingsError` is answered by `respond(exc)` (each API has
    its own error body), instead of a 500."""

    def decorate(handler: Handler[API]) -> Handler[API]:
        @functools.wraps(handler)
        async def wrapper(api: API, request: Request) -> Response:
            try:
                return await handler(api, request)
            except TidingsError as exc:
                return respond(exc)

        return wrapper

    return decorate


async def error_response(
    send: Send,
    status: int,
    message: str,
    *,
    exc: TidingsError | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = json.dumps({"error": message, "status": status}).encode()
    out = [(b"content-type", b"application/json"), *(headers or []), *error_headers(exc)]
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": body})


def error_headers(exc: TidingsError | None) -> list[tuple[bytes, bytes]]:
    """The headers an error's answer carries: the bearer challenge of a 401 or 403
    (RFC 6750), how long to wait before retrying a 503."""
    if isinstance(exc, TokenMissing):
        return [(b"www-authenticate", b'Bearer realm="tidings"')]
    if isinstance(exc, Unauthorized):
        return [(b"www-authenticate", b'Bearer realm="tidings", error="invalid_token"')]
    if isinstance(exc, Forbidden):
        return [(b"www-authenticate", b'Bearer realm="tidings", error="insufficient_scope"')]
    if isinstance(exc, ServiceUnavailable):
        return [(b"retry-after", str(exc.retry_after_s).encode())]
    return []


async def router_error(request: Request, exc: Exception) -> Response:
    """The router's own 404 and 405 in the JSON shape of every other error."""
    if not isinstance(exc, HTTPException):
        raise exc
    return JSONResponse({"error": exc.detail, "status": exc.status_code},
                        status_code=exc.status_code, headers=exc.headers)
