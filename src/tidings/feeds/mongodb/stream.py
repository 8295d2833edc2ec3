"""One collection's change stream as the tailer reads it (`tailer.Source`).

The tailer publishes what `read` returns and then calls `save`; only then is the resume
token stored (`state.py`), so a crash republishes at most the last batch. What this
source adds to the tailer, each for a reason a real deployment has too:

* **One stream per collection among processes**: `lead` holds the collection's lease and
  opens the stream after the saved token (`startAfter` after an invalidate). The first
  time ever it opens from now and saves that position at once, so changes made while
  Tidings is down later are not lost.
* **Exactly once**: after every (re)open, the changes the hub's history already holds
  (published before a crash, not yet saved) are not published again. The check is by
  id and content less `wallTime`, because a server may describe a change differently the
  second time (nx-27017's `wallTime` is the time of the read) and may give a token again
  to another change (nx-27017 after a drop emptied its change log).
* **Paced reads**: a real server holds an empty getMore for `maxAwaitTimeMS`; a server
  that answers at once (nx-27017) would make a busy loop, so `wait` sleeps what is left
  of `PACE_S` since the read began. Latency stays under `PACE_S`.
* **A stream that ended**: one that is no longer alive without an error (nx-27017 after
  a restart) is reopened after the last token read; a server error ends the lead and the
  tailer starts over (with backoff) from the saved token.
* **A token the server no longer has** (ChangeStreamHistoryLost): the changes since are
  lost to everyone; an `event: error` is published on the collection (what a watch with
  a token too old gets) and a new stream starts from now.
* **invalidate** (collection dropped or renamed) is published and ends the stream; the
  next one starts after it (`startAfter`), so a collection created again is watched again.
  A collection that disappears while its stream reports nothing (nx-27017 sends no drop
  events) gets the invalidate from Tidings, after one more empty read to let a server that
  does send one say so first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from tidings.errors import ServiceUnavailable
from tidings.feeds.config import CollectionConfig
from tidings.feeds.mongodb.driver import HISTORY_LOST, OperationFailure
from tidings.feeds.mongodb.events import change_update, stream_event
from tidings.feeds.mongodb.state import StreamStates
from tidings.feeds.tailer import Entry
from tidings.hub.transport import Transport
from tidings.hub.update import Update

__all__ = ["PACE_S", "ChangeStreamSource"]

log = logging.getLogger(__name__)

PACE_S = 0.1  # at most this many seconds between getMores while the stream is idle
_AWAIT_MS = 1000  # maxAwaitTimeMS: how long a real server holds an empty getMore
_CHECK_EXISTS_S = 1.0  # how often an idle stream checks its collection is still there
_SAVE_IDLE_S = 10.0  # how often an idle stream saves the server's newer position


class ChangeStreamSource:
    """See the module doc. `last_id` is the newest update this source had published (or
    found published), for snapshots taken while it leads."""

    def __init__(self, database: Any, config: CollectionConfig, *, db_name: str,
                 states: StreamStates, transport: Transport) -> None:
        self._database = database
        self._collection = database[config.name]
        self._config = config
        self._db_name = db_name
        self._states = states
        self._transport = transport
        self._stream: Any = None
        self._resume: str | None = None  # the server token after the last change read
        self._start_after = False
        self._verify = False
        self._lost = asyncio.Event()
        self._positions: dict[int, tuple[str, bool, str | None]] = {}
        self._count = 0
        self._read_began = 0.0
        self._existed = False
        self._missing = False
        self._checked_at = 0.0
        self._saved_at = 0.0
        self._saved_token: str | None = None
        self._pending: list[Entry] = []
        self.last_id: str | None = None

    @property
    def name(self) -> str:
        return self._config.name

    # -- tailer.Source ---------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lead(self, wake: asyncio.Event) -> AsyncIterator[int]:
        async with self._states.lease(self.name) as lost:
            saved = await self._states.load(self.name)
            self._lost = lost
            self._resume, self._start_after = saved.token, saved.start_after
            self._saved_token = saved.token
            self._positions.clear()
            self._pending.clear()
            self._count = 0
            try:
                await self._open()
                if saved.token is None:  # the first time ever: from now, kept at once
                    await self._save_position()
                log.info("MongoDB stream %s: watching after %s", self.name, self._resume)
                yield 0
            finally:
                await self._close()

    async def read(self, after: int, limit: int) -> list[Entry]:
        if self._lost.is_set():
            raise ServiceUnavailable(f"MongoDB stream {self.name}: the lease was lost")
        self._read_began = time.monotonic()
        out, self._pending = self._pending, []
        if self._stream is None or not self._stream.alive:
            if self._stream is not None:
                log.warning("MongoDB stream %s ended without an error (the server "
                            "restarted?): reopening after %s", self.name, self._resume)
            await self._close()
            await self._open()
        while len(out) < limit:
            change = await self._stream.try_next()
            if change is None:
                break
            token = str(change["_id"]["_data"])
            operation = change.get("operationType")
            update = change_update(change, config=self._config, db=self._db_name, token=token)
            out.append(await self._entry(update, token, start_after=operation == "invalidate"))
            if operation in ("insert", "update", "replace"):
                self._existed = True
            if operation == "invalidate":
                log.info("MongoDB stream %s invalidated (dropped or renamed)", self.name)
                await self._close()  # the next read opens one after it
                self._existed = self._missing = False
                break
        if not out:
            out = await self._idle()
        return out

    async def save(self, cursor: int) -> None:
        done = sorted(p for p in self._positions if p <= cursor)
        ids = [self._positions[p][2] for p in done if self._positions[p][2] is not None]
        token, start_after, _ = self._positions[cursor]
        await self._states.save(self.name, token, start_after=start_after,
                                first=ids[0] if ids else None, last=ids[-1] if ids else None)
        for position in done:
            del self._positions[position]
        self._saved_token, self._saved_at = token, time.monotonic()

    async def wait(self, wake: asyncio.Event) -> None:
        remaining = PACE_S - (time.monotonic() - self._read_began)
        if remaining > 0:
            await asyncio.sleep(remaining)

    # -- the stream -------------------------------------------------------------------------

    async def _open(self) -> None:
        options: dict[str, Any] = {}
        if self._resume is not None:
            key = "start_after" if self._start_after else "resume_after"
            options[key] = {"_data": self._resume}
        try:
            self._stream = await self._watch(**options)
        except OperationFailure as exc:
            if exc.code not in HISTORY_LOST or self._resume is None:
                raise
            lost_after = self._resume
            log.error("MongoDB stream %s: the server no longer has the changes after %s "
                      "(%s); starting from now", self.name, lost_after, exc)
            self._stream = await self._watch()
            error = stream_event(
                self._config, db=self._db_name, update_id=f"{lost_after}~lost",
                error=f"MongoDB no longer holds the changes of {self.name} after "
                      f"{lost_after}: some were lost; load a new snapshot")
            self._pending.append(await self._entry(error, self._token_now(), start_after=False))
        self._resume = self._token_now()
        self._start_after = False
        self._verify = True

    async def _watch(self, **options: Any) -> Any:
        return await self._collection.watch(full_document="updateLookup",
                                            max_await_time_ms=_AWAIT_MS, **options)

    def _token_now(self) -> str:
        token = self._stream.resume_token if self._stream is not None else None
        if isinstance(token, Mapping) and isinstance(token.get("_data"), str):
            return str(token["_data"])
        return self._resume or ""

    async def _close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            with contextlib.suppress(Exception):  # closing a broken stream: nothing to keep
                await stream.close()

    async def _entry(self, update: Update | None, token: str, *, start_after: bool) -> Entry:
        """The next position: `update` (None when the hub's history holds it already, see
        the module doc), and where the stream resumes once it is published."""
        if update is not None and self._verify:
            if _same_change(await self._transport.find(update.id), update):
                self.last_id = update.id
                update = None
            else:
                self._verify = False  # in order: everything after this is new too
        if update is not None:
            self.last_id = update.id
        self._count += 1
        self._resume, self._start_after = token, start_after
        self._positions[self._count] = (token, start_after, None if update is None else
                                        update.id)
        return self._count, update

    async def _idle(self) -> list[Entry]:
        """An empty read: keep the server's newer position now and then (a quiet
        collection's token must not fall out of the oplog), and notice a collection that
        is gone while the server says nothing."""
        now = time.monotonic()
        if now - self._checked_at < _CHECK_EXISTS_S:
            return []
        self._checked_at = now
        if self._stream is not None and self._token_now() != self._saved_token and (
                now - self._saved_at >= _SAVE_IDLE_S):
            await self._save_position()
        # Checked here too: nx-27017 ignores the filter and lists every collection.
        names = await self._database.list_collection_names(filter={"name": self.name})
        if self.name in names:
            self._existed, self._missing = True, False
            return []
        if not self._existed:
            return []
        if not self._missing:  # once more: a server that reports drops says so first
            self._missing = True
            return []
        log.info("MongoDB stream %s: the collection is gone; publishing invalidate",
                 self.name)
        token = self._token_now()
        self._existed = self._missing = False
        update = stream_event(self._config, db=self._db_name, update_id=f"{token}~gone")
        entry = await self._entry(update, token, start_after=True)
        await self._close()
        return [entry]

    async def _save_position(self) -> None:
        token = self._token_now()
        await self._states.save(self.name, token, start_after=self._start_after)
        self._saved_token, self._saved_at = token, time.monotonic()


def _same_change(stored: Update | None, update: Update) -> bool:
    """`stored` is the change `update` describes (see the module doc)."""
    if stored is None or stored.topics != update.topics or stored.type != update.type:
        return False
    try:
        before, now = json.loads(stored.data), json.loads(update.data)
    except ValueError:
        return False
    if isinstance(before, dict) and isinstance(now, dict):
        before.pop("wallTime", None)
        now.pop("wallTime", None)
    return bool(before == now)
