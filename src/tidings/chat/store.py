"""The chat's store: its tables and its outbox, on SQLite or PostgreSQL (`--db`).

A write that others must see (a message, an edit, a join, a task's progress) appends the
updates it causes to `chat_outbox` in the same transaction as the write itself. The relay
(`relay.py`) publishes the outbox in order through the hub. So an update exists if and
only if its write committed: none is lost when the process dies between the commit and
the publish, and none describes a write that rolled back. This is the change feed's
pattern (a log written with the change, a tailer that saves its cursor after the hub's
ack), with chat-shaped updates on chat topics instead of collection-shaped ones.

`ChatStore` holds every operation once, as SQL steps (`sql.py`); a `ChatDatabase` runs
them: `sqlite_store.SQLiteDatabase` (one connection on one thread; `sqlite:///FILE` or
`memory://`) or `pg_store.PostgresDatabase` (`postgresql://`, shared by any number of
processes). Either keeps the outbox's seq in commit order, which is what makes a history
read's outbox position exact (`history`). `open_database` picks one by the URL's scheme.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

from tidings.chat import events
from tidings.chat.batching import Batcher
from tidings.chat.errors import (
    NoSession,
    NotAllowed,
    RateLimited,
    Taken,
    UnknownMessage,
    UnknownRoom,
    UnknownTask,
    UnknownUser,
)
from tidings.chat.model import ASSISTANT, Conversation, Message, Reply, now_iso
from tidings.chat.sql import Kind, Op, count, pg_only, rows
from tidings.errors import ServiceUnavailable, TidingsError

__all__ = ["DEFAULT_ROOM", "ChatDatabase", "ChatStore", "OutboxRow", "TaskRow", "UserRow",
           "open_database"]

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_ROOM = "general"

_MESSAGE_COLUMNS = "id, conv, sender, content, created_at, edited_at"


def _refused(status: str, conv: Conversation, sender: str) -> TidingsError:
    """Why a post may not be written, by `chat_post`'s name for it (`_check_writable`
    makes the same checks statement by statement)."""
    if status == "no room":
        return UnknownRoom(f"no room named {conv.room!r}")
    if status == "not a member":
        return NotAllowed(f"join the room {conv.room!r} to write in it")
    return UnknownUser(f"no user named {conv.other(sender)!r}")


class ChatDatabase(Protocol):
    """Where the chat's tables live, and how its operations run there."""

    epoch: str  # random, made with the tables: the relay's update ids carry it
    ephemeral: bool  # kept in memory only (lost at a restart)
    # How often a process that does not relay rereads the relay's saved cursor while a
    # history read waits for its position to be published.
    standby_poll_s: float
    calls: bool  # it runs operations of `Kind` "call" (PostgreSQL's functions)

    @property
    def emit_args(self) -> tuple[object, ...]:
        """What `chat_emit` takes before the updates (where `calls`)."""
        ...

    async def open(self) -> None:
        """Connect, apply the migrations this database lacks (`migrations.py`), and read
        the epoch."""
        ...

    async def close(self) -> None: ...

    async def run(self, kind: Kind, op: Op[T]) -> T:
        """Run `op` in one transaction of `kind`; the updates it emits go to the outbox at
        its end, in order, in the same commit."""
        ...

    def lead(self, wake: asyncio.Event) -> AbstractAsyncContextManager[None]:
        """Become the one relay of this outbox (waiting while another process is) for as
        long as the context lasts; sets `wake` when another process wrote (or the lead
        was lost: the next read then fails)."""
        ...

    async def run_leading(self, op: Op[T], kind: Kind = "write") -> T:
        """Run `op` (the relay's read or save) as the relay, in one transaction: fails
        once this process may have stopped being the relay."""
        ...

    async def wait(self, wake: asyncio.Event, found: bool) -> None:
        """The relay's wait for more: return at once when `wake` is set, or when the last
        read `found` rows and more may come."""
        ...


def open_database(db_url: str) -> ChatDatabase:
    """The chat's database for `--db`: PostgreSQL for `postgresql://`, else SQLite (the
    file of `sqlite:///FILE`, or memory)."""
    scheme = db_url.split("://", 1)[0]
    if scheme in ("postgresql", "postgres"):
        from tidings.chat.pg_store import PostgresDatabase

        return PostgresDatabase(db_url)
    from tidings.chat.sqlite_store import SQLiteDatabase

    return SQLiteDatabase(db_url)


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


def _int(value: object) -> int:
    return 0 if value is None else int(str(value))


def _opt(value: object) -> str | None:
    return None if value is None else str(value)


def _message(row: tuple[object, ...] | list[object] | object) -> Message:
    id_, conv, sender, content, created_at, edited_at = row  # type: ignore[misc]
    return Message(_int(id_), Conversation.from_key(str(conv)), str(sender), str(content),
                   str(created_at), _opt(edited_at))


