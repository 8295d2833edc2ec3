"""The chat's tables in SQLite, and its outbox: every write and its updates, one commit.

A write that others must see (a message, an edit, a join, a task's progress) appends the
updates it causes to `chat_outbox` in the same transaction as the write itself. The relay
(`relay.py`) publishes the outbox in order through the hub. So an update exists if and
only if its write committed: none is lost when the process dies between the commit and
the publish, and none describes a write that rolled back. This is the change feed's
pattern (triggers into a change log, a tailer that saves its cursor after the hub's ack),
with chat-shaped updates on chat topics instead of collection-shaped ones.

All SQL runs on one thread with one connection: writes wait for SQLite's write lock
there, never on the event loop, and the order of the outbox's AUTOINCREMENT `seq` is the
order of commits. The tables live in the `--db` file beside the hub's history (or in
memory with `--db memory://`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import secrets
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from tidings.chat import events
from tidings.chat.errors import (
    NotAllowed,
    Taken,
    UnknownMessage,
    UnknownRoom,
    UnknownTask,
    UnknownUser,
)
from tidings.chat.events import Outgoing
from tidings.chat.model import ASSISTANT, Conversation, Message, Reply, now_iso
from tidings.errors import ServiceUnavailable
from tidings.sqlitedb import connect, run_on
from tidings.sqlitedb import transaction as _transaction

__all__ = ["DEFAULT_ROOM", "ChatStore", "OutboxRow", "TaskRow", "UserRow", "path_of"]

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_ROOM = "general"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS chat_users (
    username      TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    created_at    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS chat_sessions (
    sid        TEXT PRIMARY KEY,
    username   TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS chat_rooms (
    name       TEXT PRIMARY KEY,
    created_by TEXT,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS chat_members (
    room     TEXT NOT NULL,
    username TEXT NOT NULL,
    PRIMARY KEY (room, username)
);
CREATE TABLE IF NOT EXISTS chat_dms (
    conv TEXT PRIMARY KEY,
    a    TEXT NOT NULL,
    b    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS chat_dms_a ON chat_dms (a);
CREATE INDEX IF NOT EXISTS chat_dms_b ON chat_dms (b);
CREATE TABLE IF NOT EXISTS chat_messages (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    conv       TEXT NOT NULL,
    sender     TEXT NOT NULL,
    content    TEXT NOT NULL,
    created_at TEXT NOT NULL,
    edited_at  TEXT
);
CREATE INDEX IF NOT EXISTS chat_messages_conv ON chat_messages (conv, id);
CREATE TABLE IF NOT EXISTS chat_reads (
    username  TEXT NOT NULL,
    conv      TEXT NOT NULL,
    last_read INTEGER NOT NULL,
    PRIMARY KEY (username, conv)
);
CREATE TABLE IF NOT EXISTS chat_tasks (
    id         TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    room       TEXT NOT NULL,
    format     TEXT NOT NULL,
    state      TEXT NOT NULL,
    percent    INTEGER NOT NULL DEFAULT 0,
    step       TEXT NOT NULL DEFAULT '',
    result     BLOB,
    error      TEXT,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS chat_replies (
    id       INTEGER PRIMARY KEY,
    asker    TEXT NOT NULL,
    reply_to INTEGER,
    state    TEXT NOT NULL,
    note     TEXT
);
CREATE TABLE IF NOT EXISTS chat_outbox (
    seq   INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    data  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS chat_state (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""
_MESSAGE_COLUMNS = "id, conv, sender, content, created_at, edited_at"


def path_of(db_url: str) -> str:
    """The SQLite file of `--db`, or `:memory:` for anything else (memory://)."""
    if db_url.startswith("sqlite:"):
        path = db_url.split("sqlite:///", 1)[-1]
        if path and path != ":memory:":
            return path
    return ":memory:"


@dataclass(frozen=True, slots=True)
class UserRow:
    username: str
    password_hash: str
    created_at: str


@dataclass(frozen=True, slots=True)
class OutboxRow:
    seq: int
    topic: str
    data: str


@dataclass(frozen=True, slots=True)
class TaskRow:
    id: str
    owner: str
    room: str
    format: str
    state: str
    percent: int
    step: str
    error: str | None
    created_at: str
    has_result: bool

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "task": self.id, "room": self.room, "format": self.format, "state": self.state,
            "percent": self.percent, "step": self.step, "created_at": self.created_at,
            "topic": f"/tasks/{self.id}",
        }
        if self.error:
            out["error"] = self.error
        if self.has_result:
            out["download"] = f"/api/tasks/{self.id}/download"
        return out


