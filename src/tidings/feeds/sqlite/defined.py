"""Collections defined at run time on SQLite: the registry `tidings_collections`, for the
feed (`PUT` / `DELETE /api/collections/NAME`) and for `tidings collection`.

What the registry promises is `feeds/definitions.py`'s. Here: a definition and its table
change in one transaction, with the registry's version bumped (other processes look at it
when `PRAGMA data_version` says the file changed) and the registry's own triggers logging
the change. SQLite has one writer at a time, so a collection's changes are all in the log
before its `drop`. Names compare without case, as SQLite's table names do.
"""

from __future__ import annotations

import sqlite3

from tidings.feeds.config import CollectionConfig
from tidings.feeds.definitions import REGISTRY_CAPTURE, from_stored, stored
from tidings.feeds.errors import ConfigError, NameTaken, UnknownCollection
from tidings.feeds.sqlite.schema import bump_catalog, drop_triggers, ensure_schema, install
from tidings.feeds.sqlite.watch import path_of
from tidings.feeds.sqltext import ident
from tidings.sqlitedb import connect, transaction

__all__ = [
    "create_collection",
    "define",
    "defined",
    "defined_collections",
    "drop_collection",
    "undefine",
]


def defined(db: sqlite3.Connection) -> list[CollectionConfig]:
    """The collections defined in the file ([] when none ever was)."""
    if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'tidings_collections'").fetchone():
        rows = db.execute(
            "SELECT name, read, write, schema FROM tidings_collections ORDER BY name")
        return [config for config in map(from_stored, rows) if config is not None]
    return []


def define(db: sqlite3.Connection, config: CollectionConfig) -> bool:
    """Create the collection (its table, triggers and registry row) or replace its
    settings, in one transaction; True when it is new. The schema must exist
    (`ensure_schema`)."""
    name = config.name
    with transaction(db):
        row = db.execute("SELECT name, read, write, schema FROM tidings_collections "
                         "WHERE name = ?", (name,)).fetchone()
        if row is not None and row[0] != name:
            raise NameTaken(f"a collection named {row[0]} exists (SQLite compares table "
                            f"names without case)")
        if row is not None and tuple(row) == stored(config):
            return False  # nothing changes: no change in the log either
        if db.execute("SELECT 1 FROM tidings_watched WHERE name = ?", (name,)).fetchone():
            raise NameTaken(f"{name} is a watched table (tidings watch {name} --stop first)")
        try:
            install(db, config)
        except ConfigError as exc:  # a table, view, ... of that name that is not one
            raise NameTaken(exc.message) from None
        install(db, REGISTRY_CAPTURE)
        db.execute("INSERT INTO tidings_collections (name, read, write, schema) "
                   "VALUES (?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET read = excluded.read, "
                   "write = excluded.write, schema = excluded.schema", stored(config))
        bump_catalog(db)
    return row is None


def undefine(db: sqlite3.Connection, name: str) -> None:
    """Drop a defined collection: its registry row (logged: the `drop` event), triggers
    and table, in one transaction."""
    with transaction(db):
        row = db.execute("SELECT name FROM tidings_collections WHERE name = ?",
                         (name,)).fetchone()
        if row is None or row[0] != name:
            if db.execute("SELECT 1 FROM tidings_watched WHERE name = ?", (name,)).fetchone():
                raise NameTaken(f"{name} is a watched table: stop watching it with "
                                f"tidings watch {name} --stop")
            raise UnknownCollection(f"no collection named {name!r} is defined")
        db.execute("DELETE FROM tidings_collections WHERE name = ?", (name,))
        for statement in drop_triggers(name):
            db.execute(statement)
        db.execute(f"DROP TABLE IF EXISTS {ident(name)}")
        bump_catalog(db)


# -- `tidings collection` ----------------------------------------------------------------


def create_collection(db_url: str, config: CollectionConfig) -> bool:
    """`tidings collection create`: define (or replace) `config`; True when new."""
    db = connect(path_of(db_url))
    try:
        ensure_schema(db)
        return define(db, config)
    finally:
        db.close()


def drop_collection(db_url: str, name: str) -> None:
    """`tidings collection drop`."""
    db = connect(path_of(db_url))
    try:
        if not db.execute(
                "SELECT 1 FROM sqlite_master WHERE name = 'tidings_collections'").fetchone():
            raise UnknownCollection(f"no collection named {name!r} is defined")
        undefine(db, name)
    finally:
        db.close()


def defined_collections(db_url: str) -> list[CollectionConfig]:
    """`tidings collection list`."""
    db = connect(path_of(db_url))
    try:
        return defined(db)
    finally:
        db.close()
