"""The SQLite feed's schema: the change log, its state, and how each collection is captured.

Every watched table (a managed collection, or a table of the user's own schema) gets three
triggers, AFTER INSERT / UPDATE / DELETE, that append a row to `tidings_changes` in the
writer's own transaction: the document key, the row before and after as JSON
(`json_object` over the columns), and the database's clock. So a change by any writer,
the `sqlite3` shell or the user's application, is captured exactly as one made through
the API, and only if it commits. SQLite has one writer at a time, so the log's
AUTOINCREMENT `seq` is commit order, and it is never reused, even after pruning.

`tidings_feed_state` holds the log's epoch, the tailer's cursor, how far the log was
pruned and the registries' version (`catalog`, bumped by every change of them);
`tidings_watched` the tables `tidings watch` registered; `tidings_collections` the
collections defined at run time (`feeds/definitions.py`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from tidings.errors import BadRequest
from tidings.feeds.config import CollectionConfig
from tidings.feeds.errors import ConfigError
from tidings.feeds.query import FieldFilter
from tidings.feeds.sqltext import ident, literal
from tidings.sqlitedb import create

__all__ = [
    "NOW",
    "Shape",
    "bump_catalog",
    "catalog_version",
    "ensure_schema",
    "high_water",
    "install",
    "managed_shape",
    "read_state",
    "table_columns",
    "table_shape",
    "watched",
]

NOW = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS tidings_changes (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    coll      TEXT NOT NULL,
    op        TEXT NOT NULL,
    doc_key   TEXT NOT NULL,
    old_doc   TEXT,
    new_doc   TEXT,
    wall_time TEXT NOT NULL DEFAULT ({NOW})
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
CREATE TABLE IF NOT EXISTS tidings_collections (
    name   TEXT PRIMARY KEY COLLATE NOCASE,
    read   TEXT NOT NULL,
    write  TEXT NOT NULL,
    schema TEXT
);
"""
# SQLite functions take at most 127 arguments (SQLITE_MAX_FUNCTION_ARG): a row's JSON is
# built 60 columns at a time.
_PAIRS_PER_CALL = 60


def _json_path(path: Sequence[str]) -> str:
    return "$" + "".join(f'."{segment}"' for segment in path)


# -- how a collection's rows become JSON, in SQL ----------------------------------------


@dataclass(frozen=True, slots=True)
class Shape:
    """A collection's SQL: its table, key column, and expressions for the document."""

    config: CollectionConfig
    columns: tuple[str, ...]  # tables: every column, in order; managed: the four

    @property
    def table(self) -> str:
        return ident(self.config.name)

    @property
    def managed(self) -> bool:
        return self.config.kind == "managed"

    def key_column(self, row: str) -> str:
        key = self.config.key
        return f"{row}.rowid" if key == "rowid" else f"{row}.{ident(key)}"

    def key_json(self, row: str) -> str:
        return f"json_object({literal(self.config.key)}, {self.key_column(row)})"

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
            (column, f"CASE WHEN typeof({row}.{ident(column)}) = 'blob' "
                     f"THEN hex({row}.{ident(column)}) ELSE {row}.{ident(column)} END")
            for column in self.columns
        ]
        head, rest = values[:_PAIRS_PER_CALL], values[_PAIRS_PER_CALL:]
        expr = "json_object(" + ", ".join(f"{literal(c)}, {v}" for c, v in head) + ")"
        while rest:
            chunk, rest = rest[:_PAIRS_PER_CALL], rest[_PAIRS_PER_CALL:]
            expr = "json_insert(" + expr + "".join(
                f", {literal(_json_path([c]))}, {v}" for c, v in chunk) + ")"
        return expr

    def triggers(self) -> list[str]:
        name = self.config.name
        coll = literal(name)
        log_insert = "INSERT INTO tidings_changes (coll, op, doc_key, old_doc, new_doc) VALUES"
        statements = drop_triggers(name)
        statements += [
            f"CREATE TRIGGER {ident(f'tidings_{name}_insert')} AFTER INSERT ON {self.table} "
            f"BEGIN {log_insert} ({coll}, 'insert', {self.key_json('NEW')}, NULL, "
            f"{self.document('NEW')}); END",
            f"CREATE TRIGGER {ident(f'tidings_{name}_update')} AFTER UPDATE ON {self.table} "
            f"BEGIN {log_insert} ({coll}, 'update', {self.key_json('NEW')}, "
            f"{self.document('OLD')}, {self.document('NEW')}); END",
            f"CREATE TRIGGER {ident(f'tidings_{name}_delete')} AFTER DELETE ON {self.table} "
            f"BEGIN {log_insert} ({coll}, 'delete', {self.key_json('OLD')}, "
            f"{self.document('OLD')}, NULL); END",
        ]
        return statements

    # -- lists -------------------------------------------------------------------------

    def sort_column(self, sort: str) -> str:
        allowed = ("created_at", "updated_at", "id") if self.managed else (self.config.key,)
        if sort not in allowed:
            raise BadRequest(f"sort must be one of {', '.join(allowed)} (or -FIELD)")
        return self.key_column(self.table) if sort == self.config.key else ident(sort)

    def filter_sql(self, flt: FieldFilter) -> tuple[str, list[object]]:
        if self.managed:
            if flt.path in (("id",), ("created_at",), ("updated_at",)):
                expr = f"{self.table}.{ident(flt.path[0])}"
                params: list[object] = []
            else:
                expr = f"json_extract({self.table}.doc, ?)"
                params = [_json_path(flt.path)]
        else:
            if len(flt.path) != 1 or (flt.path[0] not in self.columns and (
                    flt.path[0] != self.config.key)):
                raise BadRequest(f"{flt.field!r} is not a column of {self.config.name}")
            expr = self.key_column(self.table) if flt.path[0] == self.config.key else (
                f"{self.table}.{ident(flt.path[0])}")
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


