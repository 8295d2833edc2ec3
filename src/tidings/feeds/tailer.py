"""The tailer: publishes a log through the hub, in order, exactly once.

The change feeds (SQLite, PostgreSQL) and the chat relay all do the same thing with a log
they own: read the entries after a cursor, publish each one's update through the hub,
and save the cursor only after the hub acknowledged. A crash between publishing and
saving republishes the unsaved entries; each is the same update (same id, built from the
entry alone), which the hub's transport stores once. So every committed entry reaches
the hub's history exactly once, and from there every subscriber, live or resuming.

This module is that loop, once. It publishes a page of entries at once (`publish_many`:
one commit for the page where the hub's transport can), in order; where the source
allows, it reads the next page while one is published, and where a read costs about the
same for one entry as for a page, it reads a steady stream in pages: at most every
`busy_read_every_s` while entries keep coming (the first after a quiet spell, and the
rest of a full page, at once). A backend (`Source`)
says how to read and how to save, how to wait for more (an event set by its own writes,
a NOTIFY, a poll), and how to become the one tailer among processes (a file lock, a
session advisory lock, or nothing). The loop runs under `run_with_backoff`: when the
source fails (a lost connection, a busy database, a hub that refuses), it starts over
from the saved cursor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from tidings.errors import ServiceUnavailable
from tidings.hub.hub import Hub
from tidings.hub.update import Update
from tidings.retry import run_with_backoff

__all__ = ["Entry", "Source", "Tailer"]

log = logging.getLogger(__name__)

# How long `stop` waits for the loop to end before cancelling it again.
_STOP_AGAIN_S = 1.0

# One entry of the log: its position, and the update to publish for it (None: nothing to
# publish, e.g. an entry that cannot be read; the cursor still moves past it).
Entry = tuple[int, Update | None]


class Source(Protocol):
    """What a tailer needs from the log it publishes."""

    def lead(self, wake: asyncio.Event) -> AbstractAsyncContextManager[int]:
        """Become the one tailer of this log (waiting while another process is), for as
        long as the context lasts; yields the saved cursor. Raises when that fails. A
        source that is notified of new entries (or of losing its connection) sets `wake`
        meanwhile."""
        ...

    async def read(self, after: int, limit: int) -> Sequence[Entry]:
        """At most `limit` entries after position `after`, in order."""
        ...

    async def save(self, cursor: int) -> None:
        """Everything through `cursor` is in the hub's history: remember that."""
        ...

    async def wait(self, wake: asyncio.Event) -> None:
        """Return when there may be entries the last read did not see: at once when
        `wake` is set (it was cleared before that read), else by the source's own means
        (a notification, a poll, or a timeout to look again)."""
        ...


