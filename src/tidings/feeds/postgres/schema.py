"""The PostgreSQL feed's collections: how each table's rows become documents, in SQL.

A managed collection is a table `(id text, doc jsonb, created_at, updated_at)` Tidings
creates; a watched table is the user's own, read as is (`to_jsonb(row)`), keyed by its
single-column primary key or a column the configuration names. Both live in the feed's
schema. The change log and the triggers that fill it are `capture.py`'s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tidings.errors import BadRequest
from tidings.feeds.config import CollectionConfig
from tidings.feeds.errors import ConfigError
from tidings.feeds.query import FieldFilter
from tidings.feeds.sqltext import ident, literal
from tidings.pgdb import Connection

__all__ = [
    "Shape",
    "create_index",
    "iso",
    "managed",
    "managed_document",
    "managed_shape",
    "table_columns",
    "table_shape",
]

_ISO = 'YYYY-MM-DD"T"HH24:MI:SS.{}"Z"'


def iso(expr: str, unit: str = "MS") -> str:
    """`expr` (a timestamptz) as ISO 8601 UTC text: milliseconds (documents, wallTime,
    as SQLite writes them) or microseconds (`US`: list cursors, which must be exact)."""
    return f"to_char({expr} AT TIME ZONE 'UTC', {literal(_ISO.format(unit))})"


def managed_document(row: str) -> str:
    """The document of a managed collection's `row` (NEW, OLD or a table alias): the
    stored fields, then the metadata columns, which win over stored fields of that name."""
    return (f"({row}.doc || jsonb_build_object('id', {row}.id, "
            f"'created_at', {iso(f'{row}.created_at')}, "
            f"'updated_at', {iso(f'{row}.updated_at')}))")


@dataclass(frozen=True, slots=True)
class Shape:
    """A collection's SQL: its table, key column (and its type), and the document."""

    config: CollectionConfig
    schema: str
    columns: tuple[str, ...]  # tables: every column, in order; managed: the four
    key_type: str  # the key column's SQL type (format_type)

    @property
    def table(self) -> str:
        return f"{ident(self.schema)}.{ident(self.config.name)}"

    @property
    def managed(self) -> bool:
        return self.config.kind == "managed"

    def key_column(self, row: str = "t") -> str:
        return f"{row}.{ident(self.config.key)}"

    def document(self, row: str = "t") -> str:
        """The document of `row` (a table alias) as jsonb: what the trigger logs."""
        return managed_document(row) if self.managed else f"to_jsonb({row})"

    def key_param(self, placeholder: str) -> str:
        """A text parameter as a value of the key column (a DataError when it is not)."""
        return f"{placeholder}::text::{self.key_type}"

    # -- lists -------------------------------------------------------------------------

    def sort_columns(self, sort: str) -> tuple[str, str]:
        """(ORDER BY expression, cursor value expression) of a sort field."""
        allowed = ("created_at", "updated_at", "id") if self.managed else (self.config.key,)
        if sort not in allowed:
            raise BadRequest(f"sort must be one of {', '.join(allowed)} (or -FIELD)")
        if sort in ("created_at", "updated_at"):
            return f"t.{sort}", iso(f"t.{sort}", "US")
        return self.key_column(), f"to_jsonb({self.key_column()})::text"

    def filter_sql(self, flt: FieldFilter, params: list[object]) -> str:
        def param(value: object) -> str:
            params.append(value)
            return f"${len(params)}"

        strings = [v for v in flt.values if isinstance(v, str)]
        if self.managed and flt.path == ("id",):
            return f"t.id = ANY({param(strings)}::text[])"
        if self.managed and flt.path in (("created_at",), ("updated_at",)):
            return f"{iso(f't.{flt.path[0]}')} = ANY({param(strings)}::text[])"
        if self.managed:
            expr = f"(t.doc #> {param(list(flt.path))}::text[])"
        else:
            if len(flt.path) != 1 or flt.path[0] not in self.columns:
                raise BadRequest(f"{flt.field!r} is not a column of {self.config.name}")
            expr = f"to_jsonb(t.{ident(flt.path[0])})"
        # jsonb equality is JSON equality: 5 = 5.0, true is not 1; a missing field (SQL
        # NULL) matches `null`, as a JSON null does.
        condition = f"{expr} = ANY({param([json.dumps(v) for v in flt.values])}::jsonb[])"
        return f"({condition} OR {expr} IS NULL)" if flt.matches_null else condition


async def table_columns(conn: Connection, schema: str,
                        name: str) -> list[tuple[str, str, bool]]:
    """(column, SQL type, in a single-column primary key) of a table; [] when absent."""
    kind = await conn.fetchval(
        "SELECT c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = $1 AND c.relname = $2", schema, name)
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
           ORDER BY a.attnum""", schema, name)
    return [(str(column), str(type_), bool(primary)) for column, type_, primary in rows]


async def table_shape(conn: Connection, schema: str, config: CollectionConfig) -> Shape:
    """The shape of a watched table of the user's; ConfigError when it cannot be one."""
    columns = await table_columns(conn, schema, config.name)
    if not columns:
        raise ConfigError(f"there is no table {config.name!r} to watch in schema {schema!r}")
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
    return Shape(CollectionConfig(config.name, "table", key, config.read, "none"),
                 schema, tuple(types), types[key])


async def managed_shape(conn: Connection, schema: str, config: CollectionConfig) -> Shape:
    """Create a managed collection's table (and its list indexes) if missing."""
    existing = {column for column, _, _ in await table_columns(conn, schema, config.name)}
    if existing and not {"id", "doc", "created_at", "updated_at"} <= existing:
        raise ConfigError(
            f"a table {config.name!r} exists and is not a Tidings collection: watch it as "
            f"[tables.{config.name}] instead")
    shape = managed(schema, config)
    await conn.execute(f"""CREATE TABLE IF NOT EXISTS {shape.table} (
        id         text PRIMARY KEY,
        doc        jsonb NOT NULL DEFAULT '{{}}' CHECK (jsonb_typeof(doc) = 'object'),
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now()
    )""")
    for column in ("created_at", "updated_at"):
        index = ident(f"tidings_{column}_{config.name}")
        await conn.execute(create_index(ident(schema), index, shape.table, f"{column}, id"))
    return shape


def create_index(schema: str, index: str, table: str, columns: str) -> str:
    """A statement that creates the index when it is missing (`schema`, `index` and
    `table` quoted). Not CREATE INDEX IF NOT EXISTS alone: that takes a SHARE lock on the
    table before it looks, which holds up every writer of the table until the caller's
    transaction ends, and deadlocks with one that then waits on a lock the caller holds."""
    return (f"DO $tidings$ BEGIN IF to_regclass({literal(f'{schema}.{index}')}) IS NULL THEN "
            f"CREATE INDEX IF NOT EXISTS {index} ON {table} ({columns}); END IF; END $tidings$")


def managed(schema: str, config: CollectionConfig) -> Shape:
    """The shape of a managed collection whose table exists (`managed_shape` creates it)."""
    return Shape(config, schema, ("id", "doc", "created_at", "updated_at"), "text")
