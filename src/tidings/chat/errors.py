"""The chat's errors, in the tree of `tidings.errors`; each carries its HTTP status.

    BadRequest          400  InvalidJSON (a body that is not a JSON object)
    Unauthorized        401  NoSession (no valid session), BadCredentials (login refused)
    Forbidden           403  NotAllowed (someone else's message, not a member)
    NotFound            404  UnknownRoom, UnknownUser, UnknownMessage, UnknownTask
    TidingsError        409  Taken (a username or room name in use)
    TidingsError        422  InvalidInput (with the field at fault)
    RetryLater          429  RateLimited (with the seconds to wait)
    ServiceUnavailable  503  ChatUnavailable (no key the chat can sign sessions with)
"""

from __future__ import annotations

from tidings.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    RetryLater,
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

    @classmethod
    def ended(cls) -> NoSession:
        return cls("the session has ended: sign in again")


class BadCredentials(Unauthorized):
    """Login refused. The message never says whether the username or the password was
    wrong."""


class NotAllowed(Forbidden):
    """Someone else's message, or a conversation one is not a member of."""


class UnknownRoom(NotFound):
    """No room of that name."""


class UnknownUser(NotFound):
    """No user of that name."""


class UnknownMessage(NotFound):
    """No message of that id (in that conversation)."""


class UnknownTask(NotFound):
    """No export task of that id for this user."""


class Taken(TidingsError, status_hint=409):
    """A username or room name that exists already."""


class InvalidInput(TidingsError, status_hint=422):
    """A field that does not satisfy its rule (empty message, bad username, ...)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class RateLimited(RetryLater, status_hint=429):
    """Too many messages or sign-in attempts; `retry_after_s` says when to try again."""

    @classmethod
    def messages(cls, limit: int, window_s: float, wait_s: int) -> RateLimited:
        return cls(f"at most {limit} messages in {window_s:g} s; wait {wait_s} s", wait_s)


class ChatUnavailable(ServiceUnavailable):
    """No key the chat can sign sessions with."""
