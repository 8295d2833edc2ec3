"""The chat: accounts, rooms, messages, direct conversations, presence, typing,
notifications and exports. No HTTP here: `web/chat.py` maps requests onto these calls and
the errors (each with its `status_hint`) onto responses.

The path of a message: `post()` validates it and charges the sender's rate limit, the
store commits the message and its `message.created` update (the outbox) together, the
relay publishes that update through the hub, and the hub fans it out to every window
subscribed to the conversation's topic, or replays it to one that resumes.

With its tables in PostgreSQL the chat runs on several processes (`cluster.py`): presence
(`shared_presence.py`), the rate limits (`limits.py`), the assistant's replies and the
exports are then shared through the database; on SQLite they stay in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tidings.chat import events
from tidings.chat.accounts import CheckedSessions, Passwords, Session, SessionTokens
from tidings.chat.assistant import AssistantConfig
from tidings.chat.errors import (
    BadCredentials,
    InvalidInput,
    NoSession,
    RateLimited,
    Taken,
    UnknownMessage,
    UnknownRoom,
    UnknownTask,
    UnknownUser,
)
from tidings.chat.exports import FORMATS, Exports
from tidings.chat.limits import LocalLimit, RateLimit, SharedLimit
from tidings.chat.model import (
    ASSISTANT,
    MAX_MESSAGE_LENGTH,
    PRESENCE_TOPIC,
    ROOMS_TOPIC,
    Conversation,
    Message,
    check_content,
    check_password,
    check_room_name,
    check_username,
    is_shared_db,
    mentions,
    notifications_topic,
    now_iso,
    subscribe_selectors,
)
from tidings.chat.presence import Connection, Presence, PresenceTracker
from tidings.chat.relay import Relay
from tidings.chat.replies import Replies
from tidings.chat.store import ChatStore, TaskRow, UserRow
from tidings.errors import ServiceUnavailable, TidingsError
from tidings.hub.auth import KeyConfig
from tidings.hub.hub import Hub
from tidings.hub.update import Update

if TYPE_CHECKING:
    from tidings.chat.cluster import Cluster

__all__ = ["ChatConfig", "ChatService", "ChatStatus"]

log = logging.getLogger(__name__)

_MAX_PAGE = 100
_DEFAULT_PAGE = 50
_LOGIN_ATTEMPTS = 10
_LOGIN_WINDOW_S = 60.0
_MAX_NOTIFICATION_LENGTH = 1000


@dataclass(frozen=True, slots=True)
class ChatConfig:
    db_url: str = "memory://"
    session_ttl_s: float = 7 * 24 * 3600.0
    rate_messages: int = 10
    rate_window_s: float = 10.0
    presence_grace_s: float = 2.0
    # A user's typing updates in one conversation go out at most this often.
    typing_interval_s: float = 1.0
    # Several processes (PostgreSQL): how often each one says it is alive; one that has
    # not for two heartbeats is gone (its users offline, its replies and exports taken over).
    heartbeat_s: float = 3.0
    # The assistant's endpoint (None or no url: `@assistant` says none is configured).
    assistant: AssistantConfig | None = None


@dataclass(frozen=True, slots=True)
class ChatStatus:
    """What the chat tells operators (`/metrics`): known without any I/O."""

    store: str  # "sqlite", "postgresql", "memory"
    relay_leading: bool  # this process relays the outbox (one process does)
    relay_published: int  # the newest outbox row its relay published
    streams: int  # chat streams (windows) open on this process
    messages_posted: int  # messages posted through this process since it started
    # PostgreSQL: the chat processes alive at this one's last heartbeat (None: one
    # process, or no heartbeat yet).
    processes: int | None


def _user_json(user: UserRow) -> dict[str, object]:
    return {"username": user.username, "created_at": user.created_at}


class ChatService:
    def __init__(self, hub: Hub, config: ChatConfig, session_key: KeyConfig | None) -> None:
        self.hub = hub
        self.config = config
        self.tokens = SessionTokens(session_key, config.session_ttl_s)
        self._checked = CheckedSessions()
        self._checking: dict[tuple[str, str], asyncio.Future[bool]] = {}
        self.passwords = Passwords()
        self.store = ChatStore(config.db_url, on_write=self._wake_relay)
        self.relay = Relay(self.store, hub)
        self.cluster: Cluster | None = None
        self.presence: Presence
        self.limiter: RateLimit
        self.login_limiter: RateLimit
        if is_shared_db(config.db_url):
            from tidings.chat.cluster import Cluster, ClusterConfig
            from tidings.chat.shared_presence import SharedPresence
            self.cluster = cluster = Cluster(ClusterConfig(config.db_url, config.heartbeat_s))
            self.presence = SharedPresence(cluster, self._announce_presence,
                                           config.presence_grace_s)
            self.limiter = SharedLimit(cluster, "post", config.rate_messages,
                                       config.rate_window_s)
            self.login_limiter = SharedLimit(cluster, "login", _LOGIN_ATTEMPTS,
                                             _LOGIN_WINDOW_S)
        else:
            self.presence = PresenceTracker(self._announce_presence, config.presence_grace_s)
            self.limiter = LocalLimit(config.rate_messages, config.rate_window_s)
            self.login_limiter = LocalLimit(_LOGIN_ATTEMPTS, _LOGIN_WINDOW_S)
        self.exports = Exports(self.store, cluster=self.cluster)
        self.replies = Replies(self.store, config.assistant, self.cluster)
        self._rooms: set[str] = set()
        self._typing: dict[tuple[str, str], float] = {}
        self._posted = 0

    def status(self) -> ChatStatus:
        return ChatStatus(
            store="postgresql" if self.cluster is not None
            else self.config.db_url.split(":", 1)[0],
            relay_leading=self.relay.leading,
            relay_published=self.relay.published,
            streams=len(self.presence.registry),
            messages_posted=self._posted,
            processes=None if self.cluster is None else self.cluster.live_processes)

    def _wake_relay(self) -> None:
        self.relay.wake()

    async def start(self) -> None:
        if self.store.ephemeral and not self.config.db_url.startswith("memory:"):
            log.warning("chat: its tables are SQLite; with --db %s they are kept in memory "
                        "and lost at a restart", self.config.db_url.split("://", 1)[0] + "://")
        await self.store.start()
        self._rooms = await self.store.room_names()
        if self.cluster is not None:
            await self.cluster.start()
        await self.presence.start()
        await self.relay.start()
        await self.exports.start()
        await self.replies.start()
        if not self.tokens.usable:
            log.warning("chat: sign-in is disabled; the subscriber key must be an HMAC "
                        "secret to sign sessions")

    async def stop(self) -> None:
        await self.presence.close()
        await self.replies.stop()
        await self.exports.stop()
        if self.cluster is not None:
            await self.cluster.stop()
        await self.relay.stop()
        await self.store.stop()

    # -- accounts ------------------------------------------------------------------------

    async def _new_session(self, username: str) -> Session:
        session = self.tokens.mint(username, secrets.token_urlsafe(16))
        await self.store.create_session(session.sid, username, session.expires_at, time.time())
        return session

    async def signup(self, username: object, password: object) -> tuple[dict[str, object],
                                                                        Session]:
        name = check_username(username)
        secret = check_password(password)
        if name == ASSISTANT:
            raise Taken(f"the username {name!r} is reserved")
        self.tokens.require_key()  # no signing key: 503 before anything is stored
        user = await self.store.create_user(name, await self.passwords.hash(secret))
        log.info("chat: user %s signed up", name)
        return _user_json(user), await self._new_session(name)

    async def login(self, username: object, password: object) -> tuple[dict[str, object],
                                                                       Session]:
        if not isinstance(username, str) or not isinstance(password, str):
            raise InvalidInput("username" if not isinstance(username, str) else "password",
                               "username and password are required strings")
        name = username.strip().lower()[:64]
        wait_s = await self.login_limiter.hit(name)
        if wait_s:
            raise RateLimited("too many sign-in attempts; try again later", wait_s)
        user = await self.store.user(name)
        ok = await self.passwords.verify(None if user is None else user.password_hash,
                                         password[:4096])
        if user is None or not ok:
            raise BadCredentials("wrong username or password")
        return _user_json(user), await self._new_session(user.username)

    async def session(self, token: str | None) -> Session:
        """The live session a token carries (NoSession: 401)."""
        session = self.tokens.read(token)
        key = (session.sid, session.username)
        if self._checked.fresh(*key):
            return session
        return await self._confirm(session)

    async def posting_session(self, token: str | None) -> tuple[Session, bool]:
        """`session`, for a request that posts a message: where the post's own database
        call can check the session (PostgreSQL), the check is left to it, saving a round
        trip (second value True: pass the session to `post`)."""
        session = self.tokens.read(token)
        if self._checked.fresh(session.sid, session.username):
            return session, False
        if self.store.database.calls:
            return session, True
        return await self._confirm(session), False

    async def _confirm(self, session: Session) -> Session:
        key = (session.sid, session.username)
        # One check at a time per session: under load a check waits for the pool, and
        # every request of that user meanwhile would make one more.
        check = self._checking.get(key)
        if check is None:
            check = asyncio.ensure_future(
                self.store.session_valid(session.sid, session.username, time.time()))
            self._checking[key] = check
            check.add_done_callback(lambda done: self._checked_one(key, done))
        if not await asyncio.shield(check):
            raise NoSession.ended()
        self._checked.confirmed(*key)
        return session

    def _checked_one(self, key: tuple[str, str], check: asyncio.Future[bool]) -> None:
        self._checking.pop(key, None)
        if not check.cancelled():
            check.exception()  # retrieved: each waiter, if any is left, raises it

    async def logout(self, token: str | None) -> None:
        try:
            session = self.tokens.read(token)
        except NoSession:
            return
        self._checked.forget(session.sid)
        await self.store.delete_session(session.sid)

    async def refresh(self, session: Session) -> Session | None:
        """A fresh token for a session past half its life (None: keep the current one)."""
        if not self.tokens.due_for_refresh(session):
            return None
        fresh = self.tokens.mint(session.username, session.sid)
        await self.store.extend_session(session.sid, fresh.expires_at)
        return fresh

    async def me(self, session: Session) -> dict[str, object]:
        user = await self.store.user(session.username)
        if user is None:
            raise NoSession("this account no longer exists")
        me = session.username
        return {
            **_user_json(user),
            "session_expires_at": session.expires_at,
            "hub": "/.well-known/mercure",
            # What a page subscribes to, besides the exact topics of its joined rooms.
            "subscribe": [ROOMS_TOPIC, PRESENCE_TOPIC, f"/chat/dm/{me}/{{other}}",
                          f"/chat/dm/{{other}}/{me}", notifications_topic(me),
                          f"/tasks/{me}.{{id}}"],
            "may_read": subscribe_selectors(me),
            "limits": {"message_length": MAX_MESSAGE_LENGTH,
                       "messages": self.config.rate_messages,
                       "window_s": self.config.rate_window_s},
        }

    async def users(self) -> list[dict[str, object]]:
        users = await self.store.users()
        online = await self.presence.online_among(name for name, _ in users)
        return [{"username": name, "created_at": created, "online": name in online}
                for name, created in users]

    # -- conversations ----------------------------------------------------------------------

    async def room_name(self, name: str) -> str:
        """A room named in a URL, checked (404 when there is none). A name this process
        does not know is looked up once more (another process may have created it)."""
        try:
            checked = check_room_name(name)
        except InvalidInput:
            raise UnknownRoom(f"no room named {name!r}") from None
        if checked not in self._rooms and self.cluster is not None:
            self._rooms = await self.store.room_names()
        if checked not in self._rooms:
            raise UnknownRoom(f"no room named {name!r}")
        return checked

    async def room(self, name: str) -> Conversation:
        return Conversation.of_room(await self.room_name(name))

    async def dm(self, me: str, other: str) -> Conversation:
        """The direct conversation with a user named in a URL (404 when there is none)."""
        try:
            name = check_username(other)
        except InvalidInput:
            raise UnknownUser(f"no user named {other!r}") from None
        if await self.store.user(name) is None:
            raise UnknownUser(f"no user named {other!r}")
        return Conversation.between(me, name)

    async def rooms(self, me: str) -> list[dict[str, object]]:
        rooms = await self.store.rooms(me)
        for room in rooms:
            room["online"] = await self.presence.who(str(room["name"]))
        return rooms

    async def room_info(self, me: str, name: str) -> dict[str, object]:
        room = await self.room_name(name)
        info = await self.store.room(room, me)
        info["online"] = await self.presence.who(room)
        return info

    async def create_room(self, me: str, name: object) -> dict[str, object]:
        checked = check_room_name(name)
        info = await self.store.create_room(checked, me)
        self._rooms.add(checked)
        info["online"] = await self.presence.who(checked)
        return info

    async def join(self, me: str, name: str) -> dict[str, object]:
        return await self.store.join(await self.room_name(name), me)

    async def leave(self, me: str, name: str) -> dict[str, object]:
        return await self.store.leave(await self.room_name(name), me)

    async def members(self, name: str) -> list[str]:
        return await self.store.members(await self.room_name(name))

    async def presence_of(self, name: str) -> dict[str, object]:
        room = await self.room_name(name)
        return {"room": room, "online": await self.presence.who(room)}

    async def dms(self, me: str) -> list[dict[str, object]]:
        conversations = await self.store.dms(me)
        online = await self.presence.online_among(str(c["user"]) for c in conversations)
        for conversation in conversations:
            conversation["online"] = conversation["user"] in online
        return conversations

    # -- messages -------------------------------------------------------------------------------

    async def post(self, me: str, conversation: Conversation, content: object,
                   unchecked: Session | None = None) -> Message:
        """Post as `me`; `unchecked`: `me`'s session, checked in the post's transaction
        (`posting_session`)."""
        text = check_content(content)
        named = mentions(text)
        ask = conversation.room is not None and ASSISTANT in named
        if ask:
            self.replies.check_prompt(text, "content")
        charge = self.limiter.charge(me)  # shared: counted in the message's transaction
        if charge is None:
            await self._charge(me)
        check = None if unchecked is None else (unchecked.sid, time.time())
        message, notified = await self.store.post(conversation, me, text, named, charge,
                                                  check)
        self._posted += 1
        if unchecked is not None:
            self._checked.confirmed(unchecked.sid, unchecked.username)
        if notified:
            log.debug("chat: message %s mentions %s", message.id, notified)
        if ask:
            try:
                await self.replies.answer(me, message)
            except TidingsError as exc:  # the message is posted; only the reply is lost
                log.warning("chat: could not start the assistant's reply to %s: %s",
                            message.id, exc)
        return message

    async def cancel_reply(self, me: str, conversation: Conversation,
                           message_id: str) -> Message:
        return await self.replies.cancel(me, conversation, self._message_id(message_id))

    async def private_reply(self, me: str, conversation: Conversation,
                      prompt: object) -> contextlib.AbstractAsyncContextManager[
                          AsyncIterator[str]]:
        """Check a question for the assistant (422, 429, 503 when none is configured)
        and return its private reply, to open once the response has started."""
        if not isinstance(prompt, str) or not prompt.strip() or "\0" in prompt:
            raise InvalidInput("prompt", "prompt must be a non-empty string")
        self.replies.check_prompt(prompt, "prompt")
        if not self.replies.configured:
            raise ServiceUnavailable("no assistant is configured on this server")
        await self._charge(me)
        return self.replies.private(me, conversation, prompt)

    async def _charge(self, me: str) -> None:
        """Count one message against `me`'s rate limit (429 when it is spent)."""
        wait_s = await self.limiter.hit(me)
        if wait_s:
            raise RateLimited.messages(self.limiter.limit, self.limiter.window_s, wait_s)

    async def history(self, conversation: Conversation, before: str | None,
                      limit: str | None) -> dict[str, object]:
        """Newest first; `next_before` continues with older messages (None: no more).

        `last_event_id` is the hub update the page reflects, read with the messages: a
        window that subscribes with it as Last-Event-ID gets every update after the page
        and none it already has, also in the middle of an assistant reply (the stored
        text is exactly the deltas through that update)."""
        cursor = _positive_int(before, "before") if before else None
        size = _positive_int(limit, "limit") if limit else _DEFAULT_PAGE
        if size > _MAX_PAGE:
            raise InvalidInput("limit", f"limit is at most {_MAX_PAGE}")
        messages, position = await self.store.history(conversation, cursor, size + 1)
        more = len(messages) > size
        messages = messages[:size]
        return {
            **conversation.fields(),
            "messages": [message.to_json() for message in messages],
            "next_before": messages[-1].id if more and messages else None,
            "last_event_id": await self.relay.resume_id(position),
        }

    @staticmethod
    def _message_id(text: str) -> int:
        if not text.isascii() or not text.isdigit() or len(text) > 18:
            raise UnknownMessage(f"no message {text!r}")
        return int(text)

    async def edit(self, me: str, message_id: str, content: object,
                   expected: Conversation | None = None) -> Message:
        text = check_content(content)
        return await self.store.edit(self._message_id(message_id), me, text, expected)

    async def delete(self, me: str, message_id: str,
                     expected: Conversation | None = None) -> Message:
        return await self.store.delete(self._message_id(message_id), me, expected)

    async def mark_read(self, me: str, conversation: Conversation, up_to: object) -> int:
        # A message id is an SQLite rowid: a signed 64-bit integer.
        if up_to is not None and (not isinstance(up_to, int) or isinstance(up_to, bool)
                                  or not 0 <= up_to < 2**63):
            raise InvalidInput("id", "id must be a message id")
        return await self.store.mark_read(me, conversation, up_to)

    # -- ephemeral: typing and presence -----------------------------------------------------

    async def typing(self, me: str, conversation: Conversation) -> bool:
        """Tell the conversation `me` is typing (at most once per `typing_interval_s`).
        Not stored in the chat's history; returns whether an update went out."""
        now = time.monotonic()
        key = (me, conversation.key)
        if now - self._typing.get(key, -1e9) < self.config.typing_interval_s:
            return False
        if len(self._typing) > 10_000:
            cutoff = now - self.config.typing_interval_s
            self._typing = {k: t for k, t in self._typing.items() if t > cutoff}
        self._typing[key] = now
        out = events.typing(conversation, me, int(time.time() * 1000))
        await self.hub.publish(Update.create([out.topic], out.data, private=True))
        return True

    async def _announce_presence(self, room: str | None, online: list[str]) -> None:
        out = events.presence(room, online)
        await self.hub.publish(Update.create([out.topic], out.data, private=True))

    async def stream_user(self, token: str | None) -> str | None:
        """The user of a hub subscription carrying this session token, if it is live."""
        if not token:
            return None
        try:
            return (await self.session(token)).username
        except NoSession:
            return None

    async def stream_rooms(self, topics: list[str]) -> list[str]:
        """The rooms a subscription's topics name (`/chat/rooms/NAME`) that exist."""
        rooms = [topic.removeprefix("/chat/rooms/") for topic in topics
                 if topic.startswith("/chat/rooms/")]
        if self.cluster is not None and not self._rooms.issuperset(rooms):
            self._rooms = await self.store.room_names()  # created on another process?
        return [room for room in rooms if room in self._rooms]

    def stream_opened(self, user: str, rooms: list[str]) -> Connection:
        return self.presence.connect(user, rooms)

    def stream_closed(self, connection: Connection) -> None:
        self.presence.disconnect(connection)

    # -- notifications and tasks --------------------------------------------------------------

    async def notify(self, user: object, message: object, kind: object,
                     sender: str | None = None) -> dict[str, object]:
        if not isinstance(user, str) or not user:
            raise InvalidInput("user", "user must be a username")
        if not isinstance(message, str) or not message.strip():
            raise InvalidInput("message", "message must be a non-empty string")
        if len(message) > _MAX_NOTIFICATION_LENGTH:
            raise InvalidInput("message", f"a notification is at most "
                                          f"{_MAX_NOTIFICATION_LENGTH} characters")
        if kind is None:
            kind = "info"
        if not isinstance(kind, str) or not 0 < len(kind) <= 40:
            raise InvalidInput("type", "type must be a short string (info, warning, ...)")
        try:
            name = check_username(user)
        except InvalidInput:
            raise UnknownUser(f"no user named {user!r}") from None
        fields: dict[str, object] = {
            "id": f"n-{secrets.token_hex(8)}", "kind": kind, "message": message,
            "from": sender, "created_at": now_iso(),
        }
        await self.store.notify(name, fields)
        return {"user": name, "topic": notifications_topic(name), **fields}

    async def export(self, me: str, room: str, fmt: object) -> TaskRow:
        name = await self.room_name(room)
        if fmt is None:
            fmt = "json"
        if fmt not in FORMATS:
            raise InvalidInput("format", f"format is one of {', '.join(FORMATS)}")
        return await self.exports.submit(me, name, str(fmt))

    async def task(self, me: str, task_id: str) -> TaskRow:
        if not task_id.startswith(me + "."):
            raise UnknownTask(f"no task {task_id!r}")  # someone else's: as if absent
        return await self.store.task(task_id)

    async def task_result(self, me: str, task_id: str) -> tuple[TaskRow, bytes]:
        task = await self.task(me, task_id)
        return task, await self.store.task_result(task_id)


def _positive_int(text: str, field: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 18 or int(text) < 1:
        raise InvalidInput(field, f"{field} must be a positive integer")
    return int(text)
