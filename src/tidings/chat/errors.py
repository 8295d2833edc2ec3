"""The chat's errors, in the tree of `tidings.errors`; each carries its HTTP status.

    BadRequest          400  InvalidJSON (a body that is not a JSON object)
    Unauthorized        401  NoSession (no valid session), BadCredentials (login refused)
    Forbidden           403  NotAllowed (someone else's message, not a member)
    NotFound            404  UnknownRoom, UnknownUser, UnknownMessage, UnknownTask
    TidingsError        409  Taken (a username or room name in use)
    TidingsError        422  InvalidInput (with the field at fault)
    TidingsError        429  RateLimited (with the seconds to wait)
    ServiceUnavailable  503  ChatUnavailable (no key the chat can sign sessions with)
"""

from __future__ import annotations

from tidings.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    ServiceUnavailable,
    TidingsError,
    TokenMissing,
    Unauthorized,
)

__all__ = [
    "BadCredentials",
    "ChatUnavailable",
    "InvalidInput",
    "InvalidJSON",
    "NoSession",
    "NotAllowed",
    "RateLimited",
    "Taken",
    "UnknownMessage",
    "UnknownRoom",
    "UnknownTask",
    "UnknownUser",
]


class InvalidJSON(BadRequest):
    """The body is not a JSON object."""


class NoSession(TokenMissing):
    """No session cookie, or one that is expired, revoked or not a chat session."""


class BadCredentials(Unauthorized):
    """Login refused. The message never says whether the username or the password was
    wrong."""


class NotAllowed(Forbidden):
    pass


class UnknownRoom(NotFound):
    pass


class UnknownUser(NotFound):
    pass


class UnknownMessage(NotFound):
    pass


class UnknownTask(NotFound):
    pass


class Taken(TidingsError):
    """A username or room name that exists already."""

    status_hint = 409


class InvalidInput(TidingsError):
    """A field that does not satisfy its rule (empty message, bad username, ...)."""

    status_hint = 422

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class RateLimited(TidingsError):
    status_hint = 429

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ChatUnavailable(ServiceUnavailable):
    pass
