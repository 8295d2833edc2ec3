"""`tidings watch` on SQLite: install a table's triggers and register it, or undo that.

It works while a server runs on the same file: the triggers capture changes from the
moment they commit, and every server process learns the table within a second (the
registries' version changes: `feeds/definitions.py`).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator

from tidings.feeds.config import CollectionConfig, validate_name
from tidings.feeds.errors import ConfigError
from tidings.feeds.sqlite.schema import (
    bump_catalog,
    drop_triggers,
    ensure_schema,
    install,
    watched,
)
from tidings.sqlitedb import connect, transaction

__all__ = ["path_of", "unwatch_table", "watch_table", "watched_tables"]


def path_of(url_or_path: str) -> str:
    """The file of `sqlite:///FILE` (or a plain path)."""
    path = url_or_path.split("sqlite:///", 1)[-1] if url_or_path.startswith("sqlite:") else (
        url_or_path)
    if not path or path == ":memory:" or url_or_path.startswith("memory:"):
        raise ConfigError("change feeds need a database file (--db sqlite:///FILE)")
    return path


@contextlib.contextmanager
def _registry_change(db_url: str, table: str, refusal: str) -> Iterator[sqlite3.Connection]:
    """A transaction that changes the watched-table registry: the schema exists, and
    `table` is not a managed collection (else ConfigError, ending `refusal`)."""
    db = connect(path_of(db_url))
    try:
        ensure_schema(db)
        with transaction(db):
            if db.execute("SELECT 1 FROM tidings_collections WHERE name = ?",
                          (table,)).fetchone():
                raise ConfigError(f"{table} is a managed collection{refusal}")
            yield db
    finally:
        db.close()


def watch_table(db_url: str, table: str, *, key: str = "", read: str = "private") -> str:
    """`tidings watch TABLE`: install the triggers and remember the table. Returns its key.

    Works while a server runs: the triggers capture changes from the moment they commit,
    and every server process picks the table up within a second."""
    validate_name(table, "table")
    if read not in ("public", "private"):
        raise ConfigError("read must be public or private")
    with _registry_change(db_url, table, " (tidings collection)") as db:
        shape = install(db, CollectionConfig(table, "table", key,
                                             "public" if read == "public" else "private",
                                             "none"))
        db.execute("INSERT OR REPLACE INTO tidings_watched (name, key, read) "
                   "VALUES (?, ?, ?)", (table, shape.config.key, read))
        bump_catalog(db)
    return shape.config.key


def unwatch_table(db_url: str, table: str) -> bool:
    """Drop a table's triggers and forget it; False when it was not watched."""
    with _registry_change(db_url, table, f": tidings collection drop {table} drops it") as db:
        for statement in drop_triggers(table):
            db.execute(statement)
        bump_catalog(db)
        return db.execute("DELETE FROM tidings_watched WHERE name = ?",
                          (table,)).rowcount > 0


def watched_tables(db_url: str) -> list[CollectionConfig]:
    """The tables `tidings watch` registered in the file ([] when none ever was)."""
    db = connect(path_of(db_url))
    try:
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'tidings_watched'").fetchone():
            return watched(db)
        return []
    finally:
        db.close()
