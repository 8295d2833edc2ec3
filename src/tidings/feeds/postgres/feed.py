"""The PostgreSQL change feed: one tailer among all processes publishes the change log.

The trigger (`capture.py`) logs every change in the writer's transaction; this module
tails that log. One tailer per schema among all processes: it holds a session-level
advisory lock on a connection of its own (another process waits in `pg_advisory_lock` and
takes over when that session ends). It reads the log batch by batch after its cursor
(`tidings_read` ticks when no batch is stored past it), publishes each change through the
hub with its resume token as the update id, and saves its cursor after the hub
acknowledged. While changes come it looks again every few ms; after a quiet spell it
sleeps until a writer NOTIFYs it (`capture.py`, "Waking the tailer"), looking again every
few seconds all the same. After a crash it republishes from the saved cursor; each
republished update is identical (built from the row and its position, which the stored
ticks fix) and the transport stores it once.

Collections defined or watched while it runs (`feeds/definitions.py`): every process
LISTENs on the schema's catalog channel on a connection of its own and rereads the
registries when a change of them commits (and after it reconnects, in case it missed
one). A process that had nothing to watch then sets the feed up and starts tailing.

With logical decoding (`--pg-capture`, `decoding.py`) there is no trigger and no NOTIFY:
before each read the tailer copies the slot's changes into the log and ticks (`_step`),
and while idle it waits for the WAL's insert position to pass its last step's, in the
server (`tidings_wal_moved`, at most _WAL_WAIT_S a call). Start-up chooses the capture
and switches a schema written the other way (`_setup`); a process that switched
NOTIFYs the catalog channel, so every tailer rereads the schema's capture mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from tidings.errors import ServiceUnavailable
from tidings.feeds.backend import decode_change
from tidings.feeds.base import FeedStatus, ResumePoint, Retention
from tidings.feeds.catalog import Catalog
from tidings.feeds.config import CollectionConfig, FeedConfig
from tidings.feeds.definitions import REGISTRY, check_definable, definition_update
from tidings.feeds.errors import ConfigError, TokenTooOld, UnknownCollection
from tidings.feeds.postgres import defined as definitions
from tidings.feeds.postgres.capture import CAPTURE
from tidings.feeds.postgres.decoding import (
    GAP_TOPIC,
    LOGICAL,
    SlotLost,
    flush_wal,
    logical_possible,
    lsn_text,
    lsn_value,
)
from tidings.feeds.postgres.documents import Documents
from tidings.feeds.postgres.registry import catalog_channel, defined, ensure_registry, notify
from tidings.feeds.postgres.schema import Shape, managed, table_columns, table_shape
from tidings.feeds.postgres.stream import SlotStream, StreamUnavailable
from tidings.feeds.postgres.watch import current_log, install, watched
from tidings.feeds.tailer import Entry, Tailer
from tidings.hub.hub import EARLIEST, Hub
from tidings.hub.update import Update
from tidings.pgdb import (
    COMMAND_TIMEOUT_S,
    Connection,
    LockNotAvailable,
    Pool,
    close_pool,
    close_quietly,
    connect,
    leading,
    open_pool,
    setting_up,
    split_url,
)
from tidings.retry import run_with_backoff
from tidings.tasks import cancel_and_wait

__all__ = ["PostgresFeed"]

log = logging.getLogger(__name__)

_BATCH = 500
# While changes come, the tailer looks for more this often (one `tidings_read` each: when
# nothing is new, a lock and two index probes, no write).
_POLL_S = 0.002
# After this long without a change it tries to sleep until a writer NOTIFYs it.
_QUIET_S = 0.05
# Asleep, it looks all the same this often (a bound, should a wake-up go missing).
_RECHECK_S = 5.0
# Logical decoding, idle: how long one wait for new WAL lasts at most, in the server
# (which looks every 2 ms): a wake-up of this process's own is seen within it.
_WAL_WAIT_S = 0.25
# The slot streamed, idle: how long a look waits for the stream to show the flushed WAL
# (the WAL sender decodes it first; longer: a step), and how often it looks at most.
_STREAM_LOOK_S = 0.1
_STREAM_LOOK_EVERY_S = 0.005
# While changes keep coming, the tailer reads (and, decoding, steps) at most this often
# (`Tailer`'s `busy_read_every_s`). A read costs about the same whether it finds two
# changes or two hundred (a tick and its commit; decoding: the step's transaction, and
# with SQL functions two decoding contexts; the hub's commit of the page),
# and read back to back under a steady stream it found a few each time: at 4,000
# single-row commits a second, 20 ms cut what capture costs per change by half and more
# (`scripts/pg-tailer-cpu`, docs/feeds.md).
_BUSY_READ_EVERY_S = 0.02
_PRUNE_EVERY_S = 1.0
_RESOLVE_WAIT_S = 10.0
# A process that does not tail reads the tailer's saved cursor this often while a watch
# waits for its token's change to be published (the tailer's own process is woken).
_STANDBY_POLL_S = 0.05


class PostgresFeed(Documents):
    """The ChangeFeed of a PostgreSQL schema (see the module doc)."""

    def __init__(
        self,
        url: str,
        hub: Hub,
        config: FeedConfig,
        *,
        retention: Retention | None = None,
        capture: str = "auto",
        slot_read: str = "auto",
    ) -> None:
        super().__init__(split_url(url)[0])
        if capture not in ("auto", "logical", "trigger"):
            raise ConfigError(f"--pg-capture must be auto, logical or trigger, not {capture!r}")
        if slot_read not in ("auto", "stream", "sql"):
            raise ConfigError(f"--pg-slot-read must be auto, stream or sql, not {slot_read!r}")
        self._capture = capture
        self._slot_read = slot_read
        self.mode = "trigger"  # how the log is written, once started (`_setup`)
        self._hub = hub
        self._file_config = config
        self._retention = retention or Retention()
        self._source = _SchemaLog(self)
        self._tailer = Tailer(self._source, hub, what="change feed", unit="change",
                              batch=_BATCH, after_save=self.prune,
                              after_save_every_s=_PRUNE_EVERY_S, read_ahead=True,
                              busy_read_every_s=_BUSY_READ_EVERY_S)
        self._listener: asyncio.Task[None] | None = None
        self._activating = asyncio.Lock()

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, create what is configured or watched (nothing when nothing is: then
        the database is only the hub's history), start tailing, and listen for changes of
        the registries."""
        pool = await self._open_pool()
        with setting_up(pool, f"cannot use PostgreSQL at {self._where}"):
            async with pool.acquire() as conn:
                self._log = await current_log(conn)
                self._db_name = str(await conn.fetchval("SELECT current_database()"))
                # Nothing configured and nothing ever watched: create nothing.
                self.active = bool(self._file_config.collections) or await conn.fetchval(
                    "SELECT to_regclass($1)", self._log.watched) is not None
                if self.active:
                    await self._setup(pool, conn)
        if self.active:
            self._pool = pool
            self._tailer.start()
        else:
            await pool.close()
        self._listener = asyncio.create_task(
            run_with_backoff(self._listen, what="change feed catalog",
                             position=lambda: "the registries"),
            name="tidings-feed-catalog")

    async def _open_pool(self) -> Pool:
        return await open_pool(self._dsn, application_name="tidings-feed")

    async def _setup(self, pool: Pool, conn: Connection) -> None:
        changes = self._log
        if await changes.upgrade(conn):
            log.info("change feed: upgraded the change log of schema %s (no order lock)",
                     changes.schema)
        wanted = await self._choose(conn)
        decoder = self._decoder = changes.decoder(self._db_name)
        decoder.dsn, decoder.slot_read = self._dsn, self._slot_read
        if wanted == "logical" and await changes.stored_mode(conn) != "logical":
            # Before the switch's boundary (below): the slot decodes every transaction
            # that commits after it is made. A log already in logical mode whose slot is
            # gone gets no new one here: the tailer notices the gap (SlotLost).
            await decoder.ensure_slot(conn)
        async with conn.transaction():
            self.epoch = await changes.ensure(conn)
            was = await changes.mode(conn)
            if wanted != was:
                await self._switch_start(conn, wanted)
            await ensure_registry(conn, changes)
            merged = self._file_config.merged(await watched(conn, changes),
                                              await defined(conn, changes))
            shapes = {}
            for name, config in merged.collections.items():
                if config.kind == "table" and name not in self._file_config.collections and (
                        not await table_columns(conn, changes.schema, name)):
                    log.warning("watched table %s no longer exists: skipped", name)
                    continue
                shapes[name] = await install(conn, changes, config)
            if wanted != was:
                await self._switch_end(pool, conn, wanted)
        if wanted != was and wanted == "trigger":
            await decoder.drop_slot(conn)
            await decoder.drop_publication(conn)
            log.info("change feed: dropped replication slot %s (capture by triggers now)",
                     decoder.slot)
        self.mode = wanted
        self._catalog = Catalog(shapes)

    async def _choose(self, conn: Connection) -> str:
        """The capture this process asks for (`--pg-capture`), logged with why."""
        decoder = self._log.decoder(self._db_name)
        if self._capture == "trigger":
            mode, why = "trigger", "--pg-capture trigger"
        else:
            unable = await logical_possible(conn, decoder.slot)
            if unable is None:
                mode, why = "logical", "wal_level = logical and the role may replicate"
            elif self._capture == "logical":
                raise ConfigError(f"--pg-capture logical: {unable} (docs/feeds.md, "
                                  f"\"Capture by logical decoding\")")
            else:
                mode, why = "trigger", f"logical decoding unavailable: {unable}"
        log.info("change feed: schema %s captured by %s (%s)", self._log.schema,
                 LOGICAL if mode == "logical" else f"triggers, {CAPTURE}", why)
        if mode == "logical" and await conn.fetchval(
                "SELECT current_setting('max_slot_wal_keep_size') = '-1'"):
            log.warning("change feed: max_slot_wal_keep_size is -1: while no Tidings "
                        "process reads replication slot %s, PostgreSQL keeps WAL for it "
                        "without bound (set it, e.g. ALTER SYSTEM SET "
                        "max_slot_wal_keep_size = '10GB')", decoder.slot)
        return mode

    async def _switch_start(self, conn: Connection, wanted: str) -> None:
        """In the setup transaction, before the tables are captured the new way."""
        changes = self._log
        if wanted == "trigger":
            # The tailer's step takes this lock first: none runs until this commits.
            await conn.execute(f"LOCK TABLE {changes.tick_lock} IN EXCLUSIVE MODE")
        await conn.execute(f"UPDATE {changes.state} SET value = $1 WHERE name = 'capture'",
                           wanted)
        await notify(conn, changes)  # every process rereads the capture mode

    async def _switch_end(self, pool: Pool, conn: Connection, wanted: str) -> None:
        """In the setup transaction, once every table is captured the new way (holding
        each one's lock, so every writer that used the old way has committed, before
        this point in the WAL, and every later one waits for this commit)."""
        changes = self._log
        lsn = str(await conn.fetchval("SELECT pg_current_wal_insert_lsn()::text"))
        if wanted == "logical":
            # Transactions that commit before `lsn` wrote their rows by trigger.
            await conn.execute(
                f"INSERT INTO {changes.state} (name, value) VALUES ('logical_from', $1) "
                f"ON CONFLICT (name) DO UPDATE SET value = excluded.value", lsn)
            log.info("change feed: schema %s switched to logical decoding at %s",
                     changes.schema, lsn)
            return
        # Back to triggers: the slot's changes of transactions that committed before `lsn`
        # (no trigger) go into the log now, in this transaction. Decoding reads only
        # flushed WAL, and this transaction's own WAL before `lsn` stays unflushed until
        # some commit flushes it: one of ours, on another session, does so now.
        async with pool.acquire() as other:
            await flush_wal(other)
        try:
            done = await self._decoder.step(conn, upto=lsn_value(lsn), drain=True)
            log.info("change feed: schema %s switched to triggers at %s after decoding %d "
                     "changes", changes.schema, lsn, done.decoded)
        except SlotLost as exc:
            await self._decoder.mark_gap(conn, str(exc))

    async def _activate(self) -> None:
        """The first collection of a feed that had nothing to watch: set up, tail."""
        async with self._activating:
            if self.active:
                return
            pool = await self._open_pool()
            with setting_up(pool, f"PostgreSQL at {self._where}"):
                async with pool.acquire() as conn:
                    await self._setup(pool, conn)
            self._pool = pool
            self.active = True
            self._tailer.start()

    async def stop(self) -> None:
        listener, self._listener = self._listener, None
        await cancel_and_wait(listener)
        await self._tailer.stop()
        pool, self._pool = self._pool, None
        if pool is not None:
            await close_pool(pool)

    # -- the registries (feeds/definitions.py) -----------------------------------------

    async def _listen(self) -> None:
        """LISTEN for registry changes on a connection of its own; reread the registries
        after each (and once LISTENing, for what changed before). Returns only by failing:
        `run_with_backoff` starts it again."""
        conn = await connect(self._dsn, command_timeout=None,
                             application_name=f"tidings-feed-catalog:{self._log.schema}")
        try:
            changed = asyncio.Event()
            conn.add_termination_listener(lambda _conn: changed.set())
            await conn.add_listener(catalog_channel(self._log),
                                    lambda _c, _pid, _ch, _payload: changed.set())
            while True:
                changed.clear()
                if self.active:
                    await self._refresh(conn)
                elif await conn.fetchval("SELECT to_regclass($1)", self._log.watched):
                    await self._activate()
                await changed.wait()
                if conn.is_closed():
                    raise ServiceUnavailable("the catalog listener's connection closed")
        finally:
            await close_quietly(conn)

    async def _refresh(self, conn: Connection) -> None:
        """Reread the registries: the collections defined and the tables watched now (and,
        in the tailer, the capture mode: a process that started may have switched it)."""
        self._source.recheck = True
        self._tailer.wake()
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            merged = self._file_config.merged(await watched(conn, self._log),
                                              await defined(conn, self._log))
            shapes: dict[str, Shape] = {}
            for name, config in merged.collections.items():
                shape = await self._shape(conn, config)
                if shape is not None:
                    shapes[name] = shape
        self._catalog = Catalog(shapes)

    async def _shape(self, conn: Connection, config: CollectionConfig) -> Shape | None:
        known = self._catalog.find(config.name)
        if known is not None and (config.name in self._file_config.collections
                                  or known.config.same_as(config)):
            return known
        if config.kind == "managed":
            return managed(self._log.schema, config)  # made with its definition
        try:
            return await table_shape(conn, self._log.schema, config)
        except ConfigError as exc:
            log.warning("cannot serve watched table %s: %s", config.name, exc)
            return None

    async def _reread(self) -> None:
        async with self._connection() as conn:  # `_refresh` reads in a snapshot of its own
            await self._refresh(conn)

    async def define(self, config: CollectionConfig) -> bool:
        check_definable(self._file_config, config.name)
        if not self.active:
            await self._activate()
        async with self._transaction(write=True) as conn:
            await self._log.ensure(conn)
            created = await definitions.define(conn, self._log, config)
        await self._reread()
        return created

    async def undefine(self, name: str) -> None:
        check_definable(self._file_config, name)
        if not self.active:
            raise UnknownCollection(f"no collection named {name!r} is defined")
        async with self._transaction(write=True) as conn:
            await self._log.ensure(conn)
            await definitions.undefine(conn, self._log, name)
        await self._reread()

    def _written(self) -> None:
        self._tailer.wake()  # the tailer reads the write's change at once

    def status(self) -> FeedStatus:
        published = self._tailer.published
        leading = self._tailer.leading
        logical = (self._source.mode if leading else self.mode) == "logical"
        reading = leading and logical
        return FeedStatus("postgresql", LOGICAL if logical else CAPTURE, leading, published,
                          self._source.lag_s(published) if leading else None,
                          self._source.slot_lag if reading else None,
                          self._source.streamed if reading else None,
                          self._source.steps if reading else None)

    # -- resuming -------------------------------------------------------------------------

    async def resolve(self, token: str) -> ResumePoint:
        parsed = self._parse_token(token)
        async with self._transaction(write=False) as conn:
            bounds = await self._log.bounds(conn, parsed.seq)
        self._check_in_log(parsed, bounds.high, bounds.pruned)
        if bounds.gap and parsed.seq <= bounds.gap:
            raise TokenTooOld(
                f"changes after {self._token(bounds.gap)} were lost (the replication slot "
                f"was invalidated or dropped, docs/feeds.md): load a new snapshot")
        # Pruning records the last change it removed, so `pruned` is a change too.
        anchor = bounds.at_or_before or bounds.pruned
        transport = self._hub.transport
        if anchor == 0:  # no change at or before the token: replay them all
            if bounds.first is not None:
                await self._wait_published(bounds.first)
                if await transport.find(str(self._token(bounds.first))) is None:
                    raise TokenTooOld("the hub's history no longer holds the first change")
            return ResumePoint(parsed, EARLIEST)
        await self._wait_published(anchor)
        if await transport.find(str(self._token(anchor))) is None:
            raise self._history_lost(anchor)
        return ResumePoint(parsed, str(self._token(anchor)))

    async def _saved_cursor(self) -> int:
        """The cursor the tailing process saved (this one, or another)."""
        async with self._transaction(write=False) as conn:
            return await self._log.read_state(conn, "cursor")

    async def _wait_published(self, seq: int) -> None:
        await self._tailer.wait_published(seq, self._saved_cursor, timeout_s=_RESOLVE_WAIT_S,
                                          poll_s=_STANDBY_POLL_S)

    # -- the tailer -----------------------------------------------------------------------

    async def _update_for(self, row: Sequence[object], reread: set[str]) -> Update | None:
        """The update of a log row. The registries are reread, before the row is
        published, for a registry change or a collection this process does not know, at
        most once per collection and batch (`reread`): the leftover changes of a dropped
        collection do not each cost a reread."""
        if row[2] == "gap":  # a lost slot's marker (decoding.py, `mark_gap`)
            position = int(str(row[0]))
            return Update.create([GAP_TOPIC], json.dumps({"operationType": "gap"}),
                                 id=str(self._token(position)), private=True)
        change = decode_change(row)
        if change is None:
            return None
        name = change.collection
        if (name == REGISTRY or name not in self._catalog) and name not in reread:
            reread.add(name)
            await self._reread()
        if name == REGISTRY:
            return definition_update(change, db=self._db_name, epoch=self.epoch)
        return self._publishable(change, self._catalog.find(name))

    # -- retention ------------------------------------------------------------------------

    async def prune(self) -> int:
        """Apply retention (only the tailing process prunes: it knows what is published)."""
        if not self._tailer.leading:
            return 0
        published = self._tailer.published
        try:
            async with self._transaction(write=True) as conn:
                removed, last = await self._log.prune(conn, published, self._retention)
        except ServiceUnavailable as exc:
            if not isinstance(exc.__cause__, LockNotAvailable):
                raise
            log.debug("change feed: API writes still placing their changes; pruning later")
            return 0
        if removed:
            log.debug("change feed: pruned %d changes (through %s)", removed, last)
        return int(removed)


