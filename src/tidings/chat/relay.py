"""The relay: publishes the chat's outbox through the hub, in order, exactly once.

It reads the outbox after its cursor, publishes each row as a private update whose id is
`chat-EPOCH-SEQ`, and only then drops the rows and saves the cursor. After a crash it
publishes the unsaved rows again; each is the same update (same id, topics and data),
which the hub's transport stores once. So every committed chat write reaches the hub's
history once, and from there every subscriber, live or resuming with Last-Event-ID.

A write through the store wakes the relay at once: no polling.
"""

from __future__ import annotations

import asyncio
import contextlib

from tidings.chat.store import ChatStore
from tidings.hub.hub import Hub
from tidings.hub.update import Update
from tidings.retry import run_with_backoff

__all__ = ["Relay"]


_BATCH = 500


class Relay:
    def __init__(self, store: ChatStore, hub: Hub) -> None:
        self._store = store
        self._hub = hub
        self._wake = asyncio.Event()
        self._cursor = 0
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        self._cursor = await self._store.cursor()
        self._task = asyncio.create_task(self._run(), name="tidings-chat-relay")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def update_id(self, seq: int) -> str:
        return f"chat-{self._store.epoch}-{seq}"

    async def _run(self) -> None:
        # The hub may refuse (shutting down, a bus that went away) or the database be
        # busy: the rows stay in the outbox and the next attempt starts from the cursor.
        await run_with_backoff(self._drain_forever, what="chat relay",
                               position=lambda: f"outbox row {self._cursor}")

    async def _drain_forever(self) -> None:
        while True:
            self._wake.clear()
            rows = await self._store.outbox_after(self._cursor, _BATCH)
            if not rows:
                await self._wake.wait()
                continue
            published = self._cursor
            for row in rows:
                await self._hub.publish(Update.create(
                    [row.topic], row.data, id=self.update_id(row.seq), private=True))
                published = row.seq
            await self._store.outbox_done(published)
            self._cursor = published
