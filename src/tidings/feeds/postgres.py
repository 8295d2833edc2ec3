"""The PostgreSQL change feed: triggers write a change log, one tailer publishes it.

`--db postgresql://[user@]host[:port]/db[?search_path=SCHEMA]`: the feed lives in the
connection's current schema (the first existing one of its `search_path`), which holds
the change log (`tidings_changes` and its sequence), the feed's state, the watched-table
registry, two trigger functions and the managed collections' tables. Watched tables are
tables of that schema.

Capture. Every watched table (a managed collection, or a table of the user's own schema)
gets two triggers. `tidings_capture`, AFTER INSERT / UPDATE / DELETE FOR EACH ROW, appends
a row to the change log in the writer's own transaction: the document key, the row before
and after as JSON (`to_jsonb(OLD)` / `to_jsonb(NEW)`; for managed collections the stored
document plus its metadata), and `clock_timestamp()`. A change by any writer (psql, the
user's application, a migration) is captured exactly as one made through the API, and
only if it commits. The functions are SECURITY DEFINER, so writers need no privileges on
the log.

Order: why every writer takes one advisory lock. The tailer reads the log in `seq` order
and never looks below the last `seq` it published, so `seq` order must be commit order.
A sequence alone does not give that: transaction A takes 5, transaction B takes 6 and
commits first; a tailer that reads 6 then skips 5 forever. So the triggers take
`pg_advisory_xact_lock(K)` (K derived from the schema: one key for the whole log, not per
table, or changes to two tables could commit out of `seq` order) *before* `nextval`, and
the lock is held until the writer's transaction ends. Writers to watched tables therefore
serialize from their first watched change to their commit, and:

* `seq` order is commit order: B can take its first `seq` only after A has committed (a
  transaction-level lock is released after the commit is visible) and the sequence only
  grows. One transaction's changes have consecutive `seq`s.
* A gap is a rolled-back transaction (or savepoint): if 6 is visible, the transaction
  that took 5 ended before 6 was taken, so 5 is visible too or never will be. A reader
  sees a prefix of the log in commit order, with holes only where nothing will ever be.
* A snapshot's position is exact: in one REPEATABLE READ transaction, the highest
  visible `seq` says precisely which changes the snapshot contains (all at or below it,
  none above).

The lock is taken twice. A BEFORE ... FOR EACH STATEMENT trigger (`tidings_lock`) takes it
when a statement on a watched table starts, before the statement locks any row; the row
trigger takes it again (a no-op then) right before `nextval`, the point the ordering
argument needs. Taking it only in the AFTER ROW trigger would add deadlocks that plain
PostgreSQL does not have: T1 updates row r (row lock) and waits for the advisory lock held
by T2, which then updates r. With the statement trigger T1 waits before locking r.

The cost, in throughput: writers to the watched tables of one schema commit one at a
time, each holding the lock from its first watched statement through its commit (the WAL
flush included), so their rate is at most 1 / (that span) however many connections write
(docs/feeds.md: 1,300 to 3,300 a second on the development VM); a transaction that
writes to a watched table and then waits on something else holds up every other watched
writer; concurrent watched writers no longer share WAL flushes. Readers never wait, and
writers to tables that are not watched are not affected.

Tailing. One tailer per schema among all processes: it holds a session-level advisory
lock on a connection of its own (another process waits in `pg_advisory_lock` and takes
over when that session ends). It LISTENs on a channel the triggers `pg_notify` (delivered
at commit, never for a rollback, one per transaction), reads pages of the log after its
cursor, publishes each change through the hub with its resume token as the update id,
and saves its cursor after the hub acknowledged. NOTIFY only wakes it: the log is the
truth, and the tailer also looks again every few seconds in case a notification was lost.
After a crash it republishes from the saved cursor; each republished update is identical
(built from the row alone) and the transport stores it once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

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
    JSONValue,
    ResumeToken,
    change_update,
    merge_patch,
    same_json,
)
from tidings.feeds.query import FieldFilter, ListQuery
from tidings.hub.hub import EARLIEST, Hub
from tidings.hub.update import Update
from tidings.retry import run_with_backoff

# The driver edge is shared with the PostgreSQL transport: the same typed subset of
# asyncpg, the same notion of "PostgreSQL cannot be used" (503), the same timeouts.
from tidings.transports.postgres import (
    _CLOSE_TIMEOUT_S,
    _COMMAND_TIMEOUT_S,
    _CONNECT_TIMEOUT_S,
    _UNAVAILABLE,
    _close_quietly,
    _Connection,
    _keep_session,
)

try:
    import asyncpg
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "the PostgreSQL change feed needs asyncpg: pip install 'tidings[postgres]'"
    ) from exc

__all__ = ["PostgresFeed", "unwatch_table", "watch_table"]

log = logging.getLogger(__name__)

_BATCH = 500
_POOL_MAX = 10
# The tailer looks at the log this often without a notification (NOTIFY is a wake-up and
# one can be missed): the bound on how late a lost notification is noticed.
_RECHECK_S = 5.0
_PRUNE_EVERY_S = 1.0
_RESOLVE_WAIT_S = 10.0
# A process that does not tail reads the tailer's saved cursor this often while a watch
# waits for its token's change to be published (the tailer's own process is woken).
_STANDBY_POLL_S = 0.05
_ISO = 'YYYY-MM-DD"T"HH24:MI:SS.{}"Z"'


class _FeedConnection(_Connection, Protocol):
    def transaction(
        self, *, isolation: str | None = None, readonly: bool = False
    ) -> AbstractAsyncContextManager[object]: ...


class _FeedPool(Protocol):
    def acquire(
        self, *, timeout: float | None = None
    ) -> AbstractAsyncContextManager[_FeedConnection]: ...

    async def close(self) -> None: ...

    def terminate(self) -> None: ...


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _iso(expr: str, unit: str = "MS") -> str:
    """`expr` (a timestamptz) as ISO 8601 UTC text: milliseconds (documents, wallTime,
    as SQLite writes them) or microseconds (`US`: list cursors, which must be exact)."""
    return f"to_char({expr} AT TIME ZONE 'UTC', {_literal(_ISO.format(unit))})"


def _managed_document(row: str) -> str:
    """The document of a managed collection's `row` (NEW, OLD or a table alias): the
    stored fields, then the metadata columns, which win over stored fields of that name."""
    return (f"({row}.doc || jsonb_build_object('id', {row}.id, "
            f"'created_at', {_iso(f'{row}.created_at')}, "
            f"'updated_at', {_iso(f'{row}.updated_at')}))")


def _advisory_key(purpose: str, schema: str) -> int:
    # A stable signed 64-bit key per schema and purpose, the same in every process.
    digest = hashlib.blake2b(f"tidings-feed:{purpose}:{schema}".encode(),
                             digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _split_url(url: str) -> tuple[str, str]:
    """The DSN for asyncpg (without the transport's `namespace`, which is not a server
    setting) and a description for messages (never the password)."""
    parts = urlsplit(url)
    params = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
              if k != "namespace"]
    dsn = urlunsplit(parts._replace(query=urlencode(params)))
    return dsn, f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path}"


def _doc(text: object) -> JSONObject:
    value = json.loads(str(text))
    if not isinstance(value, dict):
        raise ValueError("a document is not a JSON object")
    return cast(JSONObject, value)


def _cursor_text(value: JSONValue) -> str:
    """A cursor's key or sort value as the text PostgreSQL casts to the column's type."""
    return value if isinstance(value, str) else json.dumps(value)


# -- the schema's objects ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Names:
    """Where the feed lives: one schema's change log, state, functions, keys, channel."""

    schema: str

    @property
    def changes(self) -> str:
        return f"{_ident(self.schema)}.tidings_changes"

    @property
    def sequence(self) -> str:
        return f"{_ident(self.schema)}.tidings_changes_seq"

    @property
    def state(self) -> str:
        return f"{_ident(self.schema)}.tidings_feed_state"

    @property
    def watched(self) -> str:
        return f"{_ident(self.schema)}.tidings_watched"

    @property
    def order_key(self) -> int:
        """Taken by every writer of a watched table until it commits (module doc)."""
        return _advisory_key("order", self.schema)

    @property
    def tailer_key(self) -> int:
        """Held (session level) by the one tailer of this schema."""
        return _advisory_key("tailer", self.schema)

    @property
    def setup_key(self) -> int:
        """Serializes setups (server starts, `tidings watch`): concurrent CREATE OR REPLACE
        of one function fails. Distinct from the order key, so that a setup waiting for
        a table lock never holds up writers that hold that table."""
        return _advisory_key("setup", self.schema)

    @property
    def channel(self) -> str:
        name = f"tidings_changes.{self.schema}"
        if len(name.encode()) > 63:  # channel names are identifiers: 63 bytes at most
            name = "tidings_changes." + hashlib.blake2b(
                self.schema.encode(), digest_size=8).hexdigest()
        return name

    def ddl(self) -> list[str]:
        lock_fn = f"""
CREATE OR REPLACE FUNCTION {_ident(self.schema)}.tidings_lock() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $tidings$
BEGIN
    -- Before the statement locks any row: see tidings/feeds/postgres.py.
    PERFORM pg_advisory_xact_lock({self.order_key});
    RETURN NULL;
END
$tidings$"""
        capture_fn = f"""
CREATE OR REPLACE FUNCTION {_ident(self.schema)}.tidings_capture() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $tidings$
DECLARE
    key_column constant text := TG_ARGV[1];
    managed constant boolean := TG_ARGV[2] = 'managed';
    old_doc jsonb;
    new_doc jsonb;
BEGIN
    IF TG_OP <> 'INSERT' THEN
        IF managed THEN
            old_doc := {_managed_document("OLD")};
        ELSE
            old_doc := to_jsonb(OLD);
        END IF;
    END IF;
    IF TG_OP <> 'DELETE' THEN
        IF managed THEN
            new_doc := {_managed_document("NEW")};
        ELSE
            new_doc := to_jsonb(NEW);
        END IF;
    END IF;
    -- Commit order = seq order: every writer takes this lock before its seq and holds
    -- it until it commits (see tidings/feeds/postgres.py). Never remove it.
    PERFORM pg_advisory_xact_lock({self.order_key});
    INSERT INTO {self.changes} (seq, coll, op, doc_key, old_doc, new_doc, wall_time)
    VALUES (nextval({_literal(self.sequence)}), TG_ARGV[0], lower(TG_OP),
            jsonb_build_object(key_column, coalesce(new_doc, old_doc) -> key_column),
            old_doc, new_doc, clock_timestamp());
    -- A wake-up only (delivered at commit, once per transaction): the log is the truth.
    PERFORM pg_notify({_literal(self.channel)}, '');
    RETURN NULL;
END
$tidings$"""
        for body in (lock_fn, capture_fn):
            if body.count("$tidings$") != 2:
                raise ConfigError(f"the schema name {self.schema!r} cannot be used")
        return [
            f"""CREATE TABLE IF NOT EXISTS {self.changes} (
                seq       bigint PRIMARY KEY,
                coll      text NOT NULL,
                op        text NOT NULL,
                doc_key   jsonb NOT NULL,
                old_doc   jsonb,
                new_doc   jsonb,
                wall_time timestamptz NOT NULL
            )""",
            # Taken only under the order lock; never reused, even when the log is pruned.
            f"CREATE SEQUENCE IF NOT EXISTS {self.sequence} AS bigint",
            f"""CREATE TABLE IF NOT EXISTS {self.state} (
                name  text PRIMARY KEY,
                value text NOT NULL
            )""",
            f"""CREATE TABLE IF NOT EXISTS {self.watched} (
                name text PRIMARY KEY,
                key  text NOT NULL,
                read text NOT NULL
            )""",
            lock_fn,
            capture_fn,
        ]