@dataclass(frozen=True, slots=True)
class _Page:
    """The newest page the tailer read: its last position, how long its first change had
    waited since its tick when read, and when (monotonic)."""

    last: int
    age_s: float
    read_at: float


class _SchemaLog:
    """The schema's change log as the tailer reads it (`tailer.Source`).

    One tailer per schema among all processes: a session-level advisory lock on a
    connection of its own, which LISTENs for writers that find it asleep. One round trip
    per page: `tidings_read` saves the cursor of what is published (so a cursor is saved
    a page or two late, the next page being read while one is published, or before
    sleeping: a crash republishes at most two pages, stored once),
    releases the idle key if the tailer was asleep, ticks if need be, and reads. Woken by
    a NOTIFY, a write through this process's API, the connection closing (the next read
    raises), or by its own clock: at once after a page, every _POLL_S while changes come,
    every _RECHECK_S asleep."""

    def __init__(self, feed: PostgresFeed) -> None:
        self._feed = feed
        self._conn: Connection | None = None
        self._holding = False  # the idle key: writers NOTIFY
        self._roused = False  # woken while holding it: the next read releases it
        self._saved = 0  # the cursor as saved
        self._unsaved = 0  # the cursor to save with the next read
        self._found = False  # the last read found changes
        self._full = False  # the last read's page was full: more of the log is stored
        self._last: tuple[int, int | None, int] = (0, None, 0)  # position, txid, seq
        self._last_found = 0.0
        self._page: _Page | None = None
        # Logical decoding (`decoding.py`): the log's capture mode as last read, the WAL
        # position of the last step, the slot's lag; `recheck`: read the mode again.
        self.mode = "trigger"
        self.recheck = False
        self._step_lsn = 0
        self._step_again = False  # the last step's rows may need the next one's tick
        self.slot_lag: int | None = None
        self.streamed = False  # the last step read the slot from a stream
        self.steps = 0  # how many steps this process's tailer made (`/metrics`)

    @contextlib.asynccontextmanager
    async def lead(self, wake: asyncio.Event) -> AsyncIterator[int]:
        """Become the schema's tailer (or wait until this process may) on a connection of
        its own; closing it (on any failure) ends the session: another process may tail,
        and the idle key it may hold is released."""
        changes = self._feed._log
        async with leading(
            self._feed._dsn, changes.tailer_key, changes.channel, wake,
            application_name=f"tidings-feed-tailer:{changes.schema}",
            standing_by=f"change feed: another process tails schema {changes.schema}; "
                        "this one stands by",
        ) as conn:
            cursor = await changes.read_state(conn, "cursor", timeout=COMMAND_TIMEOUT_S)
            self.mode = await changes.mode(conn)
            self.recheck, self._step_lsn, self._step_again = False, 0, False
            log.info("change feed: tailing schema %s after change %s (%s)", changes.schema,
                     cursor, LOGICAL if self.mode == "logical" else CAPTURE)
            self._conn, self._page, self._found, self._full = conn, None, False, False
            self._last = (cursor, None, 0)
            self._holding = self._roused = False
            self._saved = self._unsaved = cursor
            self._last_found = time.monotonic()
            try:
                yield cursor
            finally:
                self._conn = None
                await self._feed._decoder.close_readers()

    def _leading(self) -> Connection:
        if self._conn is None:
            raise ServiceUnavailable("the change feed's tailer is not connected")
        return self._conn

    async def read(self, after: int, limit: int) -> list[Entry]:
        conn = self._leading()
        reread: set[str] = set()
        # What the hub acknowledged, which `after` may be past (a read ahead).
        save = self._unsaved if self._unsaved > self._saved else None
        release = self._holding and self._roused
        position, txid, seq = self._last
        if position != after:
            txid = None
        if self.recheck:
            self.recheck = False
            self.mode = await self._feed._log.mode(conn)
        if self.mode == "logical" and not self._full:
            # Not while the log holds pages the last step copied: a step costs the same
            # whether it finds one change or thousands, so stepping before every page
            # capped the tailer at a page per step (3,700 changes/s here) under load.
            await self._step(conn)
        rows = await conn.fetch(self._feed._log.read_sql(), after, limit, save, release,
                                txid, seq, self.mode != "logical", timeout=COMMAND_TIMEOUT_S)
        if save is not None:
            self._saved = save
        if release:
            self._holding = self._roused = False
        self._found, self._full = bool(rows), len(rows) >= limit
        if not rows:
            return []
        if self._holding:  # the look right after taking the key found changes: busy
            await conn.fetchval(self._feed._log.wake_sql(), timeout=COMMAND_TIMEOUT_S)
            self._holding = False
        now = time.monotonic()
        self._last_found = now
        last = rows[-1]
        self._last = (int(str(last[0])), None if last[2] is None else int(str(last[2])),
                      int(str(last[3])))
        self._page = _Page(self._last[0], float(str(rows[0][1])), now)
        # (position, coll, op, doc_key, old_doc, new_doc, wall_time): a change-log row.
        return [(int(str(row[0])), await self._feed._update_for((row[0], *row[4:]), reread))
                for row in rows]

    async def _step(self, conn: Connection) -> None:
        """Logical decoding: copy the slot's changes into the log and tick."""
        decoder = self._feed._decoder
        try:
            done = await decoder.step(conn)
        except SlotLost as exc:
            await decoder.recover(conn, str(exc))
            done = await decoder.step(conn)
        self.mode, self.slot_lag = done.mode, done.lag_bytes
        self.steps += 1
        # A step's rows may be in the next step's tick only (those of a transaction that
        # committed between its snapshot and its position): step again, whatever comes.
        self._step_again = bool(done.decoded) or done.unflushed or done.partial
        self.streamed = done.streamed is not None
        self._step_lsn = done.lsn or self._step_lsn

    async def save(self, cursor: int) -> None:
        self._unsaved = cursor  # with the next read, or before sleeping

    async def wait(self, wake: asyncio.Event) -> None:
        if self._found:
            return  # changes are coming: look again at once
        conn = self._leading()
        changes = self._feed._log
        if self.mode == "logical":
            await self._wait_for_wal(conn, wake)
            return
        if self._holding:  # asleep: until a writer NOTIFYs (or a look of our own)
            await _woken(wake, _RECHECK_S)
            self._roused = True
            return  # the read releases the idle key
        if time.monotonic() - self._last_found < _QUIET_S:
            await _woken(wake, _POLL_S)
            return
        await self._save(conn)
        if await conn.fetchval(changes.sleep_sql(), timeout=COMMAND_TIMEOUT_S):
            # Every writer that did not see us asleep has ended: one more read finds what
            # they committed, and from now on writers NOTIFY.
            self._holding = True
            return
        await _woken(wake, _POLL_S)

    async def _wait_for_wal(self, conn: Connection, wake: asyncio.Event) -> None:
        """Logical decoding: no trigger, no NOTIFY. While changes came lately, look again
        every _POLL_S; then save the cursor and wait, in the server, for the WAL's insert
        position to move past the last step's (one call per _WAL_WAIT_S at most),
        returning once it has (or on a wake-up, or after _RECHECK_S all the same). The
        slot streamed, the stream says more (`_wait_for_stream`)."""
        stream = self._feed._decoder.stream
        if stream is not None and not stream.closed and not self._step_again:
            await self._wait_for_stream(conn, wake, stream)
            return
        if time.monotonic() - self._last_found < _QUIET_S:
            await _woken(wake, _POLL_S)
            return
        changes = self._feed._log
        await self._save(conn)
        await self._feed._decoder.advance(conn)
        deadline = time.monotonic() + _RECHECK_S
        while not (wake.is_set() or self.recheck) and time.monotonic() < deadline:
            if await conn.fetchval(changes.wal_moved_sql(), lsn_text(self._step_lsn),
                                   int(_WAL_WAIT_S * 1000), timeout=COMMAND_TIMEOUT_S):
                return

    async def _save(self, conn: Connection) -> None:
        """Save the published cursor now (the reads save it, but the tailer is idle)."""
        if self._unsaved > self._saved:
            await conn.execute(self._feed._log.save_sql(), self._unsaved,
                               timeout=COMMAND_TIMEOUT_S)
            self._saved = self._unsaved

    async def _wait_for_stream(self, conn: Connection, wake: asyncio.Event,
                               stream: SlotStream) -> None:
        """The slot streamed, and the last step copied nothing: return when the stream
        brings a transaction of the captured tables. The WAL moving is not enough:
        writes to every other table (and database) of the server move it too, and a step
        each time cost those writers a quarter of their rate, as a step every _POLL_S
        after each change cost a light stream a dozen empty steps per change
        (docs/feeds.md, "Other tables' writers"). Looks only, while changes came lately;
        then saves the cursor and looks until _RECHECK_S, when it returns all the same
        (the step then confirms the slot's position: it keeps no more WAL than that)."""
        quiet_until = self._last_found + _QUIET_S
        if time.monotonic() < quiet_until and await self._look(conn, wake, stream,
                                                               quiet_until):
            return
        await self._save(conn)
        await self._look(conn, wake, stream, time.monotonic() + _RECHECK_S)

    async def _look(self, conn: Connection, wake: asyncio.Event, stream: SlotStream,
                    deadline: float) -> bool:
        """Each time the WAL's flush position moves (until `deadline`), look at the stream
        once it shows that position (everything committed before it has come:
        stream.py). Whether to step: something came, a wake-up, or the stream cannot
        say; false at the deadline."""
        after = self._step_lsn
        while not (wake.is_set() or self.recheck or stream.waiting):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            flushed = await conn.fetchval(
                self._feed._log.wal_flushed_sql(), lsn_text(after),
                max(1, int(min(left, _WAL_WAIT_S) * 1000)), timeout=COMMAND_TIMEOUT_S)
            if flushed is None:
                continue
            try:
                if not await stream.reach(lsn_value(flushed), _STREAM_LOOK_S):
                    return True  # (the WAL sender is slow, or the stream is full)
            except StreamUnavailable:
                return True  # the step opens it again
            after = lsn_value(flushed)
            if not stream.waiting:
                # Other tables' writes keep moving the WAL: a look per
                # _STREAM_LOOK_EVERY_S at most.
                await _woken(wake, _STREAM_LOOK_EVERY_S)
        return True

    def lag_s(self, published: int) -> float:
        """How long the oldest change read but not yet published has waited since its
        tick (0 when the tailer has published all it read)."""
        page = self._page
        if page is None or published >= page.last:
            return 0.0
        return page.age_s + time.monotonic() - page.read_at


async def _woken(wake: asyncio.Event, timeout_s: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await wake.wait()
