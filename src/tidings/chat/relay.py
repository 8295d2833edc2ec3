"""The relay: publishes the chat's outbox through the hub, in order, exactly once.

It is a tailer (`feeds/tailer.py`) over the outbox: it reads the rows after its cursor,
publishes each as a private update whose id is `chat-EPOCH-SEQ`, and only then drops the
rows and saves the cursor. After a crash it publishes the unsaved rows again; each is the
same update (same id, topics and data), which the hub's transport stores once. So every
committed chat write reaches the hub's history once, and from there every subscriber,
live or resuming with Last-Event-ID.

One relay among processes: the store's database makes this process the relay, or has it
wait while another is (`ChatDatabase.lead`: nothing to wait for on SQLite, which serves
one process; a session advisory lock on PostgreSQL, which another process takes over
within moments of the relay's end). A write through this process's store wakes the relay
at once; writes of other processes wake it through the database (`pg_store.py`). A
history read on a process that does not relay waits for the saved cursor instead.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from tidings.chat.store import ChatStore
from tidings.feeds.tailer import Entry, Tailer
from tidings.hub.hub import EARLIEST, Hub
from tidings.hub.update import Update

__all__ = ["Relay"]


_BATCH = 500
# How long a history read waits for the relay to publish what it reflects (the relay in
# this process wakes it when it has; else it rereads the saved cursor every
# `standby_poll_s` of the database).
_WAIT_S = 10.0


class Relay:
    def __init__(self, store: ChatStore, hub: Hub) -> None:
        self._outbox = _Outbox(store)
        # The hub may refuse (shutting down, a bus that went away) or the database be
        # busy: the rows stay in the outbox and the next attempt starts from the cursor.
        self._tailer = Tailer(self._outbox, hub, what="chat relay", unit="outbox row",
                              batch=_BATCH)

    def wake(self) -> None:
        self._tailer.wake()

    @property
    def leading(self) -> bool:
        """This process relays (one process among those on the chat's tables does)."""
        return self._tailer.leading

    @property
    def published(self) -> int:
        """The newest outbox row this process's relay published (while it leads)."""
        return self._tailer.published

    async def start(self) -> None:
        self._tailer.start()

    async def stop(self) -> None:
        await self._tailer.stop()

    def update_id(self, seq: int) -> str:
        return self._outbox.update_id(seq)

    async def resume_id(self, position: int) -> str:
        """The id to subscribe after (Last-Event-ID) for a read that reflects the outbox
        through `position`: the update of that row, once the hub holds it (a subscriber
        naming an id the hub does not know yet would be replayed everything), or
        `earliest` when the outbox never had a row. ServiceUnavailable when the relay is
        not there in time."""
        if position == 0:
            return EARLIEST
        await self._tailer.wait_published(
            position, self._outbox.saved, timeout_s=_WAIT_S,
            poll_s=self._outbox.store.database.standby_poll_s)
        return self.update_id(position)


class _Outbox:
    """The outbox as the relay's tailer reads it (`tailer.Source`)."""

    def __init__(self, store: ChatStore) -> None:
        self.store = store
        self._found = False  # the last read found rows
        # Where the store runs a save and the next read as one call, a save waits for
        # that read (at once while rows come: `wait` returns when the last read found
        # some). A crash in between republishes the page, as with any unsaved one.
        self._defer_saves = store.database.calls
        self._unsaved: int | None = None

    def update_id(self, seq: int) -> str:
        return f"chat-{self.store.epoch}-{seq}"

    async def saved(self) -> int:
        return await self.store.cursor()

    @contextlib.asynccontextmanager
    async def lead(self, wake: asyncio.Event) -> AsyncIterator[int]:
        async with self.store.database.lead(wake):
            self._found, self._unsaved = False, None
            try:
                yield await self.store.cursor()
            finally:
                if self._unsaved is not None:  # stopping: the next relay need not
                    with contextlib.suppress(Exception):  # republish the last page
                        await self.store.relay_done(self._unsaved)

    async def read(self, after: int, limit: int) -> list[Entry]:
        saving = self._unsaved
        rows = await self.store.relay_read(after, limit, saving)
        if self._unsaved == saving:  # (not a later save, made while this read ran)
            self._unsaved = None
        self._found = bool(rows)
        return [
            (row.seq, Update.create([row.topic], row.data, id=self.update_id(row.seq),
                                    private=True))
            for row in rows
        ]

    async def save(self, cursor: int) -> None:
        if self._defer_saves:
            self._unsaved = cursor
        else:
            await self.store.relay_done(cursor)

    async def wait(self, wake: asyncio.Event) -> None:
        await self.store.database.wait(wake, self._found)