def _emit(db: sqlite3.Connection, out: Outgoing) -> None:
    db.execute("INSERT INTO chat_outbox (topic, data) VALUES (?, ?)", (out.topic, out.data))


def _message(row: tuple[Any, ...]) -> Message:
    id_, conv, sender, content, created_at, edited_at = row
    return Message(int(id_), Conversation.from_key(str(conv)), str(sender), str(content),
                   str(created_at), None if edited_at is None else str(edited_at))


class ChatStore:
    def __init__(self, db_url: str, on_write: Callable[[], None] | None = None) -> None:
        self.path = path_of(db_url)
        self._on_write = on_write
        self._db: sqlite3.Connection | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.epoch = ""

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="tidings-chat")
        self.epoch = await self._call(self._open)

    def _open(self) -> str:
        db = connect(self.path)
        self._db = db
        with _transaction(db):
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute("INSERT OR IGNORE INTO chat_state VALUES ('epoch', ?)",
                       (secrets.token_hex(4),))
            db.execute("INSERT OR IGNORE INTO chat_state VALUES ('cursor', '0')")
            # The room everyone starts in (no update: nobody can be listening yet).
            db.execute("INSERT OR IGNORE INTO chat_rooms VALUES (?, NULL, ?)",
                       (DEFAULT_ROOM, now_iso()))
        return str(db.execute("SELECT value FROM chat_state WHERE name = 'epoch'")
                   .fetchone()[0])

    async def stop(self) -> None:
        if self._executor is None:
            return
        with contextlib.suppress(Exception):
            await self._call(self._close)
        self._executor.shutdown(wait=True)
        self._executor = None

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise ServiceUnavailable("the chat's database is not open")
        return self._db

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        return await run_on(self._executor, "the chat", fn, *args)

    async def _write(self, fn: Callable[..., T], *args: object) -> T:
        """Run a write; the relay is woken after it, whether it emitted updates or not."""
        try:
            return await self._call(fn, *args)
        finally:
            if self._on_write is not None:
                self._on_write()

    # -- users and sessions ---------------------------------------------------------------

    async def create_user(self, username: str, password_hash: str) -> UserRow:
        return await self._write(self._create_user, username, password_hash)

    def _create_user(self, username: str, password_hash: str) -> UserRow:
        db = self.db
        now = now_iso()
        with _transaction(db):
            try:
                db.execute("INSERT INTO chat_users VALUES (?, ?, ?)",
                           (username, password_hash, now))
            except sqlite3.IntegrityError:
                raise Taken(f"the username {username!r} is taken") from None
            if self._join(db, DEFAULT_ROOM, username):
                _emit(db, events.member_event("joined", DEFAULT_ROOM, username))
        return UserRow(username, password_hash, now)

    async def user(self, username: str) -> UserRow | None:
        return await self._call(self._user, username)

    def _user(self, username: str) -> UserRow | None:
        row = self.db.execute("SELECT username, password_hash, created_at FROM chat_users "
                              "WHERE username = ?", (username,)).fetchone()
        return None if row is None else UserRow(str(row[0]), str(row[1]), str(row[2]))

    async def users(self) -> list[tuple[str, str]]:
        return await self._call(self._users)

    def _users(self) -> list[tuple[str, str]]:
        return [(str(r[0]), str(r[1])) for r in self.db.execute(
            "SELECT username, created_at FROM chat_users ORDER BY username")]

    async def existing_users(self, names: list[str]) -> set[str]:
        return await self._call(self._existing_users, names)

    def _existing_users(self, names: list[str]) -> set[str]:
        found: set[str] = set()
        for name in names:
            if self.db.execute("SELECT 1 FROM chat_users WHERE username = ?",
                               (name,)).fetchone():
                found.add(name)
        return found

    async def create_session(self, sid: str, username: str, expires_at: float,
                             now: float) -> None:
        await self._write(self._create_session, sid, username, expires_at, now)

    def _create_session(self, sid: str, username: str, expires_at: float, now: float) -> None:
        db = self.db
        with _transaction(db):
            db.execute("DELETE FROM chat_sessions WHERE expires_at < ?", (now,))
            db.execute("INSERT OR REPLACE INTO chat_sessions VALUES (?, ?, ?)",
                       (sid, username, expires_at))

    async def session_valid(self, sid: str, username: str, now: float) -> bool:
        return await self._call(self._session_valid, sid, username, now)

    def _session_valid(self, sid: str, username: str, now: float) -> bool:
        row = self.db.execute("SELECT username, expires_at FROM chat_sessions WHERE sid = ?",
                              (sid,)).fetchone()
        return row is not None and row[0] == username and float(row[1]) > now

    async def extend_session(self, sid: str, expires_at: float) -> None:
        await self._write(self._extend_session, sid, expires_at)

    def _extend_session(self, sid: str, expires_at: float) -> None:
        self.db.execute("UPDATE chat_sessions SET expires_at = ? WHERE sid = ?",
                        (expires_at, sid))

    async def delete_session(self, sid: str) -> None:
        await self._write(self._delete_session, sid)

    def _delete_session(self, sid: str) -> None:
        self.db.execute("DELETE FROM chat_sessions WHERE sid = ?", (sid,))

    # -- rooms ------------------------------------------------------------------------------

    async def room_names(self) -> set[str]:
        return await self._call(self._room_names)

    def _room_names(self) -> set[str]:
        return {str(r[0]) for r in self.db.execute("SELECT name FROM chat_rooms")}

    async def create_room(self, name: str, creator: str) -> dict[str, object]:
        return await self._write(self._create_room, name, creator)

    def _create_room(self, name: str, creator: str) -> dict[str, object]:
        db = self.db
        now = now_iso()
        with _transaction(db):
            try:
                db.execute("INSERT INTO chat_rooms VALUES (?, ?, ?)", (name, creator, now))
            except sqlite3.IntegrityError:
                raise Taken(f"a room named {name!r} exists") from None
            self._join(db, name, creator)
            _emit(db, events.room_created(name, creator, now))
            return self._room_info(db, name, creator)

    def _room_exists(self, db: sqlite3.Connection, name: str) -> None:
        if db.execute("SELECT 1 FROM chat_rooms WHERE name = ?", (name,)).fetchone() is None:
            raise UnknownRoom(f"no room named {name!r}")

    @staticmethod
    def _last_id(db: sqlite3.Connection, conv: str) -> int:
        row = db.execute("SELECT MAX(id) FROM chat_messages WHERE conv = ?",
                         (conv,)).fetchone()
        return int(row[0] or 0)

    @staticmethod
    def _unread(db: sqlite3.Connection, username: str, conv: str) -> int:
        row = db.execute(
            "SELECT COUNT(*) FROM chat_messages WHERE conv = ? AND sender != ? AND id > "
            "COALESCE((SELECT last_read FROM chat_reads WHERE username = ? AND conv = ?), 0)",
            (conv, username, username, conv)).fetchone()
        return int(row[0])

    def _room_info(self, db: sqlite3.Connection, name: str, username: str) -> dict[str, object]:
        row = db.execute("SELECT name, created_by, created_at FROM chat_rooms WHERE name = ?",
                         (name,)).fetchone()
        if row is None:
            raise UnknownRoom(f"no room named {name!r}")
        conv = Conversation.of_room(name).key
        members = int(db.execute("SELECT COUNT(*) FROM chat_members WHERE room = ?",
                                 (name,)).fetchone()[0])
        joined = db.execute("SELECT 1 FROM chat_members WHERE room = ? AND username = ?",
                            (name, username)).fetchone() is not None
        return {
            "name": row[0], "created_by": row[1], "created_at": row[2], "members": members,
            "joined": joined, "unread": self._unread(db, username, conv) if joined else 0,
            "last_id": self._last_id(db, conv), "topic": Conversation.of_room(name).topic,
        }

    async def rooms(self, username: str) -> list[dict[str, object]]:
        return await self._call(self._rooms, username)

    def _rooms(self, username: str) -> list[dict[str, object]]:
        db = self.db
        with _transaction(db, "DEFERRED"):
            names = [str(r[0]) for r in db.execute("SELECT name FROM chat_rooms ORDER BY name")]
            return [self._room_info(db, name, username) for name in names]

    async def room(self, name: str, username: str) -> dict[str, object]:
        return await self._call(self._room, name, username)

    def _room(self, name: str, username: str) -> dict[str, object]:
        db = self.db
        with _transaction(db, "DEFERRED"):
            return self._room_info(db, name, username)

    def _join(self, db: sqlite3.Connection, room: str, username: str) -> bool:
        added = db.execute("INSERT OR IGNORE INTO chat_members VALUES (?, ?)",
                           (room, username)).rowcount
        if added:
            # What was said before joining is history, not unread.
            conv = Conversation.of_room(room).key
            self._set_read(db, username, conv, self._last_id(db, conv))
        return bool(added)

    async def join(self, room: str, username: str) -> dict[str, object]:
        return await self._write(self._join_room, room, username)

    def _join_room(self, room: str, username: str) -> dict[str, object]:
        db = self.db
        with _transaction(db):
            self._room_exists(db, room)
            if self._join(db, room, username):
                _emit(db, events.member_event("joined", room, username))
            return self._room_info(db, room, username)

    async def leave(self, room: str, username: str) -> dict[str, object]:
        return await self._write(self._leave_room, room, username)

    def _leave_room(self, room: str, username: str) -> dict[str, object]:
        db = self.db
        with _transaction(db):
            self._room_exists(db, room)
            if db.execute("DELETE FROM chat_members WHERE room = ? AND username = ?",
                          (room, username)).rowcount:
                _emit(db, events.member_event("left", room, username))
            return self._room_info(db, room, username)

    async def members(self, room: str) -> list[str]:
        return await self._call(self._members, room)

    def _members(self, room: str) -> list[str]:
        return [str(r[0]) for r in self.db.execute(
            "SELECT username FROM chat_members WHERE room = ? ORDER BY username", (room,))]

    # -- direct conversations -----------------------------------------------------------

    async def dms(self, username: str) -> list[dict[str, object]]:
        return await self._call(self._dms, username)

    def _dms(self, username: str) -> list[dict[str, object]]:
        db = self.db
        out = []
        with _transaction(db, "DEFERRED"):
            for conv, a, b in db.execute(
                    "SELECT conv, a, b FROM chat_dms WHERE a = ? OR b = ?",
                    (username, username)).fetchall():
                conversation = Conversation.from_key(str(conv))
                out.append({
                    "user": b if a == username else a, "dm": [a, b],
                    "unread": self._unread(db, username, str(conv)),
                    "last_id": self._last_id(db, str(conv)), "topic": conversation.topic,
                })
        out.sort(key=lambda d: -int(str(d["last_id"])))
        return out

    # -- messages -----------------------------------------------------------------------------

    def _check_writable(self, db: sqlite3.Connection, conv: Conversation, sender: str) -> None:
        if conv.room is not None:
            self._room_exists(db, conv.room)
            if db.execute("SELECT 1 FROM chat_members WHERE room = ? AND username = ?",
                          (conv.room, sender)).fetchone() is None:
                raise NotAllowed(f"join the room {conv.room!r} to write in it")
        else:
            other = conv.other(sender)
            if other is None or db.execute("SELECT 1 FROM chat_users WHERE username = ?",
                                           (other,)).fetchone() is None:
                raise UnknownUser(f"no user named {other!r}")

    async def post(self, conv: Conversation, sender: str, content: str,
                   mentioned: list[str]) -> tuple[Message, list[str]]:
        """Store a message; returns it and who was notified of a mention."""
        return await self._write(self._post, conv, sender, content, mentioned)

    def _post(self, conv: Conversation, sender: str, content: str,
              mentioned: list[str]) -> tuple[Message, list[str]]:
        db = self.db
        now = now_iso()
        with _transaction(db):
            self._check_writable(db, conv, sender)
            if conv.dm is not None:
                db.execute("INSERT OR IGNORE INTO chat_dms VALUES (?, ?, ?)",
                           (conv.key, conv.dm[0], conv.dm[1]))
            cursor = db.execute(
                "INSERT INTO chat_messages (conv, sender, content, created_at) "
                "VALUES (?, ?, ?, ?)", (conv.key, sender, content, now))
            message = Message(int(cursor.lastrowid or 0), conv, sender, content, now)
            _emit(db, events.message_created(message))
            self._set_read(db, sender, conv.key, message.id)  # one's own words are read
            notified: list[str] = []
            if conv.room is not None:  # in a direct conversation the other sees it anyway
                for name in mentioned:
                    if name == sender or db.execute(
                            "SELECT 1 FROM chat_users WHERE username = ?",
                            (name,)).fetchone() is None:
                        continue
                    _emit(db, events.notification(name, {
                        "id": f"mention-{message.id}-{name}", "kind": "mention",
                        "message": f"{sender} mentioned you in #{conv.room}",
                        "from": sender, "room": conv.room, "message_id": message.id,
                        "excerpt": content[:200], "created_at": now,
                    }))
                    notified.append(name)
        return message, notified

    def _own_message(self, db: sqlite3.Connection, message_id: int, username: str,
                     expected: Conversation | None) -> Message:
        row = db.execute(f"SELECT {_MESSAGE_COLUMNS} FROM chat_messages WHERE id = ?",
                         (message_id,)).fetchone()
        if row is None:
            raise UnknownMessage(f"no message {message_id}")
        message = _message(row)
        if expected is not None and message.conversation != expected:
            raise UnknownMessage(f"no message {message_id} here")
        if not message.conversation.includes(username):
            raise UnknownMessage(f"no message {message_id}")
        if message.sender != username:
            raise NotAllowed("only its author can change a message")
        return message

    async def edit(self, message_id: int, username: str, content: str,
                   expected: Conversation | None) -> Message:
        return await self._write(self._edit, message_id, username, content, expected)

    def _edit(self, message_id: int, username: str, content: str,
              expected: Conversation | None) -> Message:
        db = self.db
        with _transaction(db):
            message = self._own_message(db, message_id, username, expected)
            if message.content == content:
                return message
            now = now_iso()
            db.execute("UPDATE chat_messages SET content = ?, edited_at = ? WHERE id = ?",
                       (content, now, message_id))
            edited = Message(message.id, message.conversation, message.sender, content,
                             message.created_at, now)
            _emit(db, events.message_updated(edited))
            return edited

    async def delete(self, message_id: int, username: str,
                     expected: Conversation | None) -> Message:
        return await self._write(self._delete, message_id, username, expected)

    def _delete(self, message_id: int, username: str, expected: Conversation | None) -> Message:
        db = self.db
        with _transaction(db):
            message = self._own_message(db, message_id, username, expected)
            db.execute("DELETE FROM chat_messages WHERE id = ?", (message_id,))
            _emit(db, events.message_deleted(message.id, message.conversation))
            return message

    async def history(self, conv: Conversation, before: int | None,
                      limit: int) -> list[Message]:
        """Newest first: the `limit` messages before id `before` (or the newest)."""
        return await self._call(self._history, conv, before, limit)

    def _history(self, conv: Conversation, before: int | None, limit: int) -> list[Message]:
        if conv.room is not None:
            self._room_exists(self.db, conv.room)
        rows = self.db.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM chat_messages WHERE conv = ? AND id < ? "
            f"ORDER BY id DESC LIMIT ?",
            (conv.key, before if before is not None else 2**62, limit)).fetchall()
        return self._with_replies(self.db, [_message(row) for row in rows])

    @staticmethod
    def _with_replies(db: sqlite3.Connection, messages: list[Message]) -> list[Message]:
        """The assistant's messages with their reply state."""
        ids = [m.id for m in messages if m.sender == ASSISTANT]
        if not ids:
            return messages
        replies = {int(r[0]): Reply(str(r[1]), None if r[2] is None else int(r[2]), str(r[3]),
                                    None if r[4] is None else str(r[4]))
                   for r in db.execute(
                       "SELECT id, asker, reply_to, state, note FROM chat_replies WHERE id IN "
                       f"({','.join('?' * len(ids))})", ids)}
        return [dataclasses.replace(m, reply=replies.get(m.id)) if m.id in replies else m
                for m in messages]

    async def message(self, message_id: int) -> Message:
        return await self._call(self._message_by_id, message_id)

    def _message_by_id(self, message_id: int) -> Message:
        row = self.db.execute(f"SELECT {_MESSAGE_COLUMNS} FROM chat_messages WHERE id = ?",
                              (message_id,)).fetchone()
        if row is None:
            raise UnknownMessage(f"no message {message_id}")
        return self._with_replies(self.db, [_message(row)])[0]

    # -- the assistant's replies -------------------------------------------------------------

    async def start_reply(self, conv: Conversation, asker: str, reply_to: int | None,
                          content: str = "", state: str = "streaming",
                          note: str | None = None) -> Message:
        """Store a reply from the assistant (empty while it streams) and its
        `message.created`."""
        return await self._write(self._start_reply, conv, asker, reply_to, content, state,
                                 note)

    def _start_reply(self, conv: Conversation, asker: str, reply_to: int | None, content: str,
                     state: str, note: str | None) -> Message:
        db = self.db
        now = now_iso()
        with _transaction(db):
            if conv.room is not None:
                self._room_exists(db, conv.room)
            cursor = db.execute(
                "INSERT INTO chat_messages (conv, sender, content, created_at) "
                "VALUES (?, ?, ?, ?)", (conv.key, ASSISTANT, content, now))
            reply = Reply(asker, reply_to, state, note)
            message = Message(int(cursor.lastrowid or 0), conv, ASSISTANT, content, now,
                              reply=reply)
            db.execute("INSERT INTO chat_replies VALUES (?, ?, ?, ?, ?)",
                       (message.id, asker, reply_to, state, note))
            _emit(db, events.message_created(message))
        return message

    async def append_reply(self, message_id: int, conv: Conversation, offset: int,
                           text: str) -> None:
        """Append to a streaming reply, with its `message.delta`, in one commit."""
        await self._write(self._append_reply, message_id, conv, offset, text)

    def _append_reply(self, message_id: int, conv: Conversation, offset: int,
                      text: str) -> None:
        db = self.db
        with _transaction(db):
            db.execute("UPDATE chat_messages SET content = content || ? WHERE id = ?",
                       (text, message_id))
            _emit(db, events.message_delta(message_id, conv, offset, text))

    async def finish_reply(self, message_id: int, state: str, note: str | None) -> Message:
        """End a streaming reply (with its `message.completed`). A reply that has ended
        already stays as it is: the first end wins."""
        return await self._write(self._finish_reply, message_id, state, note)

    def _finish_reply(self, message_id: int, state: str, note: str | None) -> Message:
        db = self.db
        with _transaction(db):
            changed = db.execute(
                "UPDATE chat_replies SET state = ?, note = ? WHERE id = ? AND "
                "state = 'streaming'", (state, note, message_id)).rowcount
            message = self._message_by_id(message_id)
            if changed:
                _emit(db, events.message_completed(message))
        return message

    async def streaming_replies(self) -> list[int]:
        return await self._call(self._streaming_replies)

    def _streaming_replies(self) -> list[int]:
        return [int(r[0]) for r in self.db.execute(
            "SELECT id FROM chat_replies WHERE state = 'streaming' ORDER BY id")]

    async def messages_after(self, conv: Conversation, after: int,
                             limit: int) -> list[Message]:
        """Oldest first (exports)."""
        return await self._call(self._messages_after, conv, after, limit)

    def _messages_after(self, conv: Conversation, after: int, limit: int) -> list[Message]:
        rows = self.db.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM chat_messages WHERE conv = ? AND id > ? "
            f"ORDER BY id LIMIT ?", (conv.key, after, limit)).fetchall()
        return [_message(row) for row in rows]

    async def count(self, conv: Conversation) -> int:
        return await self._call(self._count, conv)

    def _count(self, conv: Conversation) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM chat_messages WHERE conv = ?",
                                   (conv.key,)).fetchone()[0])

    # -- read markers -----------------------------------------------------------------------

    @staticmethod
    def _set_read(db: sqlite3.Connection, username: str, conv: str, last_read: int) -> bool:
        return bool(db.execute(
            "INSERT INTO chat_reads VALUES (?, ?, ?) ON CONFLICT (username, conv) DO UPDATE "
            "SET last_read = excluded.last_read WHERE excluded.last_read > last_read",
            (username, conv, last_read)).rowcount)

    async def mark_read(self, username: str, conv: Conversation, up_to: int | None) -> int:
        return await self._write(self._mark_read, username, conv, up_to)

    def _mark_read(self, username: str, conv: Conversation, up_to: int | None) -> int:
        db = self.db
        with _transaction(db):
            if conv.room is not None:
                self._room_exists(db, conv.room)
            last = self._last_id(db, conv.key)
            target = last if up_to is None else min(up_to, last)
            if self._set_read(db, username, conv.key, target):
                # Every window of this user clears its unread count.
                _emit(db, events.read_marker(username, conv, target))
            row = db.execute("SELECT last_read FROM chat_reads WHERE username = ? AND conv = ?",
                             (username, conv.key)).fetchone()
            return int(row[0]) if row else 0

    # -- notifications ------------------------------------------------------------------------

    async def notify(self, user: str, fields: dict[str, object]) -> None:
        await self._write(self._notify, user, fields)

    def _notify(self, user: str, fields: dict[str, object]) -> None:
        db = self.db
        with _transaction(db):
            if db.execute("SELECT 1 FROM chat_users WHERE username = ?",
                          (user,)).fetchone() is None:
                raise UnknownUser(f"no user named {user!r}")
            _emit(db, events.notification(user, fields))

    # -- tasks --------------------------------------------------------------------------------

    async def create_task(self, task_id: str, owner: str, room: str, fmt: str) -> TaskRow:
        return await self._write(self._create_task, task_id, owner, room, fmt)

    def _create_task(self, task_id: str, owner: str, room: str, fmt: str) -> TaskRow:
        db = self.db
        with _transaction(db):
            self._room_exists(db, room)
            db.execute("INSERT INTO chat_tasks (id, owner, room, format, state, percent, "
                       "step, created_at) VALUES (?, ?, ?, ?, 'queued', 0, 'queued', ?)",
                       (task_id, owner, room, fmt, now_iso()))
            _emit(db, events.task_event("progress", task_id, {
                "state": "queued", "percent": 0, "step": "queued"}))
            return self._task_row(db, task_id)

    def _task_row(self, db: sqlite3.Connection, task_id: str) -> TaskRow:
        row = db.execute(
            "SELECT id, owner, room, format, state, percent, step, error, created_at, "
            "result IS NOT NULL FROM chat_tasks WHERE id = ?", (task_id,)).fetchone()
        if row is None:
            raise UnknownTask(f"no task {task_id!r}")
        return TaskRow(str(row[0]), str(row[1]), str(row[2]), str(row[3]), str(row[4]),
                       int(row[5]), str(row[6]), None if row[7] is None else str(row[7]),
                       str(row[8]), bool(row[9]))

    async def task(self, task_id: str) -> TaskRow:
        return await self._call(self._task, task_id)

    def _task(self, task_id: str) -> TaskRow:
        return self._task_row(self.db, task_id)

    async def task_result(self, task_id: str) -> bytes:
        return await self._call(self._task_result, task_id)

    def _task_result(self, task_id: str) -> bytes:
        row = self.db.execute("SELECT result FROM chat_tasks WHERE id = ?",
                              (task_id,)).fetchone()
        if row is None or row[0] is None:
            raise UnknownTask(f"task {task_id!r} has no result")
        return bytes(row[0])

    async def unfinished_tasks(self) -> list[str]:
        return await self._call(self._unfinished_tasks)

    def _unfinished_tasks(self) -> list[str]:
        return [str(r[0]) for r in self.db.execute(
            "SELECT id FROM chat_tasks WHERE state IN ('queued', 'running') ORDER BY rowid")]

    async def task_progress(self, task_id: str, state: str, percent: int, step: str,
                            *, result: bytes | None = None, error: str | None = None) -> None:
        await self._write(self._task_progress, task_id, state, percent, step, result, error)

    def _task_progress(self, task_id: str, state: str, percent: int, step: str,
                       result: bytes | None, error: str | None) -> None:
        db = self.db
        with _transaction(db):
            db.execute("UPDATE chat_tasks SET state = ?, percent = ?, step = ?, "
                       "result = COALESCE(?, result), error = ? WHERE id = ?",
                       (state, percent, step, result, error, task_id))
            fields: dict[str, object] = {"state": state, "percent": percent, "step": step}
            kind = "progress"
            if state == "completed":
                kind = "completed"
                fields["download"] = f"/api/tasks/{task_id}/download"
            elif state == "failed":
                kind = "failed"
                fields["error"] = error or "failed"
            _emit(db, events.task_event(kind, task_id, fields))

    # -- the outbox -----------------------------------------------------------------------------

    async def cursor(self) -> int:
        return await self._call(self._cursor)

    def _cursor(self) -> int:
        return int(self.db.execute("SELECT value FROM chat_state WHERE name = 'cursor'")
                   .fetchone()[0])

    async def outbox_after(self, seq: int, limit: int) -> list[OutboxRow]:
        return await self._call(self._outbox_after, seq, limit)

    def _outbox_after(self, seq: int, limit: int) -> list[OutboxRow]:
        return [OutboxRow(int(r[0]), str(r[1]), str(r[2])) for r in self.db.execute(
            "SELECT seq, topic, data FROM chat_outbox WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, limit))]

    async def outbox_done(self, seq: int) -> None:
        """Everything through `seq` is in the hub's history: drop it and save the cursor."""
        await self._call(self._outbox_done, seq)

    def _outbox_done(self, seq: int) -> None:
        db = self.db
        with _transaction(db):
            db.execute("DELETE FROM chat_outbox WHERE seq <= ?", (seq,))
            db.execute("UPDATE chat_state SET value = ? WHERE name = 'cursor'", (str(seq),))
