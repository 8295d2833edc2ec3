"""Documents in a SQLite file through the API: writes, gets and lists, each with its token.

A write runs in one transaction on the writer thread (SQL runs off the event loop where
it may wait for SQLite's write lock, held by another writer for as long as its
transaction lasts); the triggers log its change in that transaction, and the token it
returns is that change's seq. Reads run on the loop on a second connection (in WAL mode
readers never wait for writers) and take their token from the same read transaction, so
"snapshot, then the changes after its token" has no gap and no double.
"""

from __future__ import annotations

import concurrent.futures
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar, cast

from tidings.errors import NotFound
from tidings.feeds.backend import Backend
from tidings.feeds.base import Page, Snapshot, WriteResult
from tidings.feeds.catalog import (
    new_document,
    parse_document,
    patch_fields,
    replacement,
)
from tidings.feeds.errors import Conflict
from tidings.feeds.events import JSONObject, merge_patch, same_json
from tidings.feeds.query import ListQuery
from tidings.feeds.sqlite.schema import NOW, Shape, high_water
from tidings.sqlitedb import connect, run_on, transaction

__all__ = ["Documents"]

T = TypeVar("T")


class Documents(Backend[Shape]):
    """The collections of one SQLite file: two connections, a writer thread, the shapes."""

    def __init__(self, path: str) -> None:
        super().__init__(db_name=Path(path).stem)
        self._path = path
        self._writer = connect(path)
        self._reader = connect(path)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    async def _write(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn` on the writer thread; `_written` afterwards."""
        try:
            return await run_on(self._executor, "the change feed", fn, *args)
        finally:
            self._written()

    # -- writes (managed collections) -------------------------------------------------

    async def insert(self, name: str, document: JSONObject) -> WriteResult:
        shape = self._catalog.writable(name)
        doc_id, own = new_document(shape.config, document)
        return await self._write(self._insert_sync, shape, doc_id, json.dumps(own))

    def _insert_sync(self, shape: Shape, doc_id: str, text: str) -> WriteResult:
        db = self._writer
        with transaction(db):
            try:
                # created_at is SQLite's millisecond clock, kept above the newest
                # document's (one index probe): two inserts in one millisecond would
                # otherwise tie, and the list's created_at order fall back to their ids.
                db.execute(f"INSERT INTO {shape.table} (id, doc, created_at, updated_at) "
                           f"SELECT ?, ?, t, t FROM (SELECT CASE WHEN m >= n THEN "
                           f"strftime('%Y-%m-%dT%H:%M:%fZ', m, '+0.001 seconds') ELSE n END "
                           f"AS t FROM (SELECT max(created_at) AS m, {NOW} AS n "
                           f"FROM {shape.table}))", (doc_id, text))
            except sqlite3.IntegrityError:
                raise Conflict(f"a document with id {doc_id!r} exists already") from None
            return self._result(db, shape, doc_id)

    def _result(self, db: sqlite3.Connection, shape: Shape, doc_id: str) -> WriteResult:
        row = db.execute(f"SELECT {shape.document(shape.table)} FROM {shape.table} "
                         f"WHERE id = ?", (doc_id,)).fetchone()
        return WriteResult(parse_document(row[0]), self._token(high_water(db)))

    async def replace(self, name: str, doc_id: str, document: JSONObject) -> WriteResult:
        shape = self._catalog.writable(name)
        own = replacement(shape.config, doc_id, document)
        return await self._write(self._replace_sync, shape, doc_id, json.dumps(own))

    def _replace_sync(self, shape: Shape, doc_id: str, text: str) -> WriteResult:
        db = self._writer
        with transaction(db):
            changed = db.execute(f"UPDATE {shape.table} SET doc = ?, updated_at = {NOW} "
                                 f"WHERE id = ?", (text, doc_id)).rowcount
            if not changed:
                raise NotFound(f"no document {doc_id!r} in {shape.config.name}")
            # The trigger logged an UPDATE; through the API a PUT is a replace.
            db.execute("UPDATE tidings_changes SET op = 'replace' WHERE seq = ?",
                       (high_water(db),))
            return self._result(db, shape, doc_id)

    async def update(self, name: str, doc_id: str, patch: JSONObject) -> WriteResult:
        shape = self._catalog.writable(name)
        return await self._write(self._update_sync, shape, doc_id, patch_fields(doc_id, patch))

    def _update_sync(self, shape: Shape, doc_id: str, patch: JSONObject) -> WriteResult:
        db = self._writer
        with transaction(db):
            row = db.execute(f"SELECT doc FROM {shape.table} WHERE id = ?",
                             (doc_id,)).fetchone()
            if row is None:
                raise NotFound(f"no document {doc_id!r} in {shape.config.name}")
            current = parse_document(row[0])
            merged = cast(JSONObject, merge_patch(current, patch))
            if not same_json(current, merged):
                shape.config.validate(merged)
                db.execute(f"UPDATE {shape.table} SET doc = ?, updated_at = {NOW} "
                           f"WHERE id = ?", (json.dumps(merged), doc_id))
            return self._result(db, shape, doc_id)

    async def delete(self, name: str, doc_id: str) -> WriteResult:
        shape = self._catalog.writable(name)
        return await self._write(self._delete_sync, shape, doc_id)

    def _delete_sync(self, shape: Shape, doc_id: str) -> WriteResult:
        db = self._writer
        with transaction(db):
            row = db.execute(f"SELECT {shape.document(shape.table)} FROM {shape.table} "
                             f"WHERE id = ?", (doc_id,)).fetchone()
            if row is None:
                raise NotFound(f"no document {doc_id!r} in {shape.config.name}")
            db.execute(f"DELETE FROM {shape.table} WHERE id = ?", (doc_id,))
            return WriteResult(parse_document(row[0]), self._token(high_water(db)))

    # -- reads -------------------------------------------------------------------------

    async def get(self, name: str, doc_id: str) -> Snapshot:
        shape = self._catalog.get(name)
        db = self._reader
        with transaction(db, "DEFERRED"):
            row = db.execute(
                f"SELECT {shape.document(shape.table)} FROM {shape.table} "
                f"WHERE {shape.key_column(shape.table)} = ?", (doc_id,)).fetchone()
            token = self._token(high_water(db))
        if row is None:
            raise NotFound(f"no document {doc_id!r} in {name}")
        return Snapshot(parse_document(row[0]), token)

    async def list(self, name: str, query: ListQuery) -> Page:
        shape = self._catalog.get(name)
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
        after = query.sql_after()
        if after is not None:
            value, last_key = after
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
        with transaction(db, "DEFERRED"):
            rows = db.execute(sql, params).fetchall()
            token = self._token(high_water(db))
        next_cursor = None
        if len(rows) > query.limit:
            rows = rows[:query.limit]
            last = rows[-1]
            next_cursor = query.cursor_after(sort, last[0], last[1])
        return Page(tuple(parse_document(row[2]) for row in rows), next_cursor, token)
