"""Error responses: one small JSON shape for every 4xx/5xx the hub answers."""

from __future__ import annotations

import json

from starlette.types import Send

from tidings.errors import (
    Forbidden,
    ServiceUnavailable,
    TidingsError,
    TokenMissing,
    Unauthorized,
)

__all__ = ["error_response"]


async def error_response(
    send: Send,
    status: int,
    message: str,
    *,
    exc: TidingsError | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = json.dumps({"error": message, "status": status}).encode()
    out = [(b"content-type", b"application/json"), *(headers or [])]
    if isinstance(exc, TokenMissing):
        out.append((b"www-authenticate", b'Bearer realm="tidings"'))
    elif isinstance(exc, Unauthorized):
        out.append((b"www-authenticate", b'Bearer realm="tidings", error="invalid_token"'))
    elif isinstance(exc, Forbidden):
        out.append((b"www-authenticate", b'Bearer realm="tidings", error="insufficient_scope"'))
    if isinstance(exc, ServiceUnavailable):
        out.append((b"retry-after", str(exc.retry_after_s).encode()))
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": body})