def _exists(sql: str, *args: object) -> Op[bool]:
    return bool((yield rows(sql, *args)).rows)


@dataclass(frozen=True, slots=True)
class _Post:
    """A message to post in one call (`chat_post`): what the call takes, and what its
    answer means."""

    conv: Conversation
    sender: str
    content: str
    created_at: str
    charge: tuple[str, int, float] | None  # the shared rate limit's hit
    session: tuple[str, float] | None  # (sid, now): check the author's session first
    head: str  # the update's JSON before the message's id
    tail: str  # and after it

    @classmethod
    def of(cls, conv: Conversation, sender: str, content: str,
           charge: tuple[str, int, float] | None, session: tuple[str, float] | None,
           ) -> _Post:
        now = now_iso()
        head, tail = events.message_created_around_id(conv, sender, content, now)
        return cls(conv, sender, content, now, charge, session, head, tail)

    @property
    def sid_and_now(self) -> tuple[str, float] | tuple[None, None]:
        return self.session or (None, None)

    @property
    def hit(self) -> tuple[str, int, float] | tuple[None, None, None]:
        return self.charge or (None, None, None)

    def outcome(self, status: str, value: int) -> Message:
        """The message `chat_post` answered for, or the error it means."""
        conv = self.conv
        if status == "no session":
            raise NoSession.ended()
        if status in ("no room", "not a member", "no user"):
            raise _refused(status, conv, self.sender)
        if status == "rate limited" and self.charge is not None:
            raise RateLimited.messages(self.charge[1], self.charge[2], value)
        if status != "posted":
            raise RuntimeError(f"chat_post answered {status!r}")
        return Message(value, conv, self.sender, self.content, self.created_at)