@dataclass(frozen=True, slots=True)
class _Shape:
    """A collection's SQL: its table, key column (and its type), and the document."""

    config: CollectionConfig
    schema: str
    columns: tuple[str, ...]  # tables: every column, in order; managed: the four
    key_type: str  # the key column's SQL type (format_type)

    @property
    def table(self) -> str:
        return f"{_ident(self.schema)}.{_ident(self.config.name)}"

    @property
    def managed(self) -> bool:
        return self.config.kind == "managed"

    def key_column(self, row: str = "t") -> str:
        return f"{row}.{_ident(self.config.key)}"

    def document(self, row: str = "t") -> str:
        """The document of `row` (a table alias) as jsonb: what the trigger logs."""
        return _managed_document(row) if self.managed else f"to_jsonb({row})"

    def key_param(self, placeholder: str) -> str:
        """A text parameter as a value of the key column (a DataError when it is not)."""
        return f"{placeholder}::text::{self.key_type}"

    @property
    def trigger_args(self) -> tuple[str, str, str]:
        return self.config.name, self.config.key, self.config.kind

    def triggers(self) -> list[str]:
        args = ", ".join(_literal(a) for a in self.trigger_args)
        schema = _ident(self.schema)
        return [
            f"DROP TRIGGER IF EXISTS tidings_lock ON {self.table}",
            f"DROP TRIGGER IF EXISTS tidings_capture ON {self.table}",
            f"CREATE TRIGGER tidings_lock BEFORE INSERT OR UPDATE OR DELETE ON {self.table} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {schema}.tidings_lock()",
            f"CREATE TRIGGER tidings_capture AFTER INSERT OR UPDATE OR DELETE ON {self.table} "
            f"FOR EACH ROW EXECUTE FUNCTION {schema}.tidings_capture({args})",
        ]

    # -- lists -------------------------------------------------------------------------

    def sort_columns(self, sort: str) -> tuple[str, str]:
        """(ORDER BY expression, cursor value expression) of a sort field."""
        allowed = ("created_at", "updated_at", "id") if self.managed else (self.config.key,)
        if sort not in allowed:
            raise BadRequest(f"sort must be one of {', '.join(allowed)} (or -FIELD)")
        if sort in ("created_at", "updated_at"):
            return f"t.{sort}", _iso(f"t.{sort}", "US")
        return self.key_column(), f"to_jsonb({self.key_column()})::text"

    def filter_sql(self, flt: FieldFilter, params: list[object]) -> str:
        def param(value: object) -> str:
            params.append(value)
            return f"${len(params)}"

        strings = [v for v in flt.values if isinstance(v, str)]
        if self.managed and flt.path == ("id",):
            return f"t.id = ANY({param(strings)}::text[])"
        if self.managed and flt.path in (("created_at",), ("updated_at",)):
            return f"{_iso(f't.{flt.path[0]}')} = ANY({param(strings)}::text[])"
        if self.managed:
            expr = f"(t.doc #> {param(list(flt.path))}::text[])"
        else:
            if len(flt.path) != 1 or flt.path[0] not in self.columns:
                raise BadRequest(f"{flt.field!r} is not a column of {self.config.name}")
            expr = f"to_jsonb(t.{_ident(flt.path[0])})"
        # jsonb equality is JSON equality: 5 = 5.0, true is not 1; a missing field (SQL
        # NULL) matches `null`, as a JSON null does.
        condition = f"{expr} = ANY({param([json.dumps(v) for v in flt.values])}::jsonb[])"
        return f"({condition} OR {expr} IS NULL)" if flt.matches_null else condition


