"""The SQLite change feed: triggers write a change log, one tailer publishes it.

Every watched table (a managed collection, or a table of the user's own schema) gets three
triggers, AFTER INSERT / UPDATE / DELETE, that append a row to `tidings_changes` in the
writer's own transaction: the document key, the row before and after as JSON
(`json_object` over the columns), and the database's clock. So a change by any writer,
the `sqlite3` shell or the user's application, is captured exactly as one made through
the API, and only if it commits. SQLite has one writer at a time, so the log's
AUTOINCREMENT `seq` is commit order, and it is never reused, even after pruning.

One tailer per database file (an advisory file lock picks it among worker processes)
reads the log in `seq` order, publishes each change through the hub with its resume token
as the update id, and saves its cursor in `tidings_feed_state` after the hub acknowledged.
After a crash it republishes from the saved cursor; each republished update is identical
(the data is built from the row alone), and the transport stores it once.

Waking the tailer: a write through the API sets an event at once. For other processes
there is no notification in SQLite (no LISTEN/NOTIFY, and `sqlite3_update_hook` only sees
this process's own connection), so this is the one place in Tidings that polls: every
50 ms it asks `PRAGMA data_version`, which changes when another connection has committed
to the file. That is one cheap read of the in-memory WAL index, no query and no page
read, and it bounds the latency of an external write at 50 ms plus the publish.

SQL runs off the event loop where it may wait for SQLite's write lock (held by another
writer for as long as its transaction lasts): writes go to one thread with its own
connection. Reads (lists, snapshots, the tailer's) run on the loop on a second
connection; in WAL mode readers never wait for writers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from tidings.errors import BadRequest, NotFound, ServiceUnavailable
from tidings.feeds.base import Page, ResumePoint, Retention, Snapshot, WriteResult
from tidings.feeds.config import (
    CollectionConfig,
    FeedConfig,
    check_document_id,
    own_fields,
    validate_name,
)
from tidings.feeds.errors import (
    ConfigError,
    Conflict,
    MethodNotAllowed,
    SchemaViolation,
    TokenTooOld,
    UnknownCollection,
    UnknownToken,
)
from tidings.feeds.events import (
    ChangeRow,
    JSONObject,
    ResumeToken,
    change_update,
    merge_patch,
    same_json,
)
from tidings.feeds.query import FieldFilter, ListQuery
from tidings.hub.hub import EARLIEST, Hub
from tidings.hub.update import Update
from tidings.retry import run_with_backoff
from tidings.sqlitedb import connect as _connect
from tidings.sqlitedb import run_on
from tidings.sqlitedb import transaction as _transaction

__all__ = ["SQLiteFeed", "unwatch_table", "watch_table", "watched_tables"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_NOW = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS tidings_changes (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    coll      TEXT NOT NULL,
    op        TEXT NOT NULL,
    doc_key   TEXT NOT NULL,
    old_doc   TEXT,
    new_doc   TEXT,
    wall_time TEXT NOT NULL DEFAULT ({_NOW})
);
CREATE TABLE IF NOT EXISTS tidings_feed_state (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tidings_watched (
    name TEXT PRIMARY KEY COLLATE NOCASE,
    key  TEXT NOT NULL,
    read TEXT NOT NULL
);
"""
_CHANGE_COLUMNS = "seq, coll, op, doc_key, old_doc, new_doc, wall_time"
_BATCH = 500
_POLL_S = 0.05  # PRAGMA data_version interval: the latency bound for external writers
_PRUNE_EVERY_S = 1.0
_RESOLVE_WAIT_S = 10.0
# SQLite functions take at most 127 arguments (SQLITE_MAX_FUNCTION_ARG): a row's JSON is
# built 60 columns at a time.
_PAIRS_PER_CALL = 60


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _json_path(path: Sequence[str]) -> str:
    return "$" + "".join(f'."{segment}"' for segment in path)


# -- how a collection's rows become JSON, in SQL ----------------------------------------


