"""The error tree. Every error carries the HTTP status the web layer answers with.

    TidingsError
    ├── BadRequest            400  malformed input (selectors, ids, retry, form fields)
    │   └── SSEProtocolError  400  a stream the SSE parser cannot accept
    ├── Unauthorized          401  malformed, expired or wrongly signed JWT
    │   └── TokenMissing      401  no token where one is needed
    ├── Forbidden             403  a valid JWT whose claims do not cover the request
    ├── NotFound              404
    ├── PayloadTooLarge       413
    ├── ServiceUnavailable    503  too many connections, transport down
    └── TransportClosed       503  a call after Transport.close()
"""

from __future__ import annotations

__all__ = [
    "BadRequest",
    "Forbidden",
    "NotFound",
    "PayloadTooLarge",
    "SSEProtocolError",
    "ServiceUnavailable",
    "TidingsError",
    "TokenMissing",
    "TransportClosed",
    "Unauthorized",
]


class TidingsError(Exception):
    status_hint: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(TidingsError):
    status_hint = 400


class SSEProtocolError(BadRequest):
    pass


class Unauthorized(TidingsError):
    status_hint = 401


class TokenMissing(Unauthorized):
    """No token was presented where one is needed (no `error=` in the challenge)."""


class Forbidden(TidingsError):
    status_hint = 403


class NotFound(TidingsError):
    status_hint = 404


class PayloadTooLarge(TidingsError):
    status_hint = 413


class ServiceUnavailable(TidingsError):
    status_hint = 503

    def __init__(self, message: str, retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TransportClosed(ServiceUnavailable):
    pass