# -- setup, shared with `tidings watch` -------------------------------------------------------


async def _names(conn: _Connection) -> _Names:
    schema = await conn.fetchval("SELECT current_schema()")
    if not isinstance(schema, str):
        raise ConfigError("no schema to keep the change log in: none of the search_path's "
                          "schemas exists (create it, or set ?search_path=SCHEMA)")
    return _Names(schema)


async def _ensure_schema(conn: _Connection, names: _Names) -> str:
    """Create the change log, state, registry and functions; returns the log's epoch.
    Runs inside the caller's transaction, under the setup lock."""
    await conn.execute(f"SELECT pg_advisory_xact_lock({names.setup_key})")
    for statement in names.ddl():
        await conn.execute(statement)
    await conn.execute(
        f"INSERT INTO {names.state} (name, value) VALUES ('epoch', $1), ('cursor', '0'), "
        f"('pruned_through', '0') ON CONFLICT (name) DO NOTHING", secrets.token_hex(4))
    epoch = await conn.fetchval(f"SELECT value FROM {names.state} WHERE name = 'epoch'")
    return str(epoch)


async def _table_columns(conn: _Connection, names: _Names,
                         name: str) -> list[tuple[str, str, bool]]:
    """(column, SQL type, in a single-column primary key) of a table; [] when absent."""
    kind = await conn.fetchval(
        "SELECT c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = $1 AND c.relname = $2", names.schema, name)
    if kind is None:
        return []
    if kind not in ("r", "p"):
        what = {"v": "view", "m": "materialized view", "f": "foreign table"}.get(
            str(kind), "relation that is not a table")
        raise ConfigError(f"{name} is a {what}: only tables can be watched")
    rows = await conn.fetch(
        """SELECT a.attname::text, format_type(a.atttypid, a.atttypmod),
                  coalesce(i.indnatts = 1 AND a.attnum = ANY (i.indkey::int2[]), false)
           FROM pg_attribute a
           LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary
           WHERE a.attrelid = (quote_ident($1) || '.' || quote_ident($2))::regclass
             AND a.attnum > 0 AND NOT a.attisdropped
           ORDER BY a.attnum""", names.schema, name)
    return [(str(column), str(type_), bool(primary)) for column, type_, primary in rows]