@dataclass(frozen=True, slots=True)
class _Shape:
    """A collection's SQL: its table, key column, and expressions for the document."""

    config: CollectionConfig
    columns: tuple[str, ...]  # tables: every column, in order; managed: the four

    @property
    def table(self) -> str:
        return _ident(self.config.name)

    @property
    def managed(self) -> bool:
        return self.config.kind == "managed"

    def key_column(self, row: str) -> str:
        key = self.config.key
        return f"{row}.rowid" if key == "rowid" else f"{row}.{_ident(key)}"

    def key_json(self, row: str) -> str:
        return f"json_object({_literal(self.config.key)}, {self.key_column(row)})"

    def document(self, row: str) -> str:
        """The document of `row` (NEW, OLD, or the table) as JSON text."""
        if self.managed:
            # The stored fields, then the metadata columns (which win over stored fields
            # of the same name). The document is the target of json_patch, so its own
            # null values are kept.
            return (
                f"json_patch({row}.doc, json_object('id', {row}.id, "
                f"'created_at', {row}.created_at, 'updated_at', {row}.updated_at))"
            )
        values = [
            (column, f"CASE WHEN typeof({row}.{_ident(column)}) = 'blob' "
                     f"THEN hex({row}.{_ident(column)}) ELSE {row}.{_ident(column)} END")
            for column in self.columns
        ]
        head, rest = values[:_PAIRS_PER_CALL], values[_PAIRS_PER_CALL:]
        expr = "json_object(" + ", ".join(f"{_literal(c)}, {v}" for c, v in head) + ")"
        while rest:
            chunk, rest = rest[:_PAIRS_PER_CALL], rest[_PAIRS_PER_CALL:]
            expr = "json_insert(" + expr + "".join(
                f", {_literal(_json_path([c]))}, {v}" for c, v in chunk) + ")"
        return expr

    def triggers(self) -> list[str]:
        name = self.config.name
        coll = _literal(name)
        log_insert = "INSERT INTO tidings_changes (coll, op, doc_key, old_doc, new_doc) VALUES"
        statements = [f"DROP TRIGGER IF EXISTS {_ident(f'tidings_{name}_{op}')}"
                      for op in ("insert", "update", "delete")]
        statements += [
            f"CREATE TRIGGER {_ident(f'tidings_{name}_insert')} AFTER INSERT ON {self.table} "
            f"BEGIN {log_insert} ({coll}, 'insert', {self.key_json('NEW')}, NULL, "
            f"{self.document('NEW')}); END",
            f"CREATE TRIGGER {_ident(f'tidings_{name}_update')} AFTER UPDATE ON {self.table} "
            f"BEGIN {log_insert} ({coll}, 'update', {self.key_json('NEW')}, "
            f"{self.document('OLD')}, {self.document('NEW')}); END",
            f"CREATE TRIGGER {_ident(f'tidings_{name}_delete')} AFTER DELETE ON {self.table} "
            f"BEGIN {log_insert} ({coll}, 'delete', {self.key_json('OLD')}, "
            f"{self.document('OLD')}, NULL); END",
        ]
        return statements

    # -- lists -------------------------------------------------------------------------

    def sort_column(self, sort: str) -> str:
        allowed = ("created_at", "updated_at", "id") if self.managed else (self.config.key,)
        if sort not in allowed:
            raise BadRequest(f"sort must be one of {', '.join(allowed)} (or -FIELD)")
        return self.key_column(self.table) if sort == self.config.key else _ident(sort)

    def filter_sql(self, flt: FieldFilter) -> tuple[str, list[object]]:
        if self.managed:
            if flt.path in (("id",), ("created_at",), ("updated_at",)):
                expr = f"{self.table}.{_ident(flt.path[0])}"
                params: list[object] = []
            else:
                expr = f"json_extract({self.table}.doc, ?)"
                params = [_json_path(flt.path)]
        else:
            if len(flt.path) != 1 or (flt.path[0] not in self.columns and (
                    flt.path[0] != self.config.key)):
                raise BadRequest(f"{flt.field!r} is not a column of {self.config.name}")
            expr = self.key_column(self.table) if flt.path[0] == self.config.key else (
                f"{self.table}.{_ident(flt.path[0])}")
            params = []
        values = [int(v) if isinstance(v, bool) else v for v in flt.values
                  if isinstance(v, str | int | float)]
        conditions = []
        out: list[object] = []
        if values:
            conditions.append(f"{expr} IN ({', '.join('?' * len(values))})")
            out += params + values
        if flt.matches_null:
            conditions.append(f"{expr} IS NULL")
            out += params
        return "(" + " OR ".join(conditions) + ")", out


# -- the schema, shared with `tidings watch` ----------------------------------------------