class Tailer:
    """Publishes `source` through `hub` in a task of its own (see the module doc)."""

    def __init__(
        self,
        source: Source,
        hub: Hub,
        *,
        what: str,
        unit: str,
        batch: int = 500,
        after_save: Callable[[], Awaitable[object]] | None = None,
        after_save_every_s: float = 0.0,
        read_ahead: bool = False,
        busy_read_every_s: float = 0.0,
    ) -> None:
        self._source = source
        self._hub = hub
        self._what = what  # for logs: "change feed"
        self._unit = unit  # for logs: what a position counts, "change"
        self._batch = batch
        self._after_save = after_save
        self._after_save_every_s = after_save_every_s
        self._last_after_save = 0.0
        # Read the next page while one is published: for a source whose `read`
        # may run beside its `save` and the hub's commit (it reads on a connection of
        # its own).
        self._read_ahead = read_ahead
        # While entries keep coming, read at most this often: for a source whose read
        # costs about the same for one entry as for a page, so that a steady stream is
        # read in pages, not one by one. The first entry after a quiet spell, and the
        # rest of a full page, are read at once.
        self._busy_read_every_s = busy_read_every_s
        self._found_at = 0.0  # when the last read that found entries began
        self._full = False  # the last read's page was full
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.leading = False
        self.published = 0  # the newest position the hub acknowledged (while leading)

    def wake(self) -> None:
        """There are new entries (this process wrote them): read at once."""
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"tidings-{self._what}".replace(
            " ", "-"))

    async def stop(self) -> None:
        task, self._task = self._task, None
        while task is not None and not task.done():
            # Again if need be: a cancellation that library code swallowed on the way
            # out (while closing a connection, say) must not leave the loop running.
            task.cancel()
            await asyncio.wait({task}, timeout=_STOP_AGAIN_S)
        if task is not None and not task.cancelled() and task.exception() is not None:
            log.warning("the %s ended with %r", self._what, task.exception())

    async def published_through(self, saved: Callable[[], Awaitable[int]]) -> int:
        """How far the log is published: by this tailer while it leads, else the saved
        cursor of the process that does (`saved()`)."""
        return self.published if self.leading else await saved()

    async def wait_published(
        self,
        position: int,
        saved: Callable[[], Awaitable[int]],
        *,
        timeout_s: float,
        poll_s: float,
    ) -> None:
        """Wait (at most `timeout_s`) until `position` is published: by this tailer, or,
        while another process tails, by its saved cursor (`saved()`, read every `poll_s`).
        ServiceUnavailable when it is not in time."""
        deadline = time.monotonic() + timeout_s
        while await self.published_through(saved) < position:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServiceUnavailable(f"the {self._what} is behind; try again")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, poll_s)):
                    await self._progress.wait()

    # -- the loop --------------------------------------------------------------------------

    async def _run(self) -> None:
        await run_with_backoff(self._lead, what=self._what,
                               position=lambda: f"{self._unit} {self.published}")

    async def _lead(self) -> None:
        async with self._source.lead(self._wake) as cursor:
            self.published = cursor
            self.leading = True
            try:
                await self._tail()
            finally:
                self.leading = False

    async def _tail(self) -> None:
        source = self._source
        ahead: asyncio.Task[Sequence[Entry]] | None = None
        try:
            while True:
                if ahead is None:
                    # Cleared before reading: an entry written while we read or publish
                    # makes the wait below return at once.
                    self._wake.clear()
                    entries = await self._read(self.published)
                else:
                    entries, ahead = await ahead, None
                if self._read_ahead and entries:
                    # Entries are coming: read the next page while this one is published
                    # (the read and the hub's commit wait on different connections); it
                    # is published only after this one is.
                    self._wake.clear()
                    ahead = asyncio.create_task(self._read(entries[-1][0]))
                # The page in one go (one commit where the transport can batch): what is
                # stored if this fails is a prefix, which the next attempt stores again.
                await self._hub.publish_many([update for _, update in entries
                                              if update is not None])
                if entries:
                    self.published = entries[-1][0]
                    # Saved only after the hub acknowledged: a crash before this
                    # republishes the page, and the transport stores each identical
                    # update once.
                    await source.save(self.published)
                    self._notify_progress()
                    await self._housekeeping()
                if ahead is None and len(entries) < self._batch:
                    await source.wait(self._wake)
        finally:
            if ahead is not None:  # this attempt failed or is stopped: the next one
                ahead.cancel()     # reads that page again
                await asyncio.wait({ahead})
                if not ahead.cancelled():
                    ahead.exception()  # retrieved, so not logged as never retrieved

    async def _read(self, after: int) -> Sequence[Entry]:
        if not self._full:
            busy = self._found_at + self._busy_read_every_s - time.monotonic()
            if busy > 0:
                await asyncio.sleep(busy)
        started = time.monotonic()
        entries = await self._source.read(after, self._batch)
        if entries:
            self._found_at = started
        self._full = len(entries) >= self._batch
        return entries

    def _notify_progress(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    async def _housekeeping(self) -> None:
        if self._after_save is None:
            return
        if time.monotonic() - self._last_after_save >= self._after_save_every_s:
            self._last_after_save = time.monotonic()
            await self._after_save()