class ChatStore:
    """Every operation of the chat on its tables (see the module doc)."""

    def __init__(self, db_url: str, on_write: Callable[[], None] | None = None) -> None:
        self.database = open_database(db_url)
        self._on_write = on_write
        self._room_posts = Batcher(self._post_in_rooms)

    @property
    def epoch(self) -> str:
        return self.database.epoch

    @property
    def ephemeral(self) -> bool:
        return self.database.ephemeral

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        await self.database.open()
        # The room everyone starts in (no update: nobody can be listening yet).
        await self.database.run("write", self._default_room())

    @staticmethod
    def _default_room() -> Op[None]:
        yield count("INSERT INTO chat_rooms VALUES (?, NULL, ?) ON CONFLICT DO NOTHING",
                    DEFAULT_ROOM, now_iso())

    async def stop(self) -> None:
        await self.database.close()

    async def _read(self, op: Op[T]) -> T:
        return await self.database.run("read", op)

    async def _snapshot(self, op: Op[T]) -> T:
        return await self.database.run("snapshot", op)

    async def _write(self, op: Op[T], kind: Kind = "write") -> T:
        """Run a write; the relay is woken after it, whether it emitted updates or not."""
        try:
            return await self.database.run(kind, op)
        finally:
            if self._on_write is not None:
                self._on_write()

    # -- users and sessions ---------------------------------------------------------------

    async def create_user(self, username: str, password_hash: str) -> UserRow:
        return await self._write(self._create_user(username, password_hash))

    def _create_user(self, username: str, password_hash: str) -> Op[UserRow]:
        now = now_iso()
        added = yield count("INSERT INTO chat_users VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                            username, password_hash, now)
        if not added.count:
            raise Taken(f"the username {username!r} is taken")
        if (yield from self._join(DEFAULT_ROOM, username)):
            yield events.member_event("joined", DEFAULT_ROOM, username)
        return UserRow(username, password_hash, now)

    async def user(self, username: str) -> UserRow | None:
        return await self._read(self._user(username))

    @staticmethod
    def _user(username: str) -> Op[UserRow | None]:
        row = (yield rows("SELECT username, password_hash, created_at FROM chat_users "
                          "WHERE username = ?", username)).first()
        return None if row is None else UserRow(str(row[0]), str(row[1]), str(row[2]))

    async def users(self) -> list[tuple[str, str]]:
        return await self._read(self._users())

    @staticmethod
    def _users() -> Op[list[tuple[str, str]]]:
        found = yield rows("SELECT username, created_at FROM chat_users ORDER BY username")
        return [(str(r[0]), str(r[1])) for r in found.rows]

    @staticmethod
    def _existing_users(names: list[str]) -> Op[set[str]]:
        """Which of `names` have an account (one query)."""
        if not names:
            return set()
        found = yield rows("SELECT username FROM chat_users WHERE username IN ("
                           + ", ".join("?" * len(names)) + ")", *names)
        return {str(r[0]) for r in found.rows}

    async def create_session(self, sid: str, username: str, expires_at: float,
                             now: float) -> None:
        await self._write(self._create_session(sid, username, expires_at, now))

    @staticmethod
    def _create_session(sid: str, username: str, expires_at: float, now: float) -> Op[None]:
        yield count("DELETE FROM chat_sessions WHERE expires_at < ?", now)
        yield count("INSERT INTO chat_sessions VALUES (?, ?, ?) ON CONFLICT (sid) DO UPDATE "
                    "SET username = excluded.username, expires_at = excluded.expires_at",
                    sid, username, expires_at)

    async def session_valid(self, sid: str, username: str, now: float) -> bool:
        return await self._read(self._session_valid(sid, username, now))

    @staticmethod
    def _session_valid(sid: str, username: str, now: float) -> Op[bool]:
        row = (yield rows("SELECT username, expires_at FROM chat_sessions WHERE sid = ?",
                          sid)).first()
        return row is not None and row[0] == username and float(str(row[1])) > now

    async def extend_session(self, sid: str, expires_at: float) -> None:
        await self._write(self._extend_session(sid, expires_at))

    @staticmethod
    def _extend_session(sid: str, expires_at: float) -> Op[None]:
        yield count("UPDATE chat_sessions SET expires_at = ? WHERE sid = ?", expires_at, sid)

    async def delete_session(self, sid: str) -> None:
        await self._write(self._delete_session(sid))

    @staticmethod
    def _delete_session(sid: str) -> Op[None]:
        yield count("DELETE FROM chat_sessions WHERE sid = ?", sid)

    # -- rooms ------------------------------------------------------------------------------

    async def room_names(self) -> set[str]:
        return await self._read(self._room_names())

    @staticmethod
    def _room_names() -> Op[set[str]]:
        return {str(r[0]) for r in (yield rows("SELECT name FROM chat_rooms")).rows}

    async def create_room(self, name: str, creator: str) -> dict[str, object]:
        return await self._write(self._create_room(name, creator))

    def _create_room(self, name: str, creator: str) -> Op[dict[str, object]]:
        now = now_iso()
        added = yield count("INSERT INTO chat_rooms VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                            name, creator, now)
        if not added.count:
            raise Taken(f"a room named {name!r} exists")
        yield from self._join(name, creator)
        yield events.room_created(name, creator, now)
        return (yield from self._room_info(name, creator))

    @staticmethod
    def _room_exists(name: str) -> Op[None]:
        if not (yield from _exists("SELECT 1 FROM chat_rooms WHERE name = ?", name)):
            raise UnknownRoom(f"no room named {name!r}")

    @staticmethod
    def _last_id(conv: str) -> Op[int]:
        return _int((yield rows("SELECT MAX(id) FROM chat_messages WHERE conv = ?",
                                conv)).value())

    @staticmethod
    def _unread(username: str, conv: str) -> Op[int]:
        return _int((yield rows(
            "SELECT COUNT(*) FROM chat_messages WHERE conv = ? AND sender != ? AND id > "
            "COALESCE((SELECT last_read FROM chat_reads WHERE username = ? AND conv = ?), 0)",
            conv, username, username, conv)).value())

    def _room_info(self, name: str, username: str) -> Op[dict[str, object]]:
        row = (yield rows("SELECT name, created_by, created_at FROM chat_rooms "
                          "WHERE name = ?", name)).first()
        if row is None:
            raise UnknownRoom(f"no room named {name!r}")
        conv = Conversation.of_room(name).key
        members = _int((yield rows("SELECT COUNT(*) FROM chat_members WHERE room = ?",
                                   name)).value())
        joined = yield from _exists(
            "SELECT 1 FROM chat_members WHERE room = ? AND username = ?", name, username)
        return {
            "name": row[0], "created_by": row[1], "created_at": row[2], "members": members,
            "joined": joined,
            "unread": (yield from self._unread(username, conv)) if joined else 0,
            "last_id": (yield from self._last_id(conv)),
            "topic": Conversation.of_room(name).topic,
        }

    async def rooms(self, username: str) -> list[dict[str, object]]:
        return await self._snapshot(self._rooms(username))

    def _rooms(self, username: str) -> Op[list[dict[str, object]]]:
        names = [str(r[0]) for r in
                 (yield rows("SELECT name FROM chat_rooms ORDER BY name")).rows]
        out = []
        for name in names:
            out.append((yield from self._room_info(name, username)))
        return out

    async def room(self, name: str, username: str) -> dict[str, object]:
        return await self._snapshot(self._room_info(name, username))

    def _join(self, room: str, username: str) -> Op[bool]:
        added = (yield count("INSERT INTO chat_members VALUES (?, ?) ON CONFLICT DO NOTHING",
                             room, username)).count
        if added:
            # What was said before joining is history, not unread.
            conv = Conversation.of_room(room).key
            yield from self._set_read(username, conv, (yield from self._last_id(conv)))
        return bool(added)

    async def join(self, room: str, username: str) -> dict[str, object]:
        return await self._write(self._change_membership(room, username, "joined"))

    async def leave(self, room: str, username: str) -> dict[str, object]:
        return await self._write(self._change_membership(room, username, "left"))

    def _change_membership(self, room: str, username: str,
                           change: Literal["joined", "left"]) -> Op[dict[str, object]]:
        """Join or leave; the `member.joined`/`member.left` event only when it changed
        anything (joining twice announces nothing)."""
        yield from self._room_exists(room)
        if change == "joined":
            changed = yield from self._join(room, username)
        else:
            changed = bool((yield count(
                "DELETE FROM chat_members WHERE room = ? AND username = ?",
                room, username)).count)
        if changed:
            yield events.member_event(change, room, username)
        return (yield from self._room_info(room, username))

    async def members(self, room: str) -> list[str]:
        return await self._read(self._members(room))

    @staticmethod
    def _members(room: str) -> Op[list[str]]:
        found = yield rows("SELECT username FROM chat_members WHERE room = ? "
                           "ORDER BY username", room)
        return [str(r[0]) for r in found.rows]

    # -- direct conversations -----------------------------------------------------------

    async def dms(self, username: str) -> list[dict[str, object]]:
        return await self._snapshot(self._dms(username))

    def _dms(self, username: str) -> Op[list[dict[str, object]]]:
        out = []
        found = yield rows("SELECT conv, a, b FROM chat_dms WHERE a = ? OR b = ?",
                           username, username)
        for conv, a, b in found.rows:
            conversation = Conversation.from_key(str(conv))
            out.append({
                "user": b if a == username else a, "dm": [a, b],
                "unread": (yield from self._unread(username, str(conv))),
                "last_id": (yield from self._last_id(str(conv))),
                "topic": conversation.topic,
            })
        out.sort(key=lambda d: -int(str(d["last_id"])))
        return out

    # -- messages -----------------------------------------------------------------------------

    def _check_writable(self, conv: Conversation, sender: str) -> Op[None]:
        if conv.room is not None:
            room, member = (yield rows(  # one round trip for both
                "SELECT EXISTS (SELECT 1 FROM chat_rooms WHERE name = ?), EXISTS (SELECT 1 "
                "FROM chat_members WHERE room = ? AND username = ?)",
                conv.room, conv.room, sender)).rows[0]
            if not room:
                raise _refused("no room", conv, sender)
            if not member:
                raise _refused("not a member", conv, sender)
        else:
            other = conv.other(sender)
            if other is None or not (yield from _exists(
                    "SELECT 1 FROM chat_users WHERE username = ?", other)):
                raise _refused("no user", conv, sender)

    async def post(self, conv: Conversation, sender: str, content: str,
                   mentioned: list[str], charge: tuple[str, int, float] | None = None,
                   session: tuple[str, float] | None = None,
                   ) -> tuple[Message, list[str]]:
        """Store a message; returns it and who was notified of a mention. `charge`: a
        shared rate limit's hit (`SharedLimit.charge`), counted in the same transaction
        (PostgreSQL): a refusal writes nothing, and a post costs one commit, not two.
        `session`: (sid, now), a session of `sender` to check first, in the same
        transaction (NoSession when it has ended)."""
        if self.database.calls and all(name == sender for name in mentioned):
            post = _Post.of(conv, sender, content, charge, session)
            if conv.room is not None:
                return await self._room_posts.submit(post), []
            return await self._write(self._post_call(post, self.database.emit_args),
                                     "call"), []
        return await self._write(self._post(conv, sender, content, mentioned, charge,
                                            session))

    def _post(self, conv: Conversation, sender: str, content: str, mentioned: list[str],
              charge: tuple[str, int, float] | None, session: tuple[str, float] | None,
              ) -> Op[tuple[Message, list[str]]]:
        now = now_iso()
        if session is not None and not (yield from self._session_valid(
                session[0], sender, session[1])):
            raise NoSession.ended()
        yield from self._check_writable(conv, sender)
        if charge is not None:
            wait_s = (yield pg_only("SELECT chat_cluster_hit(?, ?, ?)", *charge)).value()
            if wait_s:
                raise RateLimited.messages(charge[1], charge[2], _int(wait_s))
        if conv.dm is not None:
            yield count("INSERT INTO chat_dms VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                        conv.key, conv.dm[0], conv.dm[1])
        id_ = (yield rows("INSERT INTO chat_messages (conv, sender, content, created_at) "
                          "VALUES (?, ?, ?, ?) RETURNING id",
                          conv.key, sender, content, now)).value()
        message = Message(_int(id_), conv, sender, content, now)
        yield events.message_created(message)
        yield from self._set_read(sender, conv.key, message.id)  # one's own words are read
        notified: list[str] = []
        if conv.room is not None:  # in a direct conversation the other sees it anyway
            existing = yield from self._existing_users(
                [name for name in mentioned if name != sender])
            for name in mentioned:
                if name not in existing:  # (the sender is not in it)
                    continue
                yield events.notification(name, {
                    "id": f"mention-{message.id}-{name}", "kind": "mention",
                    "message": f"{sender} mentioned you in #{conv.room}",
                    "from": sender, "room": conv.room, "message_id": message.id,
                    "excerpt": content[:200], "created_at": now,
                })
                notified.append(name)
        return message, notified

    @staticmethod
    def _post_call(post: _Post, emit_args: tuple[object, ...]) -> Op[Message]:
        """`_post` of a message that mentions nobody else, in one round trip: PostgreSQL's
        `chat_post` (migration 3) makes the same checks, hit, writes and update."""
        conv = post.conv
        dm_a, dm_b = conv.dm if conv.dm is not None else (None, None)
        status, value = (yield pg_only(
            "SELECT status, value FROM chat_post(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
            "?, ?, ?, ?)", *emit_args, *post.sid_and_now, conv.key, conv.room,
            conv.other(post.sender), dm_a, dm_b, post.sender, post.content,
            post.created_at, *post.hit, conv.topic, post.head, post.tail)).rows[0]
        return post.outcome(str(status), _int(value))

    async def _post_in_rooms(self, posts: list[_Post]) -> list[Message | Exception]:
        """A batch of room messages (`Batcher`) in one call of `chat_post_many`, which
        posts each as `chat_post` does. They go sorted by author and room, so that two
        batches take the rate limit's and the read marks' locks in the same order (no
        deadlock); should the batch fail all the same, each goes alone."""
        order = sorted(range(len(posts)), key=lambda i: (posts[i].sender, posts[i].conv.key))
        try:
            answers = await self._write(self._post_many([posts[i] for i in order],
                                                        self.database.emit_args), "call")
        except ServiceUnavailable:
            raise
        except Exception:
            if len(posts) == 1:
                raise
            return [await self._post_alone(post) for post in posts]
        outcomes: list[Message | Exception] = [Exception()] * len(posts)
        for i, (status, value) in zip(order, answers, strict=True):
            try:
                outcomes[i] = posts[i].outcome(status, value)
            except TidingsError as exc:
                outcomes[i] = exc
        return outcomes

    async def _post_alone(self, post: _Post) -> Message | Exception:
        try:
            return await self._write(self._post_call(post, self.database.emit_args), "call")
        except TidingsError as exc:
            return exc

    @staticmethod
    def _post_many(posts: list[_Post], emit_args: tuple[object, ...]
                   ) -> Op[list[tuple[str, int]]]:
        found = yield pg_only(
            "SELECT status, value FROM chat_post_many(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
            "?, ?)", *emit_args, [p.sid_and_now[0] for p in posts],
            [p.sid_and_now[1] for p in posts], [p.conv.key for p in posts],
            [p.conv.room for p in posts],
            [p.sender for p in posts], [p.content for p in posts],
            [p.created_at for p in posts], [p.hit[0] for p in posts],
            [p.hit[1] for p in posts], [p.hit[2] for p in posts],
            [p.conv.topic for p in posts], [p.head for p in posts],
            [p.tail for p in posts])
        return [(str(r[0]), _int(r[1])) for r in found.rows]

    def _own_message(self, message_id: int, username: str,
                     expected: Conversation | None) -> Op[Message]:
        row = (yield rows(f"SELECT {_MESSAGE_COLUMNS} FROM chat_messages WHERE id = ?",
                          message_id)).first()
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
        return await self._write(self._edit(message_id, username, content, expected))

    def _edit(self, message_id: int, username: str, content: str,
              expected: Conversation | None) -> Op[Message]:
        message = yield from self._own_message(message_id, username, expected)
        if message.content == content:
            return message
        now = now_iso()
        yield count("UPDATE chat_messages SET content = ?, edited_at = ? WHERE id = ?",
                    content, now, message_id)
        edited = Message(message.id, message.conversation, message.sender, content,
                         message.created_at, now)
        yield events.message_updated(edited)
        return edited

    async def delete(self, message_id: int, username: str,
                     expected: Conversation | None) -> Message:
        return await self._write(self._delete(message_id, username, expected))

    def _delete(self, message_id: int, username: str,
                expected: Conversation | None) -> Op[Message]:
        message = yield from self._own_message(message_id, username, expected)
        yield count("DELETE FROM chat_messages WHERE id = ?", message_id)
        yield events.message_deleted(message.id, message.conversation)
        return message

    async def history(self, conv: Conversation, before: int | None,
                      limit: int) -> tuple[list[Message], int]:
        """Newest first: the `limit` messages before id `before` (or the newest), and the
        outbox position they reflect: every update at or below it is in them (a reply's
        text included), none above it is."""
        return await self._snapshot(self._history(conv, before, limit))

    async def recent(self, conv: Conversation, before: int | None,
                     limit: int) -> list[Message]:
        """The messages of `history` without its position, so without the outbox's order
        lock that a position takes on PostgreSQL: for reads that resume nothing (the
        assistant's context)."""
        return await self._read(self._messages(conv, before, limit))

    def _history(self, conv: Conversation, before: int | None,
                 limit: int) -> Op[tuple[list[Message], int]]:
        # One snapshot: the messages and the position from the same one. On PostgreSQL the
        # outbox's order lock is taken before the snapshot (`_outbox_position`).
        yield pg_only("LOCK TABLE chat_order IN EXCLUSIVE MODE")
        messages = yield from self._messages(conv, before, limit)
        return messages, (yield from self._outbox_position())

    def _messages(self, conv: Conversation, before: int | None,
                  limit: int) -> Op[list[Message]]:
        if conv.room is not None:
            yield from self._room_exists(conv.room)
        found = yield rows(
            f"SELECT {_MESSAGE_COLUMNS} FROM chat_messages WHERE conv = ? AND id < ? "
            f"ORDER BY id DESC LIMIT ?",
            conv.key, before if before is not None else 2**62, limit)
        return (yield from self._with_replies([_message(row) for row in found.rows]))

    @staticmethod
    def _outbox_position() -> Op[int]:
        """The newest outbox seq committed in this snapshot; 0 before the first. Every
        seq below it is in the snapshot too, none above it. SQLite: AUTOINCREMENT's
        counter (seq is commit order there; the counter stays when the relay deletes the
        rows it published). PostgreSQL: the rows this snapshot sees are numbered now, in
        it, under the order lock taken before it (`pg_store.py`), and the last number given
        is the position."""
        return _int((yield rows(
            "SELECT seq FROM sqlite_sequence WHERE name = 'chat_outbox'",
            pg="SELECT chat_sequence()")).value())

    @staticmethod
    def _with_replies(messages: list[Message]) -> Op[list[Message]]:
        """The assistant's messages with their reply state."""
        ids = [m.id for m in messages if m.sender == ASSISTANT]
        if not ids:
            return messages
        found = yield rows("SELECT id, asker, reply_to, state, note FROM chat_replies "
                           f"WHERE id IN ({','.join('?' * len(ids))})", *ids)
        replies = {_int(r[0]): Reply(str(r[1]), None if r[2] is None else _int(r[2]),
                                     str(r[3]), _opt(r[4]))
                   for r in found.rows}
        return [dataclasses.replace(m, reply=replies.get(m.id)) if m.id in replies else m
                for m in messages]

    async def message(self, message_id: int) -> Message:
        return await self._read(self._message_by_id(message_id))

    def _message_by_id(self, message_id: int) -> Op[Message]:
        row = (yield rows(f"SELECT {_MESSAGE_COLUMNS} FROM chat_messages WHERE id = ?",
                          message_id)).first()
        if row is None:
            raise UnknownMessage(f"no message {message_id}")
        return (yield from self._with_replies([_message(row)]))[0]

    # -- the assistant's replies -------------------------------------------------------------

    async def start_reply(self, conv: Conversation, asker: str, reply_to: int | None,
                          content: str = "", state: str = "streaming",
                          note: str | None = None) -> Message:
        """Store a reply from the assistant (empty while it streams) and its
        `message.created`."""
        return await self._write(self._start_reply(conv, asker, reply_to, content, state,
                                                   note))

    def _start_reply(self, conv: Conversation, asker: str, reply_to: int | None, content: str,
                     state: str, note: str | None) -> Op[Message]:
        now = now_iso()
        if conv.room is not None:
            yield from self._room_exists(conv.room)
        id_ = (yield rows("INSERT INTO chat_messages (conv, sender, content, created_at) "
                          "VALUES (?, ?, ?, ?) RETURNING id",
                          conv.key, ASSISTANT, content, now)).value()
        reply = Reply(asker, reply_to, state, note)
        message = Message(_int(id_), conv, ASSISTANT, content, now, reply=reply)
        yield count("INSERT INTO chat_replies VALUES (?, ?, ?, ?, ?)",
                    message.id, asker, reply_to, state, note)
        yield events.message_created(message)
        return message

    async def append_reply(self, message_id: int, conv: Conversation, offset: int,
                           text: str) -> bool:
        """Append to a streaming reply, with its `message.delta`, in one commit. False, and
        nothing written, once the reply has ended: another process may end it (a Stop
        that its process did not answer in time, the sweep of a process taken for gone)
        while this one still streams."""
        return await self._write(self._append_reply(message_id, conv, offset, text))

    @staticmethod
    def _append_reply(message_id: int, conv: Conversation, offset: int,
                      text: str) -> Op[bool]:
        # On PostgreSQL the reply's row is locked first: an end committing meanwhile
        # either waits for this delta or is seen by it. Never a delta after the end.
        streaming = yield rows(
            "SELECT 1 FROM chat_replies WHERE id = ? AND state = 'streaming'", message_id,
            pg="SELECT 1 FROM chat_replies WHERE id = ? AND state = 'streaming' FOR UPDATE")
        if not streaming.rows:
            return False
        yield count("UPDATE chat_messages SET content = content || CAST(? AS TEXT) "
                    "WHERE id = ?", text, message_id)
        yield events.message_delta(message_id, conv, offset, text)
        return True

    async def finish_reply(self, message_id: int, state: str, note: str | None) -> Message:
        """End a streaming reply (with its `message.completed`). A reply that has ended
        already stays as it is: the first end wins."""
        return await self._write(self._finish_reply(message_id, state, note))

    def _finish_reply(self, message_id: int, state: str, note: str | None) -> Op[Message]:
        changed = (yield count(
            "UPDATE chat_replies SET state = ?, note = ? WHERE id = ? AND "
            "state = 'streaming'", state, note, message_id)).count
        message = yield from self._message_by_id(message_id)
        if changed:
            yield events.message_completed(message)
        return message

    async def streaming_replies(self) -> list[int]:
        return await self._read(self._streaming_replies())

    @staticmethod
    def _streaming_replies() -> Op[list[int]]:
        found = yield rows("SELECT id FROM chat_replies WHERE state = 'streaming' ORDER BY id")
        return [_int(r[0]) for r in found.rows]

    async def messages_after(self, conv: Conversation, after: int,
                             limit: int) -> list[Message]:
        """Oldest first (exports)."""
        return await self._read(self._messages_after(conv, after, limit))

    @staticmethod
    def _messages_after(conv: Conversation, after: int, limit: int) -> Op[list[Message]]:
        found = yield rows(
            f"SELECT {_MESSAGE_COLUMNS} FROM chat_messages WHERE conv = ? AND id > ? "
            f"ORDER BY id LIMIT ?", conv.key, after, limit)
        return [_message(row) for row in found.rows]

    async def count(self, conv: Conversation) -> int:
        return await self._read(self._count(conv))

    @staticmethod
    def _count(conv: Conversation) -> Op[int]:
        return _int((yield rows("SELECT COUNT(*) FROM chat_messages WHERE conv = ?",
                                conv.key)).value())

    # -- read markers -----------------------------------------------------------------------

    @staticmethod
    def _set_read(username: str, conv: str, last_read: int) -> Op[bool]:
        return bool((yield count(
            "INSERT INTO chat_reads VALUES (?, ?, ?) ON CONFLICT (username, conv) DO UPDATE "
            "SET last_read = excluded.last_read "
            "WHERE excluded.last_read > chat_reads.last_read",
            username, conv, last_read)).count)

    async def mark_read(self, username: str, conv: Conversation, up_to: int | None) -> int:
        return await self._write(self._mark_read(username, conv, up_to))

    def _mark_read(self, username: str, conv: Conversation, up_to: int | None) -> Op[int]:
        if conv.room is not None:
            yield from self._room_exists(conv.room)
        last = yield from self._last_id(conv.key)
        target = last if up_to is None else min(up_to, last)
        if (yield from self._set_read(username, conv.key, target)):
            # Every window of this user clears its unread count.
            yield events.read_marker(username, conv, target)
        return _int((yield rows(
            "SELECT last_read FROM chat_reads WHERE username = ? AND conv = ?",
            username, conv.key)).value())

    # -- notifications ------------------------------------------------------------------------

    async def notify(self, user: str, fields: dict[str, object]) -> None:
        await self._write(self._notify(user, fields))

    @staticmethod
    def _notify(user: str, fields: dict[str, object]) -> Op[None]:
        if not (yield from _exists("SELECT 1 FROM chat_users WHERE username = ?", user)):
            raise UnknownUser(f"no user named {user!r}")
        yield events.notification(user, fields)

    # -- tasks --------------------------------------------------------------------------------

    async def create_task(self, task_id: str, owner: str, room: str, fmt: str) -> TaskRow:
        return await self._write(self._create_task(task_id, owner, room, fmt))

    def _create_task(self, task_id: str, owner: str, room: str, fmt: str) -> Op[TaskRow]:
        yield from self._room_exists(room)
        yield count("INSERT INTO chat_tasks (id, owner, room, format, state, percent, "
                    "step, created_at) VALUES (?, ?, ?, ?, 'queued', 0, 'queued', ?)",
                    task_id, owner, room, fmt, now_iso())
        yield events.task_event("progress", task_id, {
            "state": "queued", "percent": 0, "step": "queued"})
        return (yield from self._task_row(task_id))

    @staticmethod
    def _task_row(task_id: str) -> Op[TaskRow]:
        row = (yield rows(
            "SELECT id, owner, room, format, state, percent, step, error, created_at, "
            "result IS NOT NULL FROM chat_tasks WHERE id = ?", task_id)).first()
        if row is None:
            raise UnknownTask(f"no task {task_id!r}")
        return TaskRow(str(row[0]), str(row[1]), str(row[2]), str(row[3]), str(row[4]),
                       _int(row[5]), str(row[6]), _opt(row[7]), str(row[8]), bool(row[9]))

    async def task(self, task_id: str) -> TaskRow:
        return await self._read(self._task_row(task_id))

    async def task_result(self, task_id: str) -> bytes:
        return await self._read(self._task_result(task_id))

    @staticmethod
    def _task_result(task_id: str) -> Op[bytes]:
        value = (yield rows("SELECT result FROM chat_tasks WHERE id = ?", task_id)).value()
        if not isinstance(value, bytes | bytearray | memoryview):
            raise UnknownTask(f"task {task_id!r} has no result")
        return bytes(value)

    async def unfinished_tasks(self) -> list[str]:
        return await self._read(self._unfinished_tasks())

    @staticmethod
    def _unfinished_tasks() -> Op[list[str]]:
        where = "FROM chat_tasks WHERE state IN ('queued', 'running')"
        found = yield rows(f"SELECT id {where} ORDER BY rowid",
                           pg=f"SELECT id {where} ORDER BY n")
        return [str(r[0]) for r in found.rows]

    async def task_progress(self, task_id: str, state: str, percent: int, step: str,
                            *, result: bytes | None = None, error: str | None = None) -> None:
        """Record (and announce) a task's progress or end. Its end is final and its
        progress never goes back: two runs of one export (a process taken for gone runs
        again after another took its export over, or a restart) show one course."""
        await self._write(self._task_progress(task_id, state, percent, step, result, error))

    @staticmethod
    def _task_progress(task_id: str, state: str, percent: int, step: str,
                       result: bytes | None, error: str | None) -> Op[None]:
        ending = state in ("completed", "failed")
        changed = (yield count(
            "UPDATE chat_tasks SET state = ?, percent = ?, step = ?, "
            "result = COALESCE(?, result), error = ? WHERE id = ? "
            "AND state IN ('queued', 'running') AND (? OR percent <= ?)",
            state, percent, step, result, error, task_id, ending, percent)).count
        if not changed:
            return
        fields: dict[str, object] = {"state": state, "percent": percent, "step": step}
        kind = "progress"
        if state == "completed":
            kind = "completed"
            fields["download"] = f"/api/tasks/{task_id}/download"
        elif state == "failed":
            kind = "failed"
            fields["error"] = error or "failed"
        yield events.task_event(kind, task_id, fields)

    # -- the outbox -----------------------------------------------------------------------------

    async def cursor(self) -> int:
        """The relay's saved cursor (whichever process relays)."""
        return await self._read(self._cursor())

    @staticmethod
    def _cursor() -> Op[int]:
        return _int((yield rows("SELECT value FROM chat_state WHERE name = 'cursor'")).value())

    async def outbox_after(self, seq: int, limit: int) -> list[OutboxRow]:
        return await self._read(self._outbox_after(seq, limit))

    @staticmethod
    def _outbox_after(seq: int, limit: int) -> Op[list[OutboxRow]]:
        yield pg_only("SELECT chat_sequence()")  # number what has committed since
        found = yield rows("SELECT seq, topic, data FROM chat_outbox WHERE seq > ? "
                           "ORDER BY seq LIMIT ?", seq, limit)
        return [OutboxRow(_int(r[0]), str(r[1]), str(r[2])) for r in found.rows]

    async def relay_read(self, seq: int, limit: int,
                         done: int | None = None) -> list[OutboxRow]:
        """`outbox_after`, as the relay; first `relay_done(done)` when given (on
        PostgreSQL both in one call of `chat_relay_step`: one round trip, one commit)."""
        if self.database.calls:
            return await self.database.run_leading(
                self._relay_step(done, seq, limit), "call")
        if done is not None:
            await self.relay_done(done)
        return await self.database.run_leading(self._outbox_after(seq, limit))

    @staticmethod
    def _relay_step(done: int | None, seq: int, limit: int) -> Op[list[OutboxRow]]:
        found = yield pg_only("SELECT seq, topic, data FROM chat_relay_step(?, ?, ?)",
                              done, seq, limit)
        return [OutboxRow(_int(r[0]), str(r[1]), str(r[2])) for r in found.rows]

    async def relay_done(self, seq: int) -> None:
        """Everything through `seq` is in the hub's history: drop it and save the cursor
        (as the relay)."""
        await self.database.run_leading(self._outbox_done(seq))

    @staticmethod
    def _outbox_done(seq: int) -> Op[None]:
        yield count("DELETE FROM chat_outbox WHERE seq <= ?", seq)
        yield count("UPDATE chat_state SET value = ? WHERE name = 'cursor'", str(seq))