async def _table_shape(conn: _Connection, names: _Names, config: CollectionConfig) -> _Shape:
    columns = await _table_columns(conn, names, config.name)
    if not columns:
        raise ConfigError(f"there is no table {config.name!r} to watch in schema "
                          f"{names.schema!r}")
    types = {column: type_ for column, type_, _ in columns}
    key = config.key
    if not key:
        primary = [column for column, _, pk in columns if pk]
        if len(primary) != 1:
            raise ConfigError(f"{config.name} has no single-column primary key: name its "
                              "key column (key = \"...\" or tidings watch --key)")
        key = primary[0]
    elif key not in types:
        raise ConfigError(f"{config.name} has no column {key!r} to use as its key")
    return _Shape(CollectionConfig(config.name, "table", key, config.read, "none"),
                  names.schema, tuple(types), types[key])


async def _managed_shape(conn: _Connection, names: _Names, config: CollectionConfig) -> _Shape:
    existing = {column for column, _, _ in await _table_columns(conn, names, config.name)}
    if existing and not {"id", "doc", "created_at", "updated_at"} <= existing:
        raise ConfigError(
            f"a table {config.name!r} exists and is not a Tidings collection: watch it as "
            f"[tables.{config.name}] instead")
    shape = _Shape(config, names.schema, ("id", "doc", "created_at", "updated_at"), "text")
    await conn.execute(f"""CREATE TABLE IF NOT EXISTS {shape.table} (
        id         text PRIMARY KEY,
        doc        jsonb NOT NULL DEFAULT '{{}}' CHECK (jsonb_typeof(doc) = 'object'),
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now()
    )""")
    for column in ("created_at", "updated_at"):
        index = _ident(f"tidings_{column}_{config.name}")
        await conn.execute(f"CREATE INDEX IF NOT EXISTS {index} ON {shape.table} "
                           f"({column}, id)")
    return shape


async def _install(conn: _Connection, names: _Names, config: CollectionConfig) -> _Shape:
    if config.kind == "managed":
        shape = await _managed_shape(conn, names, config)
    else:
        shape = await _table_shape(conn, names, config)
    if not await _has_triggers(conn, shape):
        for statement in shape.triggers():
            await conn.execute(statement)
    return shape


async def _has_triggers(conn: _Connection, shape: _Shape) -> bool:
    """Whether the table has both triggers, enabled, as `shape` would create them.
    Creating a trigger waits for every open transaction that wrote to the table and
    holds up new writers meanwhile: a restart should not do that to a busy table."""
    schema = _ident(shape.schema)
    rows = await conn.fetch(
        f"""SELECT tgname::text, tgargs FROM pg_trigger
            WHERE tgrelid = $1::regclass AND tgenabled <> 'D' AND (
                (tgname = 'tidings_lock' AND tgfoid = '{schema}.tidings_lock'::regproc) OR
                (tgname = 'tidings_capture' AND tgfoid = '{schema}.tidings_capture'::regproc))""",
        shape.table)
    found = {str(name): bytes(cast(bytes, args)) for name, args in rows}
    wanted = b"".join(arg.encode() + b"\0" for arg in shape.trigger_args)
    return found == {"tidings_lock": b"", "tidings_capture": wanted}


async def _watched(conn: _Connection, names: _Names) -> list[CollectionConfig]:
    if await conn.fetchval("SELECT to_regclass($1)", names.watched) is None:
        return []
    rows = await conn.fetch(f"SELECT name, key, read FROM {names.watched} ORDER BY name")
    return [CollectionConfig(str(name), "table", str(key),
                             "public" if read == "public" else "private", "none")
            for name, key, read in rows]


@contextlib.asynccontextmanager
async def _connect(db_url: str) -> AsyncIterator[_FeedConnection]:
    """One plain connection (for `tidings watch`); failures are ServiceUnavailable."""
    dsn, where = _split_url(db_url)
    try:
        conn = cast(_FeedConnection, await asyncpg.connect(
            dsn, timeout=_CONNECT_TIMEOUT_S, command_timeout=_COMMAND_TIMEOUT_S))
    except _UNAVAILABLE as exc:
        raise ServiceUnavailable(f"cannot use PostgreSQL at {where}: {exc}") from exc
    try:
        yield conn
    except _UNAVAILABLE as exc:
        raise ServiceUnavailable(f"PostgreSQL at {where}: {exc}") from exc
    finally:
        await _close_quietly(conn)


async def _watch_table(db_url: str, table: str, key: str, read: str) -> str:
    validate_name(table, "table")
    if read not in ("public", "private"):
        raise ConfigError("read must be public or private")
    async with _connect(db_url) as conn:
        names = await _names(conn)
        async with conn.transaction():
            await _ensure_schema(conn, names)
            shape = await _install(conn, names, CollectionConfig(
                table, "table", key, "public" if read == "public" else "private", "none"))
            await conn.execute(
                f"INSERT INTO {names.watched} (name, key, read) VALUES ($1, $2, $3) "
                f"ON CONFLICT (name) DO UPDATE SET key = excluded.key, read = excluded.read",
                table, shape.config.key, read)
        return shape.config.key


