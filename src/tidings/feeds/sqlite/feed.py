"""The SQLite change feed: one tailer per file publishes the change log through the hub.

The triggers (`schema.py`) log every change in the writer's transaction; this module
tails that log. One tailer per database file (an advisory file lock picks it among worker
processes) reads the log in `seq` order, publishes each change through the hub with its
resume token as the update id, and saves its cursor in `tidings_feed_state` after the hub
acknowledged. After a crash it republishes from the saved cursor; each republished update
is identical (the data is built from the row alone), and the transport stores it once.

Waking the tailer: a write through the API sets an event at once. For other processes
there is no notification in SQLite (no LISTEN/NOTIFY, and `sqlite3_update_hook` only sees
this process's own connection), so this is the one place in Tidings that polls: every
50 ms it asks `PRAGMA data_version`, which changes when another connection has committed
to the file. That is one cheap read of the in-memory WAL index, no query and no page
read, and it bounds the latency of an external write at 50 ms plus the publish.

Collections defined or watched by another process (`feeds/definitions.py`): a request
that names a collection first asks `PRAGMA data_version`, and only when the file changed,
the registries' version; when that moved, the process rereads the registries. So a
process serves a collection from the first request after its definition committed, and
the tailer rereads them when it meets a registry change in the log. A feed with nothing
to watch does the same every 250 ms, and sets itself up and tails at the first
collection defined or table watched.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from tidings.errors import ServiceUnavailable, TidingsError
from tidings.feeds.backend import decode_change
from tidings.feeds.base import FeedStatus, ResumePoint, Retention
from tidings.feeds.catalog import Catalog
from tidings.feeds.config import CollectionConfig, FeedConfig
from tidings.feeds.definitions import (
    REGISTRY,
    REGISTRY_CAPTURE,
    check_definable,
    definition_update,
)
from tidings.feeds.errors import ConfigError, TokenTooOld, UnknownCollection
from tidings.feeds.sqlite import defined as registry
from tidings.feeds.sqlite.documents import Documents
from tidings.feeds.sqlite.schema import (
    Shape,
    catalog_version,
    ensure_schema,
    high_water,
    install,
    managed_shape,
    read_state,
    table_columns,
    table_shape,
    watched,
)
from tidings.feeds.sqlite.watch import path_of
from tidings.feeds.tailer import Entry, Tailer
from tidings.hub.hub import EARLIEST, Hub
from tidings.hub.update import Update
from tidings.sqlitedb import lock_file, run_on, transaction
from tidings.tasks import cancel_and_wait

__all__ = ["CAPTURE", "SQLiteFeed"]

# How this backend captures changes, as `tidings watch` and /metrics say it: SQLite runs
# one writer at a time, so the log's AUTOINCREMENT order is commit order.
CAPTURE = "trigger log"

log = logging.getLogger(__name__)

_CHANGE_COLUMNS = "seq, coll, op, doc_key, old_doc, new_doc, wall_time"
_BATCH = 500
_POLL_S = 0.05  # PRAGMA data_version interval: the latency bound for external writers
_PRUNE_EVERY_S = 1.0
_RESOLVE_WAIT_S = 10.0
# How often a feed with nothing to watch looks whether another process defined something.
_IDLE_LOOK_S = 0.25


class SQLiteFeed(Documents):
    """The ChangeFeed of a SQLite file (see the module doc)."""

    def __init__(
        self,
        path: str,
        hub: Hub,
        config: FeedConfig,
        *,
        retention: Retention | None = None,
        poll_interval_s: float = _POLL_S,
    ) -> None:
        super().__init__(path_of(path))
        self._hub = hub
        self._file_config = config
        self._retention = retention or Retention()
        self._poll_s = poll_interval_s
        self._log = _FileLog(self._path, self._reader, save=self._save_cursor,
                             to_update=self._update_for, poll_s=poll_interval_s)
        self._tailer = Tailer(self._log, hub, what="change feed", unit="change",
                              batch=_BATCH, after_save=self.prune,
                              after_save_every_s=_PRUNE_EVERY_S)
        self._running = False
        self._idle: asyncio.Task[None] | None = None
        self._data_version = -1  # PRAGMA data_version when the registries were looked at
        self._catalog_version = 0  # theirs, as this process's catalog reflects them
        # Set up at once (a bad configuration is a startup error, not a late surprise);
        # with nothing to watch the feed stays idle and creates nothing in the file.
        self.active = bool(config.collections) or self._reader.execute(
            "SELECT 1 FROM sqlite_master WHERE name = 'tidings_watched'").fetchone() is not None
        if self.active:
            self._setup()

    # -- setup -----------------------------------------------------------------------

    def _setup(self) -> None:
        db = self._writer
        self.epoch = ensure_schema(db)
        with transaction(db):
            merged = self._file_config.merged(watched(db), registry.defined(db))
            shapes = {}
            for name, config in merged.collections.items():
                if config.kind == "table" and name not in self._file_config.collections and (
                        not table_columns(db, name)):
                    log.warning("watched table %s no longer exists: skipped", name)
                    continue
                shapes[name] = install(db, config)
            install(db, REGISTRY_CAPTURE)
            self._catalog_version = catalog_version(db)
        self._catalog = Catalog(shapes)

    def _activate(self) -> None:
        """The first collection of a feed that had nothing to watch: set up, tail."""
        if not self._running:
            raise ServiceUnavailable("the change feed is not running")
        self._setup()
        self.active = True
        self._start_tailing()

    # -- the registries (feeds/definitions.py) ---------------------------------------

    def _look(self) -> None:
        """Learn what other connections changed in the registries (module doc)."""
        if not self._running:
            return
        version = int(self._reader.execute("PRAGMA data_version").fetchone()[0])
        if version == self._data_version:
            return
        self._data_version = version
        if catalog_version(self._reader) == self._catalog_version:
            return
        if self.active:
            self._refresh()
        else:
            self._activate()

    def _refresh(self) -> None:
        """Reread the registries: the collections defined and the tables watched now."""
        db = self._reader
        with transaction(db, "DEFERRED"):
            version = catalog_version(db)
            merged = self._file_config.merged(watched(db), registry.defined(db))
            shapes: dict[str, Shape] = {}
            for name, config in merged.collections.items():
                shape = self._shape(db, config)
                if shape is not None:
                    shapes[name] = shape
        self._catalog = Catalog(shapes)
        self._catalog_version = version

    def _shape(self, db: sqlite3.Connection, config: CollectionConfig) -> Shape | None:
        known = self._catalog.find(config.name)
        if known is not None and (config.name in self._file_config.collections
                                  or known.config.same_as(config)):
            return known
        if config.kind == "managed":
            return managed_shape(config)  # its table was made with its definition
        try:
            return table_shape(db, config)
        except ConfigError as exc:
            log.warning("cannot serve watched table %s: %s", config.name, exc)
            return None

    def _reread(self) -> None:
        """The tailer met a registry change, or a collection it does not know."""
        if catalog_version(self._reader) != self._catalog_version:
            self._refresh()

    @property
    def collections(self) -> Mapping[str, CollectionConfig]:
        self._look()
        return self._catalog.configs

    def collection(self, name: str) -> CollectionConfig:
        self._look()
        return self._catalog.get(name).config

    async def define(self, config: CollectionConfig) -> bool:
        check_definable(self._file_config, config.name)
        self._look()
        if not self.active:
            self._activate()
        created = await self._write(registry.define, self._writer, config)
        self._refresh()
        return created

    async def undefine(self, name: str) -> None:
        check_definable(self._file_config, name)
        self._look()
        if not self.active:
            raise UnknownCollection(f"no collection named {name!r} is defined")
        await self._write(registry.undefine, self._writer, name)
        self._refresh()

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        self._running = True
        self._data_version = int(self._reader.execute("PRAGMA data_version").fetchone()[0])
        if self.active:
            self._start_tailing()
        else:
            self._idle = asyncio.create_task(self._until_active(), name="tidings-feed-idle")

    async def _until_active(self) -> None:
        """With nothing to watch, look at the file now and then, so that a collection
        defined (or a table watched) by another process is tailed even before a request
        here names it; from then on the tailer looks (module doc)."""
        while not self.active:
            await asyncio.sleep(_IDLE_LOOK_S)
            try:
                self._look()
            except (TidingsError, sqlite3.Error) as exc:
                log.warning("change feed: cannot set up %s yet: %s", self._path, exc)

    def _start_tailing(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="tidings-feed")
        self._tailer.start()

    async def stop(self) -> None:
        self._running = False
        idle, self._idle = self._idle, None
        await cancel_and_wait(idle)
        await self._tailer.stop()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._log.close()
        self._writer.close()
        self._reader.close()

    def _written(self) -> None:
        self._tailer.wake()  # the tailer reads the write's change at once

    def status(self) -> FeedStatus:
        return FeedStatus("sqlite", CAPTURE, self._tailer.leading, self._tailer.published,
                          None)

    # -- resuming ------------------------------------------------------------------------

    async def resolve(self, token: str) -> ResumePoint:
        parsed = self._parse_token(token)
        db = self._reader
        with transaction(db, "DEFERRED"):
            high = high_water(db)
            pruned = read_state(db, "pruned_through")
        self._check_in_log(parsed, high, pruned)
        await self._tailer.wait_published(parsed.seq, self._saved_cursor,
                                          timeout_s=_RESOLVE_WAIT_S, poll_s=self._poll_s)
        transport = self._hub.transport
        if parsed.seq == 0:
            published = await self._tailer.published_through(self._saved_cursor)
            if published >= 1 and await transport.find(str(self._token(1))) is None:
                raise TokenTooOld("the hub's history no longer holds the first change")
            return ResumePoint(parsed, EARLIEST)
        if await transport.find(str(parsed)) is None:
            raise self._history_lost(parsed.seq)
        return ResumePoint(parsed, str(parsed))

    async def _saved_cursor(self) -> int:
        """The cursor the tailing process saved (this one, or another)."""
        return read_state(self._reader, "cursor")

    # -- the tailer ------------------------------------------------------------------------

    def _update_for(self, row: tuple[Any, ...]) -> Update | None:
        change = decode_change(row)
        if change is None:
            return None
        if change.collection == REGISTRY:
            self._reread()  # before the new collection's first change is published
            return definition_update(change, db=self._db_name, epoch=self.epoch)
        shape = self._catalog.find(change.collection, any_case=True)
        if shape is None:
            self._reread()
            shape = self._catalog.find(change.collection, any_case=True)
        return self._publishable(change, shape)

    async def _save_cursor(self, seq: int) -> None:
        # On the writer thread, without the wake-up of an API write: nothing new to read.
        await run_on(self._executor, "the change feed", self._writer.execute,
                     "UPDATE tidings_feed_state SET value = ? WHERE name = 'cursor'",
                     (str(seq),))

    # -- retention ---------------------------------------------------------------------------

    async def prune(self) -> int:
        published = self._tailer.published if self._tailer.leading else 0
        return await self._write(self._prune_sync, published)

    def _prune_sync(self, published: int) -> int:
        db = self._writer
        retention = self._retention
        with transaction(db):
            pruned = read_state(db, "pruned_through")
            limit = min(published, high_water(db) - retention.size)
            if retention.max_age_s > 0:
                row = db.execute(
                    "SELECT MAX(seq) FROM tidings_changes WHERE seq <= ? AND wall_time < "
                    "strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?)",
                    (published, f"-{retention.max_age_s} seconds")).fetchone()
                limit = max(limit, int(row[0] or 0))
            if limit <= pruned:
                return 0
            removed = db.execute("DELETE FROM tidings_changes WHERE seq <= ?",
                                 (limit,)).rowcount
            db.execute("UPDATE tidings_feed_state SET value = ? WHERE name = 'pruned_through'",
                       (str(limit),))
        if removed:
            log.debug("change feed: pruned %d changes (through %d)", removed, limit)
        return int(removed)


class _FileLog:
    """The file's change log as the tailer reads it (`tailer.Source`).

    One tailer per file: an advisory lock beside it. Another process holding it tails for
    everyone; this one takes over when that process ends. New changes are noticed by the
    wake-up of a write through this process's API, or by `PRAGMA data_version` (module
    doc)."""

    def __init__(
        self,
        path: str,
        reader: sqlite3.Connection,
        *,
        save: Callable[[int], Awaitable[None]],
        to_update: Callable[[tuple[Any, ...]], Update | None],
        poll_s: float,
    ) -> None:
        self._path = path
        self._reader = reader
        self._save = save
        self._to_update = to_update
        self._poll_s = poll_s
        self._lock_fd: int | None = None
        self._version = 0  # data_version as of the last read

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the tailer lock
            self._lock_fd = None

    @contextlib.asynccontextmanager
    async def lead(self, wake: asyncio.Event) -> AsyncIterator[int]:
        if self._lock_fd is None:  # held until close(), across the tailer's retries
            await self._lock()
        cursor = read_state(self._reader, "cursor")
        log.info("change feed: tailing %s after change %s", self._path, cursor)
        yield cursor

    async def read(self, after: int, limit: int) -> list[Entry]:
        self._version = self._data_version()  # before the read: a later commit changes it
        rows = self._reader.execute(
            f"SELECT {_CHANGE_COLUMNS} FROM tidings_changes WHERE seq > ? "
            f"ORDER BY seq LIMIT ?", (after, limit)).fetchall()
        return [(int(row[0]), self._to_update(row)) for row in rows]

    async def save(self, cursor: int) -> None:
        await self._save(cursor)

    async def wait(self, wake: asyncio.Event) -> None:
        """Wait for a write through the API (at once) or by any other connection (seen
        by `PRAGMA data_version` within one poll interval)."""
        while True:
            try:
                async with asyncio.timeout(self._poll_s):
                    await wake.wait()
                return
            except TimeoutError:
                if self._data_version() != self._version:
                    return

    def _data_version(self) -> int:
        return int(self._reader.execute("PRAGMA data_version").fetchone()[0])

    async def _lock(self) -> None:
        self._lock_fd = await lock_file(
            self._path + ".tidings-feed-lock",
            waiting=f"change feed: another process tails {self._path}; this one stands by")
