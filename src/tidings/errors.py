"""The error tree. Every error carries the HTTP status the web layer answers with.

    TidingsError
    ├── BadRequest            400  malformed input (selectors, ids, retry, form fields)
    │   └── SSEProtocolError  400  a stream the SSE parser cannot accept
    ├── Unauthorized          401  malformed, expired or wrongly signed JWT
    │   └── TokenMissing      401  no token where one is needed
    ├── Forbidden             403  a valid JWT whose claims do not cover the request
    ├── NotFound              404
    ├── PayloadTooLarge       413
    └── RetryLater            ---  answered with `Retry-After: retry_after_s` (chat: 429)
        └── ServiceUnavailable  503  too many connections, transport down
            ├── InsufficientStorage 507  the disk under a database is full
            └── TransportClosed 503  a call after Transport.close()

A subclass states its status in its class line, `class Gone(TidingsError, status_hint=410)`,
so each error's status reads where it is declared, as in the tree above; one that does not
inherits its parent's.
"""

from __future__ import annotations

__all__ = [
    "BadRequest",
    "Forbidden",
    "InsufficientStorage",
    "NotFound",
    "PayloadTooLarge",
    "RetryLater",
    "SSEProtocolError",
    "ServiceUnavailable",
    "TidingsError",
    "TokenMissing",
    "TransportClosed",
    "Unauthorized",
]


class TidingsError(Exception):
    status_hint: int = 500

    def __init_subclass__(cls, *, status_hint: int | None = None) -> None:
        super().__init_subclass__()
        if status_hint is not None:
            cls.status_hint = status_hint

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(TidingsError, status_hint=400):
    """Malformed input: selectors, ids, retry, form fields."""


class SSEProtocolError(BadRequest):
    """A stream the SSE parser cannot accept."""


class Unauthorized(TidingsError, status_hint=401):
    """A malformed, expired or wrongly signed JWT."""


class TokenMissing(Unauthorized):
    """No token was presented where one is needed (no `error=` in the challenge)."""


class Forbidden(TidingsError, status_hint=403):
    """A valid JWT whose claims do not cover the request."""


class NotFound(TidingsError, status_hint=404):
    """No such resource."""


class PayloadTooLarge(TidingsError, status_hint=413):
    """A body or a field over its limit."""


class RetryLater(TidingsError):
    """An error the client may retry after `retry_after_s` seconds (a `Retry-After`)."""

    def __init__(self, message: str, retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ServiceUnavailable(RetryLater, status_hint=503):
    """Too many connections, or a transport or database that is down."""


class InsufficientStorage(ServiceUnavailable, status_hint=507):
    """Nothing could be stored because the disk is full (WebDAV's 507): unavailable, as
    a 503 is, until someone frees space, so it carries a Retry-After too."""


class TransportClosed(ServiceUnavailable):
    """A call after `Transport.close()`."""