def _ensure_schema(db: sqlite3.Connection) -> str:
    """Create the change log and state tables; returns the log's epoch."""
    with _transaction(db):
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute("INSERT OR IGNORE INTO tidings_feed_state VALUES ('epoch', ?)",
                   (secrets.token_hex(4),))
        db.execute("INSERT OR IGNORE INTO tidings_feed_state VALUES ('cursor', '0')")
        db.execute("INSERT OR IGNORE INTO tidings_feed_state VALUES ('pruned_through', '0')")
    return str(db.execute(
        "SELECT value FROM tidings_feed_state WHERE name = 'epoch'").fetchone()[0])


def _table_columns(db: sqlite3.Connection, name: str) -> list[tuple[str, int]]:
    """(column, primary-key position) of a table, [] when there is no such table."""
    kind = db.execute("SELECT type FROM sqlite_master WHERE name = ? COLLATE NOCASE",
                      (name,)).fetchone()
    if kind is None:
        return []
    if kind[0] != "table":
        raise ConfigError(f"{name} is a {kind[0]}, not a table: only tables can be watched")
    return [(str(row[1]), int(row[5]))
            for row in db.execute(f"PRAGMA table_info({_ident(name)})")]


def _table_shape(db: sqlite3.Connection, config: CollectionConfig) -> _Shape:
    columns = _table_columns(db, config.name)
    if not columns:
        raise ConfigError(f"there is no table {config.name!r} to watch in this database")
    names = tuple(c for c, _ in columns)
    for column in names:
        if '"' in column or any(ord(ch) < 0x20 for ch in column):
            raise ConfigError(f"{config.name}: column {column!r} has a character "
                              "that cannot be a JSON path (a quote or a control character)")
    key = config.key
    if not key:
        primary = [c for c, pk in columns if pk]
        key = primary[0] if len(primary) == 1 else "rowid"
    if key == "rowid":
        try:
            db.execute(f"SELECT rowid FROM {_ident(config.name)} LIMIT 0")
        except sqlite3.OperationalError:
            raise ConfigError(f"{config.name} has no rowid: name its key column "
                              "(key = \"...\" or tidings watch --key)") from None
    elif key not in names:
        raise ConfigError(f"{config.name} has no column {key!r} to use as its key")
    return _Shape(CollectionConfig(config.name, "table", key, config.read, "none"), names)


def _managed_shape(db: sqlite3.Connection, config: CollectionConfig) -> _Shape:
    table = _ident(config.name)
    existing = {c for c, _ in _table_columns(db, config.name)}
    if existing and not {"id", "doc", "created_at", "updated_at"} <= existing:
        raise ConfigError(
            f"a table {config.name!r} exists and is not a Tidings collection: watch it as "
            f"[tables.{config.name}] instead")
    db.execute(f"""CREATE TABLE IF NOT EXISTS {table} (
        id         TEXT PRIMARY KEY NOT NULL,
        doc        TEXT NOT NULL DEFAULT '{{}}'
                   CHECK (json_valid(doc) AND json_type(doc) = 'object'),
        created_at TEXT NOT NULL DEFAULT ({_NOW}),
        updated_at TEXT NOT NULL DEFAULT ({_NOW})
    )""")
    for column in ("created_at", "updated_at"):
        db.execute(f"CREATE INDEX IF NOT EXISTS {_ident(f'tidings_{config.name}_{column}')} "
                   f"ON {table} ({column}, id)")
    return _Shape(config, ("id", "doc", "created_at", "updated_at"))


def _install(db: sqlite3.Connection, config: CollectionConfig) -> _Shape:
    shape = _managed_shape(db, config) if config.kind == "managed" else _table_shape(db, config)
    for statement in shape.triggers():
        db.execute(statement)
    return shape


def _watched(db: sqlite3.Connection) -> list[CollectionConfig]:
    rows = db.execute("SELECT name, key, read FROM tidings_watched ORDER BY name").fetchall()
    return [CollectionConfig(str(name), "table", str(key),
                             "public" if read == "public" else "private", "none")
            for name, key, read in rows]


def _path_of(url_or_path: str) -> str:
    path = url_or_path.split("sqlite:///", 1)[-1] if url_or_path.startswith("sqlite:") else (
        url_or_path)
    if not path or path == ":memory:" or url_or_path.startswith("memory:"):
        raise ConfigError("change feeds need a database file (--db sqlite:///FILE)")
    return path