def drop_triggers(table: str) -> list[str]:
    return [f"DROP TRIGGER IF EXISTS {ident(f'tidings_{table}_{op}')}"
            for op in ("insert", "update", "delete")]


# -- the log and its state -----------------------------------------------------------------


def ensure_schema(db: sqlite3.Connection) -> str:
    """Create the change log and state tables; returns the log's epoch."""
    epoch = create(db, _SCHEMA, "tidings_feed_state")
    db.execute("INSERT OR IGNORE INTO tidings_feed_state VALUES ('pruned_through', '0')")
    return epoch


def high_water(db: sqlite3.Connection) -> int:
    """The newest seq the log ever had (AUTOINCREMENT's counter: pruning keeps it)."""
    row = db.execute(
        "SELECT seq FROM sqlite_sequence WHERE name = 'tidings_changes'").fetchone()
    return 0 if row is None else int(row[0])


def read_state(db: sqlite3.Connection, name: str) -> int:
    row = db.execute("SELECT value FROM tidings_feed_state WHERE name = ?",
                     (name,)).fetchone()
    return 0 if row is None else int(row[0])


def catalog_version(db: sqlite3.Connection) -> int:
    """The registries' version (0 in a file the feed never set up)."""
    try:
        return read_state(db, "catalog")
    except sqlite3.OperationalError:  # no tidings_feed_state yet
        return 0


def bump_catalog(db: sqlite3.Connection) -> None:
    """A registry changed (in the caller's transaction): every process rereads them."""
    db.execute("INSERT INTO tidings_feed_state VALUES ('catalog', '1') ON CONFLICT (name) "
               "DO UPDATE SET value = CAST(value AS INTEGER) + 1")


# -- collections ------------------------------------------------------------------------------


def table_columns(db: sqlite3.Connection, name: str) -> list[tuple[str, int]]:
    """(column, primary-key position) of a table, [] when there is no such table."""
    kind = db.execute("SELECT type FROM sqlite_master WHERE name = ? COLLATE NOCASE",
                      (name,)).fetchone()
    if kind is None:
        return []
    if kind[0] != "table":
        raise ConfigError(f"{name} is a {kind[0]}, not a table: only tables can be watched")
    return [(str(row[1]), int(row[5]))
            for row in db.execute(f"PRAGMA table_info({ident(name)})")]


def table_shape(db: sqlite3.Connection, config: CollectionConfig) -> Shape:
    columns = table_columns(db, config.name)
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
            db.execute(f"SELECT rowid FROM {ident(config.name)} LIMIT 0")
        except sqlite3.OperationalError:
            raise ConfigError(f"{config.name} has no rowid: name its key column "
                              "(key = \"...\" or tidings watch --key)") from None
    elif key not in names:
        raise ConfigError(f"{config.name} has no column {key!r} to use as its key")
    return Shape(CollectionConfig(config.name, "table", key, config.read, "none"), names)


def _managed_shape(db: sqlite3.Connection, config: CollectionConfig) -> Shape:
    table = ident(config.name)
    existing = {c for c, _ in table_columns(db, config.name)}
    if existing and not {"id", "doc", "created_at", "updated_at"} <= existing:
        raise ConfigError(
            f"a table {config.name!r} exists and is not a Tidings collection: watch it as "
            f"[tables.{config.name}] instead")
    db.execute(f"""CREATE TABLE IF NOT EXISTS {table} (
        id         TEXT PRIMARY KEY NOT NULL,
        doc        TEXT NOT NULL DEFAULT '{{}}'
                   CHECK (json_valid(doc) AND json_type(doc) = 'object'),
        created_at TEXT NOT NULL DEFAULT ({NOW}),
        updated_at TEXT NOT NULL DEFAULT ({NOW})
    )""")
    for column in ("created_at", "updated_at"):
        db.execute(f"CREATE INDEX IF NOT EXISTS {ident(f'tidings_{config.name}_{column}')} "
                   f"ON {table} ({column}, id)")
    return managed_shape(config)


def managed_shape(config: CollectionConfig) -> Shape:
    """The shape of a managed collection whose table exists (`install` creates it)."""
    return Shape(config, ("id", "doc", "created_at", "updated_at"))


def install(db: sqlite3.Connection, config: CollectionConfig) -> Shape:
    """Create a managed collection's table, or check a watched one; (re)create its
    triggers. Returns its shape."""
    shape = _managed_shape(db, config) if config.kind == "managed" else table_shape(db, config)
    for statement in shape.triggers():
        db.execute(statement)
    return shape


def watched(db: sqlite3.Connection) -> list[CollectionConfig]:
    """The tables `tidings watch` registered."""
    rows = db.execute("SELECT name, key, read FROM tidings_watched ORDER BY name").fetchall()
    return [CollectionConfig(str(name), "table", str(key),
                             "public" if read == "public" else "private", "none")
            for name, key, read in rows]
