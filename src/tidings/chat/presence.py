"""Who is online, and in which rooms: a registry of chat connections. Pure, no I/O.

A chat connection is one `EventSource` a signed-in user holds open on the hub. Its room
selectors (`topic=/chat/rooms/NAME`) say which rooms it is in, which is the Mercure
`--subscriptions` idea (a subscription to a topic is presence on it) limited to chat
topics and keyed by the user instead of the connection. A user is online in a room while
at least one of their connections subscribes to it, and online at all while they have any
connection.

`PresenceTracker` adds the timing: arrivals are announced at once, departures only after a
grace period (a page that reconnects after a network blip does not flicker offline), and
only real changes of a room's online set are published.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from tidings.tasks import cancel_and_wait

__all__ = ["Connection", "Presence", "PresenceRegistry", "PresenceTracker"]

log = logging.getLogger(__name__)

_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class Connection:
    id: int
    user: str
    rooms: frozenset[str]


class PresenceRegistry:
    def __init__(self) -> None:
        self._connections: dict[int, Connection] = {}
        self._per_room: dict[str, Counter[str]] = {}
        self._per_user: Counter[str] = Counter()

    def connect(self, user: str, rooms: Iterable[str]) -> Connection:
        connection = Connection(next(_ids), user, frozenset(rooms))
        self._connections[connection.id] = connection
        self._per_user[user] += 1
        for room in connection.rooms:
            self._per_room.setdefault(room, Counter())[user] += 1
        return connection

    def disconnect(self, connection: Connection) -> bool:
        if self._connections.pop(connection.id, None) is None:
            return False
        self._per_user[connection.user] -= 1
        if self._per_user[connection.user] <= 0:
            del self._per_user[connection.user]
        for room in connection.rooms:
            counts = self._per_room[room]
            counts[connection.user] -= 1
            if counts[connection.user] <= 0:
                del counts[connection.user]
            if not counts:
                del self._per_room[room]
        return True

    def online(self, room: str | None = None) -> list[str]:
        """The users online in `room` (None: anywhere), sorted."""
        counts = self._per_user if room is None else self._per_room.get(room, Counter())
        return sorted(counts)

    def is_online(self, user: str) -> bool:
        return user in self._per_user

    def connections(self) -> list[Connection]:
        return list(self._connections.values())

    def __len__(self) -> int:
        return len(self._connections)


Announce = Callable[[str | None, list[str]], Awaitable[None]]


class Presence(Protocol):
    """What the chat service needs of presence: this process's tracker (one process), or
    `shared_presence.SharedPresence` (several processes sharing PostgreSQL)."""

    registry: PresenceRegistry

    def connect(self, user: str, rooms: Iterable[str]) -> Connection: ...

    def disconnect(self, connection: Connection) -> None: ...

    async def who(self, room: str | None = None) -> list[str]:
        """The users online in `room` (None: anywhere), sorted."""

    async def online_among(self, users: Iterable[str]) -> set[str]: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class PresenceTracker:
    """The registry, plus announcing changes through `announce(room, online)` (room None:
    the global list)."""

    def __init__(self, announce: Announce, grace_s: float = 2.0) -> None:
        self.registry = PresenceRegistry()
        self._announce = announce
        self._grace_s = grace_s
        self._announced: dict[str | None, list[str]] = {}
        self._dirty: set[str | None] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._handles: set[asyncio.TimerHandle] = set()
        self._lock = asyncio.Lock()  # announcements go out in the order they were decided
        self._closed = False

    def connect(self, user: str, rooms: Iterable[str]) -> Connection:
        connection = self.registry.connect(user, rooms)
        self._changed([None, *connection.rooms], 0.0)
        return connection

    def disconnect(self, connection: Connection) -> None:
        if self.registry.disconnect(connection):
            self._changed([None, *connection.rooms], self._grace_s)

    async def who(self, room: str | None = None) -> list[str]:
        return self.registry.online(room)

    async def online_among(self, users: Iterable[str]) -> set[str]:
        return {user for user in users if self.registry.is_online(user)}

    async def start(self) -> None:
        """Nothing to start: the tracker lives in memory."""

    def _changed(self, rooms: list[str | None], delay_s: float) -> None:
        if self._closed:
            return
        self._dirty.update(rooms)
        loop = asyncio.get_running_loop()
        if delay_s <= 0:
            self._spawn()
            return
        handle: asyncio.TimerHandle | None = None

        def fire() -> None:
            if handle is not None:
                self._handles.discard(handle)
            self._spawn()

        handle = loop.call_later(delay_s, fire)
        self._handles.add(handle)

    def _spawn(self) -> None:
        if self._closed:
            return
        task = asyncio.get_running_loop().create_task(self._flush())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush(self) -> None:
        async with self._lock:
            dirty, self._dirty = self._dirty, set()
            # The global list first, then rooms by name: a stable order.
            for room in sorted(dirty, key=lambda r: (r is not None, r or "")):
                online = self.registry.online(room)
                if self._announced.get(room, []) == online:
                    continue
                self._announced[room] = online
                try:
                    await self._announce(room, online)
                except Exception as exc:  # the hub is shutting down: best effort
                    log.debug("presence of %s not announced: %r", room, exc)

    async def close(self) -> None:
        self._closed = True
        for handle in self._handles:
            handle.cancel()
        self._handles.clear()
        await cancel_and_wait(*self._tasks)