def watch_table(db_url: str, table: str, *, key: str = "", read: str = "private") -> str:
    """`tidings watch TABLE`: install the triggers and remember the table. Returns its key.

    Works while a server runs: the triggers capture changes from the moment they commit,
    and the server's tailer picks the table up when it meets its first change."""
    validate_name(table, "table")
    if read not in ("public", "private"):
        raise ConfigError("read must be public or private")
    db = _connect(_path_of(db_url))
    try:
        _ensure_schema(db)
        with _transaction(db):
            shape = _install(db, CollectionConfig(table, "table", key,
                                                  "public" if read == "public" else "private",
                                                  "none"))
            db.execute("INSERT OR REPLACE INTO tidings_watched (name, key, read) "
                       "VALUES (?, ?, ?)", (table, shape.config.key, read))
        return shape.config.key
    finally:
        db.close()


def unwatch_table(db_url: str, table: str) -> bool:
    """Drop a table's triggers and forget it; False when it was not watched."""
    db = _connect(_path_of(db_url))
    try:
        _ensure_schema(db)
        with _transaction(db):
            for op in ("insert", "update", "delete"):
                db.execute(f"DROP TRIGGER IF EXISTS {_ident(f'tidings_{table}_{op}')}")
            return db.execute("DELETE FROM tidings_watched WHERE name = ?",
                              (table,)).rowcount > 0
    finally:
        db.close()


def watched_tables(db_url: str) -> list[CollectionConfig]:
    db = _connect(_path_of(db_url))
    try:
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'tidings_watched'").fetchone():
            return _watched(db)
        return []
    finally:
        db.close()


# -- the feed -------------------------------------------------------------------------------


def _doc(text: object) -> JSONObject:
    value = json.loads(str(text))
    if not isinstance(value, dict):
        raise ValueError("a document is not a JSON object")
    return cast(JSONObject, value)