async def _unwatch_table(db_url: str, table: str) -> bool:
    async with _connect(db_url) as conn:
        names = await _names(conn)
        async with conn.transaction():
            await _ensure_schema(conn, names)
            qualified = f"{_ident(names.schema)}.{_ident(table)}"
            if await conn.fetchval("SELECT to_regclass($1)", qualified) is not None:
                for trigger in ("tidings_lock", "tidings_capture"):
                    await conn.execute(f"DROP TRIGGER IF EXISTS {trigger} ON {qualified}")
            status = await conn.execute(f"DELETE FROM {names.watched} WHERE name = $1", table)
        return status != "DELETE 0"


def watch_table(db_url: str, table: str, *, key: str = "", read: str = "private") -> str:
    """`tidings watch TABLE`: install the triggers and remember the table. Returns its key.

    Synchronous, for the CLI (not from a running event loop). Works while a server runs:
    the triggers capture changes from the moment they commit, and the server's tailer
    picks the table up when it meets its first change."""
    return asyncio.run(_watch_table(db_url, table, key, read))


def unwatch_table(db_url: str, table: str) -> bool:
    """Drop a table's triggers and forget it; False when it was not watched."""
    return asyncio.run(_unwatch_table(db_url, table))


# -- the feed -------------------------------------------------------------------------------


