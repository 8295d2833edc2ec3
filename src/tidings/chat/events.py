"""The chat's live updates: pure functions from domain values to (topic, JSON data).

Every update is a JSON object with a `type`:

    message.created / message.updated   {"type", "message": {id, room, dm, sender, ...}}
    message.deleted                     {"type", "message": {id, room, dm}}
    message.delta                       {"type", "message": {id, room, dm}, "offset", "text"}
    message.completed                   {"type", "message": {id, ..., "assistant": {...}}}
    member.joined / member.left         {"type", "room", "user"}
    room.created                        {"type", "room": {name, created_by, created_at}}
    typing                              {"type", "room", "dm", "user", "at"}     (ephemeral)
    presence                            {"type", "room", "online": [...]}   (room topic)
                                        {"type", "room": null, "online": [...]}  (global)
    notification                        {"type", "id", "kind", "message", "from", ...}
    read                                {"type", "room", "dm", "last_read"}
    task.progress / task.completed / task.failed
                                        {"type", "task", "percent", "step", ...}

The SSE `event:` field is left unset, so a plain `EventSource.onmessage` sees all of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tidings.chat.model import (
    PRESENCE_TOPIC,
    ROOMS_TOPIC,
    Conversation,
    Message,
    notifications_topic,
    task_topic,
)

__all__ = [
    "Outgoing",
    "member_event",
    "message_completed",
    "message_created",
    "message_created_around_id",
    "message_deleted",
    "message_delta",
    "message_updated",
    "notification",
    "presence",
    "read_marker",
    "room_created",
    "task_event",
    "typing",
]


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One update to publish: its topic and its JSON text (always private)."""

    topic: str
    data: str


def _out(topic: str, data: dict[str, object]) -> Outgoing:
    return Outgoing(topic, json.dumps(data, ensure_ascii=False, separators=(",", ":")))


def message_created(message: Message) -> Outgoing:
    return _out(message.conversation.topic,
                {"type": "message.created", "message": message.to_json()})


def message_created_around_id(conversation: Conversation, sender: str, content: str,
                              created_at: str) -> tuple[str, str]:
    """`message_created`'s JSON text before and after the message's id, for a database
    that numbers the message as it writes the update (PostgreSQL's `chat_post`)."""
    data = message_created(Message(0, conversation, sender, content, created_at)).data
    # The message's id is the first key of the first object after the fixed "type".
    head, mark, tail = data.partition('"id":0,')
    if not mark:
        raise AssertionError(f"no id in {data!r}")
    return head + '"id":', "," + tail


def message_updated(message: Message) -> Outgoing:
    return _out(message.conversation.topic,
                {"type": "message.updated", "message": message.to_json()})


def message_delta(message_id: int, conversation: Conversation, offset: int,
                  text: str) -> Outgoing:
    """More text of a streaming reply: `text` goes at `offset` (in Unicode code points)
    of its content. A reader that has more than `offset` already keeps only the rest, so
    a delta seen twice (a snapshot and the stream, a replay) changes nothing."""
    return _out(conversation.topic, {
        "type": "message.delta",
        "message": {"id": message_id, **conversation.fields()},
        "offset": offset,
        "text": text,
    })


def message_completed(message: Message) -> Outgoing:
    """A streaming reply has ended (completed, cancelled or failed): the whole message."""
    return _out(message.conversation.topic,
                {"type": "message.completed", "message": message.to_json()})


def message_deleted(message_id: int, conversation: Conversation) -> Outgoing:
    return _out(conversation.topic, {
        "type": "message.deleted",
        "message": {"id": message_id, **conversation.fields()},
    })


def member_event(kind: str, room: str, user: str) -> Outgoing:
    return _out(Conversation.of_room(room).topic,
                {"type": f"member.{kind}", "room": room, "user": user})


def room_created(name: str, created_by: str | None, created_at: str) -> Outgoing:
    return _out(ROOMS_TOPIC, {
        "type": "room.created",
        "room": {"name": name, "created_by": created_by, "created_at": created_at},
    })


def typing(conversation: Conversation, user: str, at_ms: int) -> Outgoing:
    return _out(conversation.topic,
                {"type": "typing", **conversation.fields(), "user": user, "at": at_ms})


def presence(room: str | None, online: list[str]) -> Outgoing:
    topic = PRESENCE_TOPIC if room is None else Conversation.of_room(room).topic
    return _out(topic, {"type": "presence", "room": room, "online": online})


def notification(user: str, fields: dict[str, object]) -> Outgoing:
    return _out(notifications_topic(user), {"type": "notification", **fields})


def read_marker(user: str, conversation: Conversation, last_read: int) -> Outgoing:
    return _out(notifications_topic(user),
                {"type": "read", **conversation.fields(), "last_read": last_read})


def task_event(kind: str, task_id: str, fields: dict[str, object]) -> Outgoing:
    return _out(task_topic(task_id), {"type": f"task.{kind}", "task": task_id, **fields})