class SQLiteFeed:
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
        self._path = _path_of(path)
        self._hub = hub
        self._file_config = config
        self._retention = retention or Retention()
        self._poll_s = poll_interval_s
        self._db_name = Path(self._path).stem
        self._shapes: dict[str, _Shape] = {}
        self._by_lower: dict[str, str] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._leader = False
        self._lock_fd: int | None = None
        self._published = 0  # the newest seq the hub acknowledged (leader only)
        self._last_prune = 0.0
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.epoch = ""
        # Set up at once (a bad configuration is a startup error, not a late surprise);
        # with nothing to watch the feed stays idle and creates nothing in the file.
        self._writer = _connect(self._path)
        self._reader = _connect(self._path)
        self.active = bool(config.collections) or self._reader.execute(
            "SELECT 1 FROM sqlite_master WHERE name = 'tidings_watched'").fetchone() is not None
        if self.active:
            self._setup()

    # -- setup -----------------------------------------------------------------------

    def _setup(self) -> None:
        db = self._writer
        self.epoch = _ensure_schema(db)
        with _transaction(db):
            merged = self._file_config.merged(_watched(db))
            shapes = {}
            for name, config in merged.collections.items():
                if config.kind == "table" and name not in self._file_config.collections and (
                        not _table_columns(db, name)):
                    log.warning("watched table %s no longer exists: skipped", name)
                    continue
                shapes[name] = _install(db, config)
        self._set_shapes(shapes)

    def _set_shapes(self, shapes: Mapping[str, _Shape]) -> None:
        self._shapes = dict(shapes)
        self._by_lower = {name.lower(): name for name in shapes}

    def _reload_watched(self) -> None:
        """A change of a table nobody told this process about (`tidings watch` while
        running): learn the tables watched since startup."""
        for config in _watched(self._reader):
            if config.name.lower() not in self._by_lower:
                try:
                    shapes = {**self._shapes, config.name: _table_shape(self._reader, config)}
                except ConfigError as exc:
                    log.warning("cannot serve watched table %s: %s", config.name, exc)
                    continue
                self._set_shapes(shapes)

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        if not self.active:
            return
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="tidings-feed")
        self._tasks = [asyncio.create_task(self._run_tailer(), name="tidings-feed-tailer")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the tailer lock
            self._lock_fd = None
        self._writer.close()
        self._reader.close()

    @property
    def collections(self) -> Mapping[str, CollectionConfig]:
        return {name: shape.config for name, shape in self._shapes.items()}

    def collection(self, name: str) -> CollectionConfig:
        return self._shape(name).config

    def _shape(self, name: str) -> _Shape:
        real = self._by_lower.get(name.lower())
        if real is None or real != name:
            raise UnknownCollection(f"no collection named {name!r}")
        return self._shapes[real]

    def _managed(self, name: str) -> _Shape:
        shape = self._shape(name)
        if not shape.config.writable:
            raise MethodNotAllowed(
                f"{name} is read-only through the API" + (
                    " (a watched table: write to it with your application)"
                    if shape.config.kind == "table" else ""))
        return shape

    async def _write(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn` on the writer thread; the tailer wakes at once afterwards."""
        try:
            return await run_on(self._executor, "the change feed", fn, *args)
        finally:
            self._wake.set()

    @staticmethod
    def _high_water(db: sqlite3.Connection) -> int:
        row = db.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = 'tidings_changes'").fetchone()
        return 0 if row is None else int(row[0])

    def _state(self, db: sqlite3.Connection, name: str) -> int:
        row = db.execute("SELECT value FROM tidings_feed_state WHERE name = ?",
                         (name,)).fetchone()
        return 0 if row is None else int(row[0])

    def _token(self, seq: int) -> ResumeToken:
        return ResumeToken(self.epoch, seq)

    # -- writes (managed collections) -------------------------------------------------

    async def insert(self, name: str, document: JSONObject) -> WriteResult:
        shape = self._managed(name)
        doc_id = check_document_id(document["id"]) if "id" in document else uuid.uuid4().hex
        own = own_fields(document)
        shape.config.validate(own)
        return await self._write(self._insert_sync, shape, doc_id, json.dumps(own))

    def _insert_sync(self, shape: _Shape, doc_id: str, text: str) -> WriteResult:
        db = self._writer
        with _transaction(db):
            try:
                db.execute(f"INSERT INTO {shape.table} (id, doc, created_at, updated_at) "
                           f"VALUES (?, ?, {_NOW}, {_NOW})", (doc_id, text))
            except sqlite3.IntegrityError:
                raise Conflict(f"a document with id {doc_id!r} exists already") from None
            return self._result(db, shape, doc_id)

    def _result(self, db: sqlite3.Connection, shape: _Shape, doc_id: str) -> WriteResult:
        row = db.execute(f"SELECT {shape.document(shape.table)} FROM {shape.table} "
                         f"WHERE id = ?", (doc_id,)).fetchone()
        return WriteResult(_doc(row[0]), self._token(self._high_water(db)))

    async def replace(self, name: str, doc_id: str, document: JSONObject) -> WriteResult:
        shape = self._managed(name)
        if "id" in document and document["id"] != doc_id:
            raise SchemaViolation("the id cannot change", [{
                "field": "id", "message": "the id in the document differs from the URL's"}])
        own = own_fields(document)
        shape.config.validate(own)
        return await self._write(self._replace_sync, shape, doc_id, json.dumps(own))

    def _replace_sync(self, shape: _Shape, doc_id: str, text: str) -> WriteResult:
        db = self._writer
        with _transaction(db):
            changed = db.execute(f"UPDATE {shape.table} SET doc = ?, updated_at = {_NOW} "
                                 f"WHERE id = ?", (text, doc_id)).rowcount
            if not changed:
                raise NotFound(f"no document {doc_id!r} in {shape.config.name}")
            # The trigger logged an UPDATE; through the API a PUT is a replace.
            db.execute("UPDATE tidings_changes SET op = 'replace' WHERE seq = ?",
                       (self._high_water(db),))
            return self._result(db, shape, doc_id)

    async def update(self, name: str, doc_id: str, patch: JSONObject) -> WriteResult:
        shape = self._managed(name)
        if "id" in patch and patch["id"] != doc_id:
            raise SchemaViolation("the id cannot change", [{
                "field": "id", "message": "the id in the patch differs from the URL's"}])
        return await self._write(self._update_sync, shape, doc_id, own_fields(patch))

    def _update_sync(self, shape: _Shape, doc_id: str, patch: JSONObject) -> WriteResult:
        db = self._writer
        with _transaction(db):
            row = db.execute(f"SELECT doc FROM {shape.table} WHERE id = ?",
                             (doc_id,)).fetchone()
            if row is None:
                raise NotFound(f"no document {doc_id!r} in {shape.config.name}")
            current = _doc(row[0])
            merged = cast(JSONObject, merge_patch(current, patch))
            if not same_json(current, merged):
                shape.config.validate(merged)
                db.execute(f"UPDATE {shape.table} SET doc = ?, updated_at = {_NOW} "
                           f"WHERE id = ?", (json.dumps(merged), doc_id))
            return self._result(db, shape, doc_id)

    async def delete(self, name: str, doc_id: str) -> WriteResult:
        shape = self._managed(name)
        return await self._write(self._delete_sync, shape, doc_id)

    def _delete_sync(self, shape: _Shape, doc_id: str) -> WriteResult:
        db = self._writer
        with _transaction(db):
            row = db.execute(f"SELECT {shape.document(shape.table)} FROM {shape.table} "
                             f"WHERE id = ?", (doc_id,)).fetchone()
            if row is None:
                raise NotFound(f"no document {doc_id!r} in {shape.config.name}")
            db.execute(f"DELETE FROM {shape.table} WHERE id = ?", (doc_id,))
            return WriteResult(_doc(row[0]), self._token(self._high_water(db)))

    # -- reads -------------------------------------------------------------------------

    async def get(self, name: str, doc_id: str) -> Snapshot:
        shape = self._shape(name)
        db = self._reader
        with _transaction(db, "DEFERRED"):
            row = db.execute(
                f"SELECT {shape.document(shape.table)} FROM {shape.table} "
                f"WHERE {shape.key_column(shape.table)} = ?", (doc_id,)).fetchone()
            token = self._token(self._high_water(db))
        if row is None:
            raise NotFound(f"no document {doc_id!r} in {name}")
        return Snapshot(_doc(row[0]), token)

    async def list(self, name: str, query: ListQuery) -> Page:
        shape = self._shape(name)
        key = shape.config.key
        sort = query.sort or ("created_at" if shape.managed else key)
        sort_expr = shape.sort_column(sort)
        key_expr = shape.key_column(shape.table)
        where: list[str] = []
        params: list[object] = []
        for flt in query.filters:
            sql, values = shape.filter_sql(flt)
            where.append(sql)
            params += values
        direction = "DESC" if query.descending else "ASC"
        compare = "<" if query.descending else ">"
        if query.after is not None:
            value, last_key = query.after
            if sort_expr == key_expr:
                where.append(f"{key_expr} {compare} ?")
                params.append(last_key)
            else:
                where.append(f"({sort_expr}, {key_expr}) {compare} (?, ?)")
                params += [value, last_key]
        sql = (f"SELECT {sort_expr}, {key_expr}, {shape.document(shape.table)} "
               f"FROM {shape.table}"
               + (f" WHERE {' AND '.join(where)}" if where else "")
               + f" ORDER BY {sort_expr} {direction}"
               + (f", {key_expr} {direction}" if sort_expr != key_expr else "")
               + " LIMIT ?")
        params.append(query.limit + 1)
        db = self._reader
        with _transaction(db, "DEFERRED"):
            rows = db.execute(sql, params).fetchall()
            token = self._token(self._high_water(db))
        next_cursor = None
        if len(rows) > query.limit:
            rows = rows[:query.limit]
            last = rows[-1]
            next_cursor = query.cursor_after(sort, last[0], last[1])
        return Page(tuple(_doc(row[2]) for row in rows), next_cursor, token)

    # -- resuming ------------------------------------------------------------------------

    async def resolve(self, token: str) -> ResumePoint:
        parsed = ResumeToken.parse(token)
        if not self.active or parsed.epoch != self.epoch:
            raise UnknownToken("the resume token is not from this database's change log")
        db = self._reader
        with _transaction(db, "DEFERRED"):
            high = self._high_water(db)
            pruned = self._state(db, "pruned_through")
        if parsed.seq > high:
            raise UnknownToken("the resume token names a change this database has not had")
        if parsed.seq < pruned:
            raise TokenTooOld(
                f"the change log no longer holds the changes after {parsed}: "
                f"it starts after {self._token(pruned)}; load a new snapshot")
        await self._wait_published(parsed.seq)
        transport = self._hub.transport
        if parsed.seq == 0:
            if self._published_through() >= 1 and await transport.find(
                    str(self._token(1))) is None:
                raise TokenTooOld("the hub's history no longer holds the first change")
            return ResumePoint(parsed, EARLIEST)
        if await transport.find(str(parsed)) is None:
            raise TokenTooOld(
                f"the hub's history (--history-size, --history-max-age) no longer holds "
                f"change {parsed}; load a new snapshot")
        return ResumePoint(parsed, str(parsed))

    def _published_through(self) -> int:
        if self._leader:
            return self._published
        return self._state(self._reader, "cursor")  # another process tails: its cursor

    async def _wait_published(self, seq: int) -> None:
        deadline = time.monotonic() + _RESOLVE_WAIT_S
        while self._published_through() < seq:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServiceUnavailable("the change feed is behind; try again")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, self._poll_s)):
                    await self._progress.wait()

    def _notify_progress(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    # -- the tailer ------------------------------------------------------------------------

    async def _run_tailer(self) -> None:
        await self._become_leader()
        self._published = self._state(self._reader, "cursor")
        self._leader = True
        log.info("change feed: tailing %s after change %s", self._path, self._published)
        await run_with_backoff(self._tail, what="change feed",
                               position=lambda: f"change {self._published}")

    async def _tail(self) -> None:
        while True:
            self._wake.clear()
            version = self._data_version()
            rows = self._reader.execute(
                f"SELECT {_CHANGE_COLUMNS} FROM tidings_changes WHERE seq > ? "
                f"ORDER BY seq LIMIT ?", (self._published, _BATCH)).fetchall()
            if not rows:
                await self._idle(version)
                continue
            for row in rows:
                update = self._update_for(row)
                if update is not None:
                    await self._hub.publish(update)
                self._published = int(row[0])
            # The cursor is saved only after the hub acknowledged: a crash before this
            # republishes the batch, and the transport stores each identical update once.
            await self._write(self._save_cursor, self._published)
            self._notify_progress()
            if time.monotonic() - self._last_prune >= _PRUNE_EVERY_S:
                await self.prune()

    def _update_for(self, row: tuple[Any, ...]) -> Update | None:
        seq, coll, op, key, old, new, wall_time = row
        try:
            change = ChangeRow.decode(int(seq), str(coll), str(op), str(key), old, new,
                                      str(wall_time))
        except ValueError as exc:
            log.error("change %s cannot be read (%s): skipped", seq, exc)
            return None
        if change.collection.lower() not in self._by_lower:
            self._reload_watched()
        real = self._by_lower.get(change.collection.lower())
        # A collection nobody configured (left-over triggers): private, the safe default.
        private = True if real is None else self._shapes[real].config.private
        return change_update(change, db=self._db_name, epoch=self.epoch, private=private)

    def _data_version(self) -> int:
        return int(self._reader.execute("PRAGMA data_version").fetchone()[0])

    async def _idle(self, version: int) -> None:
        """Wait for a write through the API (at once) or by any other connection (seen
        by `PRAGMA data_version` within one poll interval)."""
        while True:
            try:
                async with asyncio.timeout(self._poll_s):
                    await self._wake.wait()
                return
            except TimeoutError:
                if self._data_version() != version:
                    return

    def _save_cursor(self, seq: int) -> None:
        self._writer.execute("UPDATE tidings_feed_state SET value = ? WHERE name = 'cursor'",
                             (str(seq),))

    async def _become_leader(self) -> None:
        """One tailer per file: an advisory lock beside it. Another process holding it
        tails for everyone; this one takes over when that process ends."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - no flock (Windows): one process assumed
            return
        fd = os.open(self._path + ".tidings-feed-lock", os.O_RDWR | os.O_CREAT, 0o644)
        self._lock_fd = fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            log.info("change feed: another process tails %s; this one stands by", self._path)
        loop = asyncio.get_running_loop()
        acquired = loop.create_future()

        def wait() -> None:  # a daemon thread: it must not keep the process alive
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                return
            def done() -> None:
                if not acquired.done():
                    acquired.set_result(None)

            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(done)

        threading.Thread(target=wait, name="tidings-feed-lock", daemon=True).start()
        await acquired

    # -- retention ---------------------------------------------------------------------------

    async def prune(self) -> int:
        self._last_prune = time.monotonic()
        return await self._write(self._prune_sync, self._published if self._leader else 0)

    def _prune_sync(self, published: int) -> int:
        db = self._writer
        retention = self._retention
        with _transaction(db):
            pruned = self._state(db, "pruned_through")
            limit = min(published, self._high_water(db) - retention.size)
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