class PostgresFeed:
    """The ChangeFeed of a PostgreSQL schema (see the module doc)."""

    def __init__(
        self,
        url: str,
        hub: Hub,
        config: FeedConfig,
        *,
        retention: Retention | None = None,
    ) -> None:
        self._dsn, self._where = _split_url(url)
        self._hub = hub
        self._file_config = config
        self._retention = retention or Retention()
        self._names = _Names("")
        self._db_name = ""
        self._shapes: dict[str, _Shape] = {}
        self._pool: _FeedPool | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._leader = False
        self._published = 0  # the newest seq the hub acknowledged (leader only)
        self._last_prune = 0.0
        self.epoch = ""
        self.active = False

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, create what is configured or watched (nothing when nothing is: then
        the database is only the hub's history), and start tailing."""
        try:
            pool = cast(_FeedPool, await asyncpg.create_pool(
                self._dsn, min_size=1, max_size=_POOL_MAX, timeout=_CONNECT_TIMEOUT_S,
                command_timeout=_COMMAND_TIMEOUT_S, reset=_keep_session,
                server_settings={"application_name": "tidings-feed"}))
        except _UNAVAILABLE as exc:
            raise ServiceUnavailable(f"cannot use PostgreSQL at {self._where}: {exc}") from exc
        try:
            async with pool.acquire() as conn:
                self._names = await _names(conn)
                self._db_name = str(await conn.fetchval("SELECT current_database()"))
                # Nothing configured and nothing ever watched: create nothing.
                self.active = bool(self._file_config.collections) or await conn.fetchval(
                    "SELECT to_regclass($1)", self._names.watched) is not None
                if self.active:
                    await self._setup(conn)
        except BaseException as exc:
            pool.terminate()
            if isinstance(exc, _UNAVAILABLE):
                raise ServiceUnavailable(
                    f"cannot use PostgreSQL at {self._where}: {exc}") from exc
            raise
        if not self.active:
            await pool.close()
            return
        self._pool = pool
        self._tasks = [asyncio.create_task(self._run_tailer(), name="tidings-feed-tailer")]

    async def _setup(self, conn: _FeedConnection) -> None:
        names = self._names
        async with conn.transaction():
            self.epoch = await _ensure_schema(conn, names)
            merged = self._file_config.merged(await _watched(conn, names))
            shapes = {}
            for name, config in merged.collections.items():
                if config.kind == "table" and name not in self._file_config.collections and (
                        not await _table_columns(conn, names, name)):
                    log.warning("watched table %s no longer exists: skipped", name)
                    continue
                shapes[name] = await _install(conn, names, config)
        self._shapes = shapes

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), _CLOSE_TIMEOUT_S)
            except _UNAVAILABLE:  # includes TimeoutError
                pool.terminate()

    @property
    def collections(self) -> Mapping[str, CollectionConfig]:
        return {name: shape.config for name, shape in self._shapes.items()}

    def collection(self, name: str) -> CollectionConfig:
        return self._shape(name).config

    def _shape(self, name: str) -> _Shape:
        shape = self._shapes.get(name)
        if shape is None:
            raise UnknownCollection(f"no collection named {name!r}")
        return shape

    def _managed(self, name: str) -> _Shape:
        shape = self._shape(name)
        if not shape.config.writable:
            raise MethodNotAllowed(
                f"{name} is read-only through the API" + (
                    " (a watched table: write to it with your application)"
                    if shape.config.kind == "table" else ""))
        return shape

    def _token(self, seq: int) -> ResumeToken:
        return ResumeToken(self.epoch, seq)

    @contextlib.asynccontextmanager
    async def _transaction(self, *, write: bool) -> AsyncIterator[_FeedConnection]:
        """A pooled connection in a transaction: READ COMMITTED for writes (each statement
        sees what committed before it, which the order lock makes the latest), REPEATABLE
        READ, read-only, for reads (documents and position from one snapshot). PostgreSQL
        errors that escape are ServiceUnavailable; a write wakes the tailer at once."""
        if self._pool is None:
            raise ServiceUnavailable("the change feed is not running")
        try:
            async with (
                self._pool.acquire(timeout=_COMMAND_TIMEOUT_S) as conn,
                conn.transaction(isolation="read_committed" if write else "repeatable_read",
                                 readonly=not write),
            ):
                yield conn
        except _UNAVAILABLE as exc:
            raise ServiceUnavailable(f"PostgreSQL at {self._where}: {exc}") from exc
        finally:
            if write:
                self._wake.set()

    async def _position(self, conn: _Connection) -> int:
        """The newest committed change this transaction sees: the log's highest seq (or,
        when pruning emptied it, the last pruned one). Exact, by the order lock."""
        value = await conn.fetchval(
            f"SELECT greatest((SELECT max(seq) FROM {self._names.changes}), "
            f"(SELECT value::bigint FROM {self._names.state} WHERE name = 'pruned_through'))")
        return int(cast(int, value or 0))

    async def _last_change(self, conn: _Connection) -> int:
        """The seq this transaction's last change took (its trigger ran in this session)."""
        return int(cast(int, await conn.fetchval(
            f"SELECT currval({_literal(self._names.sequence)})")))

    # -- writes (managed collections) ---------------------------------------------------

    async def insert(self, name: str, document: JSONObject) -> WriteResult:
        shape = self._managed(name)
        doc_id = check_document_id(document["id"]) if "id" in document else uuid.uuid4().hex
        own = own_fields(document)
        shape.config.validate(own)
        async with self._transaction(write=True) as conn:
            try:
                text = await conn.fetchval(
                    f"INSERT INTO {shape.table} AS t (id, doc) VALUES ($1, $2::jsonb) "
                    f"RETURNING {shape.document()}::text", doc_id, json.dumps(own))
            except asyncpg.UniqueViolationError:
                raise Conflict(f"a document with id {doc_id!r} exists already") from None
            except asyncpg.DataError as exc:
                raise BadRequest(f"the document cannot be stored: {exc}") from None
            seq = await self._last_change(conn)
        return WriteResult(_doc(text), self._token(seq))

    async def replace(self, name: str, doc_id: str, document: JSONObject) -> WriteResult:
        shape = self._managed(name)
        if "id" in document and document["id"] != doc_id:
            raise SchemaViolation("the id cannot change", [{
                "field": "id", "message": "the id in the document differs from the URL's"}])
        own = own_fields(document)
        shape.config.validate(own)
        async with self._transaction(write=True) as conn:
            try:
                text = await conn.fetchval(
                    f"UPDATE {shape.table} AS t SET doc = $2::jsonb, updated_at = now() "
                    f"WHERE id = $1 RETURNING {shape.document()}::text", doc_id, json.dumps(own))
            except asyncpg.DataError as exc:
                raise BadRequest(f"the document cannot be stored: {exc}") from None
            if text is None:
                raise NotFound(f"no document {doc_id!r} in {name}")
            # The trigger logged an UPDATE; through the API a PUT is a replace.
            seq = await conn.fetchval(
                f"UPDATE {self._names.changes} SET op = 'replace' "
                f"WHERE seq = currval({_literal(self._names.sequence)}) RETURNING seq")
        return WriteResult(_doc(text), self._token(int(cast(int, seq))))

    async def update(self, name: str, doc_id: str, patch: JSONObject) -> WriteResult:
        shape = self._managed(name)
        if "id" in patch and patch["id"] != doc_id:
            raise SchemaViolation("the id cannot change", [{
                "field": "id", "message": "the id in the patch differs from the URL's"}])
        patch = own_fields(patch)
        async with self._transaction(write=True) as conn:
            # The order lock before the row lock, as the statement trigger does for any
            # writer: holding the row and waiting for the order lock could deadlock.
            await conn.execute(f"SELECT pg_advisory_xact_lock({self._names.order_key})")
            current_text = await conn.fetchval(
                f"SELECT doc::text FROM {shape.table} WHERE id = $1 FOR UPDATE", doc_id)
            if current_text is None:
                raise NotFound(f"no document {doc_id!r} in {name}")
            current = _doc(current_text)
            merged = cast(JSONObject, merge_patch(current, patch))
            if same_json(current, merged):  # a patch that changes nothing makes no change
                text = await conn.fetchval(
                    f"SELECT {shape.document()}::text FROM {shape.table} AS t WHERE id = $1",
                    doc_id)
                return WriteResult(_doc(text), self._token(await self._position(conn)))
            shape.config.validate(merged)
            try:
                text = await conn.fetchval(
                    f"UPDATE {shape.table} AS t SET doc = $2::jsonb, updated_at = now() "
                    f"WHERE id = $1 RETURNING {shape.document()}::text",
                    doc_id, json.dumps(merged))
            except asyncpg.DataError as exc:
                raise BadRequest(f"the document cannot be stored: {exc}") from None
            seq = await self._last_change(conn)
        return WriteResult(_doc(text), self._token(seq))

    async def delete(self, name: str, doc_id: str) -> WriteResult:
        shape = self._managed(name)
        async with self._transaction(write=True) as conn:
            text = await conn.fetchval(
                f"DELETE FROM {shape.table} AS t WHERE id = $1 "
                f"RETURNING {shape.document()}::text", doc_id)
            if text is None:
                raise NotFound(f"no document {doc_id!r} in {name}")
            seq = await self._last_change(conn)
        return WriteResult(_doc(text), self._token(seq))

    # -- reads ----------------------------------------------------------------------------

    async def get(self, name: str, doc_id: str) -> Snapshot:
        shape = self._shape(name)
        async with self._transaction(write=False) as conn:
            token = self._token(await self._position(conn))
            try:
                text = await conn.fetchval(
                    f"SELECT {shape.document()}::text FROM {shape.table} AS t "
                    f"WHERE {shape.key_column()} = {shape.key_param('$1')}", doc_id)
            except asyncpg.DataError:  # not a value of the key's type: no such document
                text = None
            if text is None:
                raise NotFound(f"no document {doc_id!r} in {name}")
        return Snapshot(_doc(text), token)

    async def list(self, name: str, query: ListQuery) -> Page:
        shape = self._shape(name)
        key = shape.config.key
        sort = query.sort or ("created_at" if shape.managed else key)
        sort_expr, sort_value = shape.sort_columns(sort)
        key_expr = shape.key_column()
        params: list[object] = []
        where = [shape.filter_sql(flt, params) for flt in query.filters]
        direction = "DESC" if query.descending else "ASC"
        compare = "<" if query.descending else ">"
        if query.after is not None:
            value, last_key = query.after
            params.append(_cursor_text(last_key))
            key_param = shape.key_param(f"${len(params)}")
            if sort_expr == key_expr:
                where.append(f"{key_expr} {compare} {key_param}")
            else:
                if not isinstance(value, str):
                    raise BadRequest("malformed cursor")
                params.append(value)
                where.append(f"({sort_expr}, {key_expr}) {compare} "
                             f"(${len(params)}::text::timestamptz, {key_param})")
        params.append(query.limit + 1)
        sql = (f"SELECT {sort_value}, to_jsonb({key_expr})::text, {shape.document()}::text "
               f"FROM {shape.table} AS t"
               + (f" WHERE {' AND '.join(where)}" if where else "")
               + f" ORDER BY {sort_expr} {direction}"
               + (f", {key_expr} {direction}" if sort_expr != key_expr else "")
               + f" LIMIT ${len(params)}")
        async with self._transaction(write=False) as conn:
            token = self._token(await self._position(conn))
            try:
                rows = await conn.fetch(sql, *params)
            except asyncpg.DataError:  # a cursor value that is not of the column's type
                raise BadRequest("malformed cursor") from None
        next_cursor = None
        if len(rows) > query.limit:
            rows = rows[:query.limit]
            sort_text, key_json, _ = rows[-1]
            last_key = cast(JSONValue, json.loads(str(key_json)))
            cursor_value = last_key if sort_expr == key_expr else str(sort_text)
            next_cursor = query.cursor_after(sort, cursor_value, last_key)
        return Page(tuple(_doc(row[2]) for row in rows), next_cursor, token)

    # -- resuming -------------------------------------------------------------------------

    async def resolve(self, token: str) -> ResumePoint:
        parsed = ResumeToken.parse(token)
        if not self.active or parsed.epoch != self.epoch:
            raise UnknownToken("the resume token is not from this database's change log")
        changes = self._names.changes
        async with self._transaction(write=False) as conn:
            high = await self._position(conn)
            pruned = int(cast(str, await conn.fetchval(
                f"SELECT value FROM {self._names.state} WHERE name = 'pruned_through'")))
            # The newest change at or before the token (the token itself, unless it names
            # a gap: a rolled-back seq), else the first change of the log.
            at_or_before = await conn.fetchval(
                f"SELECT max(seq) FROM {changes} WHERE seq <= $1", parsed.seq)
            first = await conn.fetchval(f"SELECT min(seq) FROM {changes}")
        if parsed.seq > high:
            raise UnknownToken("the resume token names a change this database has not had")
        if parsed.seq < pruned:
            raise TokenTooOld(
                f"the change log no longer holds the changes after {parsed}: "
                f"it starts after {self._token(pruned)}; load a new snapshot")
        # Pruning records the last change it removed, so `pruned` is a change too.
        anchor = int(cast(int, at_or_before or pruned))
        transport = self._hub.transport
        if anchor == 0:  # no change at or before the token: replay them all
            if first is not None:
                first_seq = int(cast(int, first))
                await self._wait_published(first_seq)
                if await transport.find(str(self._token(first_seq))) is None:
                    raise TokenTooOld("the hub's history no longer holds the first change")
            return ResumePoint(parsed, EARLIEST)
        await self._wait_published(anchor)
        if await transport.find(str(self._token(anchor))) is None:
            raise TokenTooOld(
                f"the hub's history (--history-size, --history-max-age) no longer holds "
                f"change {self._token(anchor)}; load a new snapshot")
        return ResumePoint(parsed, str(self._token(anchor)))

    async def _published_through(self) -> int:
        if self._leader:
            return self._published
        async with self._transaction(write=False) as conn:  # another process tails
            return int(cast(str, await conn.fetchval(
                f"SELECT value FROM {self._names.state} WHERE name = 'cursor'")))

    async def _wait_published(self, seq: int) -> None:
        deadline = time.monotonic() + _RESOLVE_WAIT_S
        while await self._published_through() < seq:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServiceUnavailable("the change feed is behind; try again")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, _STANDBY_POLL_S)):
                    await self._progress.wait()

    def _notify_progress(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    # -- the tailer -----------------------------------------------------------------------

    async def _run_tailer(self) -> None:
        await run_with_backoff(self._lead, what="change feed",
                               position=lambda: f"change {self._published}")

    async def _lead(self) -> None:
        """Become the schema's tailer (or wait until this process may) and tail. Returns
        only by raising: a lost connection, after which `_run_tailer` starts over."""
        names = self._names
        try:
            conn = cast(_Connection, await asyncpg.connect(
                self._dsn, timeout=_CONNECT_TIMEOUT_S, command_timeout=None,
                server_settings={"application_name": f"tidings-feed-tailer:{names.schema}"[:63]}))
        except _UNAVAILABLE as exc:
            raise ServiceUnavailable(f"cannot reach PostgreSQL at {self._where}: {exc}") from exc
        try:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", names.tailer_key,
                                       timeout=_COMMAND_TIMEOUT_S):
                log.info("change feed: another process tails schema %s; this one stands by",
                         names.schema)
                # Granted when the tailer's session ends. Not LISTENing meanwhile: a
                # session that never reads its notifications holds the queue's tail.
                await conn.fetchval("SELECT pg_advisory_lock($1)", names.tailer_key)
            wake = self._wake
            conn.add_termination_listener(lambda _conn: wake.set())
            # LISTEN before the first read: anything committed after that read notifies.
            await conn.add_listener(names.channel, lambda _c, _pid, _ch, _payload: wake.set())
            self._published = int(cast(str, await conn.fetchval(
                f"SELECT value FROM {names.state} WHERE name = 'cursor'",
                timeout=_COMMAND_TIMEOUT_S)))
            self._leader = True
            log.info("change feed: tailing schema %s after change %s", names.schema,
                     self._published)
            await self._tail(conn)
        finally:
            self._leader = False
            await _close_quietly(conn)  # ends the session: another process may tail

    async def _tail(self, conn: _Connection) -> None:
        names = self._names
        read = (f"SELECT seq, coll, op, doc_key::text, old_doc::text, new_doc::text, "
                f"{_iso('wall_time')} FROM {names.changes} WHERE seq > $1 ORDER BY seq "
                f"LIMIT {_BATCH}")
        # Never backwards: a tailer that lost its session may still finish a batch after
        # the next one took over (the transport stores the repeated updates once).
        save = (f"UPDATE {names.state} SET value = $1::bigint::text "
                f"WHERE name = 'cursor' AND value::bigint < $1::bigint")
        while True:
            # Cleared before reading: a write committed while we read or publish makes
            # the wait below return at once.
            self._wake.clear()
            rows = await conn.fetch(read, self._published, timeout=_COMMAND_TIMEOUT_S)
            for row in rows:
                update = await self._update_for(row)
                if update is not None:
                    await self._hub.publish(update)
                self._published = int(cast(int, row[0]))
            if rows:
                # Saved only after the hub acknowledged: a crash before this republishes
                # the batch, and the transport stores each identical update once.
                await conn.execute(save, self._published, timeout=_COMMAND_TIMEOUT_S)
                self._notify_progress()
                if time.monotonic() - self._last_prune >= _PRUNE_EVERY_S:
                    await self.prune()
            if len(rows) < _BATCH:
                # Woken by a NOTIFY, a write through this process's API, the connection
                # closing (the next read raises), or after _RECHECK_S.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_RECHECK_S):
                        await self._wake.wait()

    async def _update_for(self, row: Sequence[object]) -> Update | None:
        seq, coll, op, key, old, new, wall_time = row
        try:
            change = ChangeRow.decode(int(cast(int, seq)), str(coll), str(op), str(key),
                                      cast("str | None", old), cast("str | None", new),
                                      str(wall_time))
        except ValueError as exc:
            log.error("change %s cannot be read (%s): skipped", seq, exc)
            return None
        if change.collection not in self._shapes:
            await self._reload_watched()
        shape = self._shapes.get(change.collection)
        # A collection nobody configured (left-over triggers): private, the safe default.
        private = True if shape is None else shape.config.private
        return change_update(change, db=self._db_name, epoch=self.epoch, private=private)

    async def _reload_watched(self) -> None:
        """A change of a table nobody told this process about (`tidings watch` while
        running): learn the tables watched since startup."""
        async with self._transaction(write=False) as conn:
            for config in await _watched(conn, self._names):
                if config.name in self._shapes:
                    continue
                try:
                    shape = await _table_shape(conn, self._names, config)
                except ConfigError as exc:
                    log.warning("cannot serve watched table %s: %s", config.name, exc)
                    continue
                self._shapes = {**self._shapes, config.name: shape}

    # -- retention ------------------------------------------------------------------------

    async def prune(self) -> int:
        """Apply retention (only the tailing process prunes: it knows what is published).

        `pruned_through` becomes the last change removed, a real change, so that a token
        at that position still has an update in the hub's history to resume after."""
        self._last_prune = time.monotonic()
        if not self._leader:
            return 0
        names = self._names
        published = self._published
        retention = self._retention
        async with self._transaction(write=True) as conn:
            pruned = int(cast(str, await conn.fetchval(
                f"SELECT value FROM {names.state} WHERE name = 'pruned_through'")))
            limit = min(published, await self._position(conn) - retention.size)
            if retention.max_age_s > 0:
                # wall_time is stamped under the order lock, so it grows with seq: all
                # below the first young change are old.
                young = await conn.fetchval(
                    f"SELECT seq FROM {names.changes} WHERE wall_time >= clock_timestamp() "
                    f"- make_interval(secs => $1::float8) ORDER BY seq LIMIT 1",
                    retention.max_age_s)
                aged = published if young is None else min(published, int(cast(int, young)) - 1)
                limit = max(limit, aged)
            if limit <= pruned:
                return 0
            row = await conn.fetchrow(
                f"WITH gone AS (DELETE FROM {names.changes} WHERE seq <= $1 RETURNING seq) "
                f"SELECT count(*), max(seq) FROM gone", limit)
            removed, last = (0, None) if row is None else (int(cast(int, row[0])), row[1])
            if last is not None:
                await conn.execute(
                    f"UPDATE {names.state} SET value = $1 WHERE name = 'pruned_through'",
                    str(last))
        if removed:
            log.debug("change feed: pruned %d changes (through %s)", removed, last)
        return int(removed)

