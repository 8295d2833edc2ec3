"""The chat's values and rules: names, conversations, topics, messages. Pure, no I/O.

Topics (every chat update is a private Mercure update):

    /chat/rooms/{room}            messages, edits, deletions, typing, presence, members
    /chat/rooms                   rooms created
    /chat/presence                who is online at all
    /chat/dm/{a}/{b}              a direct conversation, usernames sorted
    /users/{username}/notifications   toasts: mentions, notifications, read markers
    /tasks/{username}.{key}       a long task's progress

A session token's subscribe claim (`subscribe_selectors`) names exactly what its user may
read: every room (rooms are public to anyone signed in), its own direct conversations, its
own notifications and tasks. Task ids start with the owner's name and a dot, a character
usernames cannot contain, so `/tasks/alice.{id}` never matches a task of `alice2`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

from tidings.chat.errors import InvalidInput

__all__ = [
    "ASSISTANT",
    "MAX_MESSAGE_LENGTH",
    "MAX_PASSWORD_LENGTH",
    "MIN_PASSWORD_LENGTH",
    "PRESENCE_TOPIC",
    "ROOMS_TOPIC",
    "Conversation",
    "Message",
    "Reply",
    "check_content",
    "check_password",
    "check_room_name",
    "check_username",
    "is_shared_db",
    "mentions",
    "notifications_topic",
    "now_iso",
    "subscribe_selectors",
    "task_topic",
]

MAX_MESSAGE_LENGTH = 4000
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024
ROOMS_TOPIC = "/chat/rooms"
PRESENCE_TOPIC = "/chat/presence"
# The sender of the assistant's replies (a reserved username: nobody can sign up as it).
ASSISTANT = "assistant"

_USERNAME = re.compile(r"[a-z0-9_]{2,32}")
_ROOM = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_MENTION = re.compile(r"(?<![A-Za-z0-9_])@([A-Za-z0-9_]{2,32})(?![A-Za-z0-9_])")


def is_shared_db(db_url: str) -> bool:
    """Whether the chat's tables at `db_url` (`--db`) can be shared by several processes
    (PostgreSQL), so that the chat runs on several workers and machines."""
    return db_url.startswith(("postgresql://", "postgres://"))


def now_iso() -> str:
    """ISO 8601 UTC with milliseconds, as the change feed writes `wallTime`."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _string(value: object, field: str) -> str:
    """`value`, which must be a string (it comes from a JSON body)."""
    if not isinstance(value, str):
        raise InvalidInput(field, f"{field} must be a string")
    return value


def _name(value: object, field: str, pattern: re.Pattern[str], rule: str) -> str:
    """`value` stripped and case-folded, which `pattern` must match whole (else `rule`)."""
    name = _string(value, field).strip().lower()
    if not pattern.fullmatch(name):
        raise InvalidInput(field, rule)
    return name


def check_username(value: object) -> str:
    """A username: 2 to 32 of a-z, 0-9 and _, case-folded (`Alice` signs up as `alice`)."""
    return _name(value, "username", _USERNAME,
                 "a username is 2 to 32 letters, digits or _ (case does not matter)")


def check_password(value: object) -> str:
    value = _string(value, "password")
    if not MIN_PASSWORD_LENGTH <= len(value) <= MAX_PASSWORD_LENGTH:
        raise InvalidInput(
            "password",
            f"a password has {MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} characters")
    return value


def check_room_name(value: object) -> str:
    """A room name: 1 to 32 of a-z, 0-9, _ and -, starting with a letter or digit."""
    return _name(value, "name", _ROOM,
                 "a room name is 1 to 32 letters, digits, _ or - (not first)")


def check_content(value: object) -> str:
    """A message's text: not blank, at most MAX_MESSAGE_LENGTH characters. Kept as sent
    (the page shows it with textContent, so no escaping is stored)."""
    value = _string(value, "content")
    if not value.strip():
        raise InvalidInput("content", "a message cannot be empty")
    if len(value) > MAX_MESSAGE_LENGTH:
        raise InvalidInput("content",
                           f"a message is at most {MAX_MESSAGE_LENGTH} characters")
    if "\0" in value:
        raise InvalidInput("content", "a message cannot contain NUL characters")
    return value


def mentions(content: str) -> list[str]:
    """The usernames `@mentioned` in a message, case-folded, each once, in order."""
    seen: dict[str, None] = {}
    for match in _MENTION.finditer(content):
        seen.setdefault(match.group(1).lower(), None)
    return list(seen)


def notifications_topic(username: str) -> str:
    return f"/users/{username}/notifications"


def task_topic(task_id: str) -> str:
    return f"/tasks/{task_id}"


def subscribe_selectors(username: str) -> list[str]:
    """The subscribe claim of a user's session token: what it may read."""
    return [
        ROOMS_TOPIC,
        "/chat/rooms/{room}",
        PRESENCE_TOPIC,
        f"/chat/dm/{username}/{{other}}",
        f"/chat/dm/{{other}}/{username}",
        notifications_topic(username),
        f"/tasks/{username}.{{id}}",
    ]


@dataclass(frozen=True, slots=True)
class Conversation:
    """A room, or the direct conversation of two users (sorted; one user may write to
    themself)."""

    room: str | None = None
    dm: tuple[str, str] | None = None

    @classmethod
    def of_room(cls, name: str) -> Conversation:
        return cls(room=name)

    @classmethod
    def between(cls, a: str, b: str) -> Conversation:
        first, second = sorted((a, b))
        return cls(dm=(first, second))

    @classmethod
    def from_key(cls, key: str) -> Conversation:
        kind, _, rest = key.partition(":")
        if kind == "room":
            return cls.of_room(rest)
        a, _, b = rest.partition(":")
        return cls.between(a, b)

    @property
    def key(self) -> str:
        """How the store names it: `room:NAME` or `dm:A:B`."""
        if self.dm is not None:
            return f"dm:{self.dm[0]}:{self.dm[1]}"
        return f"room:{self.room}"

    @property
    def topic(self) -> str:
        if self.dm is not None:
            return f"/chat/dm/{self.dm[0]}/{self.dm[1]}"
        return f"/chat/rooms/{self.room}"

    def other(self, username: str) -> str | None:
        """In a direct conversation, the user who is not `username`."""
        if self.dm is None:
            return None
        return self.dm[1] if self.dm[0] == username else self.dm[0]

    def includes(self, username: str) -> bool:
        return self.dm is None or username in self.dm

    def fields(self) -> dict[str, object]:
        """The fields that name it in JSON: `room` and `dm` (one of them null)."""
        return {"room": self.room, "dm": None if self.dm is None else list(self.dm)}


@dataclass(frozen=True, slots=True)
class Reply:
    """What makes a message an assistant's reply: who asked (in answer to which message),
    and where it stands: `streaming`, then `completed`, `cancelled` or `failed` (with a
    `note` saying why), or `unavailable` (no assistant configured)."""

    asker: str
    reply_to: int | None
    state: str
    note: str | None = None

    def to_json(self) -> dict[str, object]:
        return {"asker": self.asker, "reply_to": self.reply_to, "state": self.state,
                "note": self.note}


@dataclass(frozen=True, slots=True)
class Message:
    id: int
    conversation: Conversation
    sender: str
    content: str
    created_at: str
    edited_at: str | None = None
    reply: Reply | None = None

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "id": self.id,
            **self.conversation.fields(),
            "sender": self.sender,
            "content": self.content,
            "created_at": self.created_at,
            "edited_at": self.edited_at,
        }
        if self.reply is not None:
            out["assistant"] = self.reply.to_json()
        return out
