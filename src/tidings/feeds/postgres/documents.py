"""Documents in PostgreSQL through the API: writes, gets and lists, each with its token.

A write is one READ COMMITTED transaction on a pooled connection; the capture trigger logs
its change in that transaction (with logical decoding, the tailer does, from the WAL). Its
token is that change's position, which exists only
once a tick sees the transaction committed: right after COMMIT, on the same connection,
the write asks for it (`ChangeLog.place`, which ticks if need be). A read is one
REPEATABLE READ transaction whose snapshot is a tick (`ChangeLog.settled` / `ticked`), so
the documents it returns and its token agree exactly: "snapshot, then the changes after
its token" has no gap and no double (`capture.py`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import cast

from tidings.errors import BadRequest, NotFound, ServiceUnavailable
from tidings.feeds.backend import Backend
from tidings.feeds.base import Page, Snapshot, WriteResult
from tidings.feeds.catalog import (
    new_document,
    parse_document,
    patch_fields,
    replacement,
)
from tidings.feeds.errors import Conflict
from tidings.feeds.events import JSONObject, JSONValue, merge_patch, same_json
from tidings.feeds.postgres.capture import ChangeLog, Mark
from tidings.feeds.postgres.schema import Shape
from tidings.feeds.query import ListQuery
from tidings.pgdb import (
    UNAVAILABLE,
    Connection,
    DataError,
    Pool,
    UniqueViolation,
    describe,
    pooled,
)

__all__ = ["Documents"]


def _cursor_text(value: JSONValue) -> str:
    """A cursor's key or sort value as the text PostgreSQL casts to the column's type."""
    return value if isinstance(value, str) else json.dumps(value)


@dataclass(slots=True)
class _Read:
    """A read's position, known once its transaction has ended."""

    position: int = 0


@dataclass(slots=True)
class _Write:
    """A write's connection, in its transaction; `note` its change before COMMIT."""

    conn: Connection
    log: ChangeLog
    mark: Mark | None = None
    position: int = 0

    async def note(self, *, replace: bool = False) -> None:
        self.mark = await self.log.mark(self.conn, replace=replace)


class Documents(Backend[Shape]):
    """The collections of one PostgreSQL schema: a pool, the change log, the shapes."""

    def __init__(self, dsn: str) -> None:
        super().__init__()
        self._dsn = dsn
        self._where = describe(dsn)
        self._pool: Pool | None = None
        self._log = ChangeLog.of("")

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Connection]:
        """A pooled connection; PostgreSQL errors that escape are ServiceUnavailable."""
        if self._pool is None:
            raise ServiceUnavailable("the change feed is not running")
        try:
            async with pooled(self._pool) as conn:
                yield conn
        except UNAVAILABLE as exc:
            raise ServiceUnavailable(f"PostgreSQL at {self._where}: {exc}") from exc

    @contextlib.asynccontextmanager
    async def _transaction(self, *, write: bool) -> AsyncIterator[Connection]:
        """A READ COMMITTED transaction, for the feed's own state (not for documents)."""
        async with self._connection() as conn, conn.transaction(
                isolation="read_committed", readonly=not write):
            yield conn

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[_Write]:
        """A document write: its transaction, then (if it `note`d a change) the change's
        position. A session that noted a change and fails before `place` released the
        place key is ended rather than pooled."""
        try:
            async with self._connection() as conn:
                write = _Write(conn, self._log)
                try:
                    async with conn.transaction(isolation="read_committed"):
                        yield write
                    if write.mark is not None:
                        write.position = await self._log.place(conn, write.mark,
                                                               self._written)
                except BaseException:
                    if write.mark is not None:
                        conn.terminate()
                    raise
        finally:
            self._written()

    @contextlib.asynccontextmanager
    async def _snapshot(self) -> AsyncIterator[tuple[Connection, _Read]]:
        """A REPEATABLE READ transaction whose snapshot is a tick, and (once the context
        has ended) its position: without a lock when nothing was committed since the
        newest tick, else a tick of its own (which holds the tick lock until the read
        ends). With logical decoding that tick is pending until the tailer has decoded
        what the snapshot sees: the position is read once it has."""
        read = _Read()
        async with self._connection() as conn:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                position = await self._log.settled(conn)
                if position is not None:
                    read.position = position
                    yield conn, read
                    return
            async with conn.transaction(isolation="repeatable_read"):
                number, pending = await self._log.ticked(conn)
                yield conn, read
            read.position = (await self._log.closed(conn, number, self._written) if pending
                             else number)

    # -- writes (managed collections) ---------------------------------------------------

    async def insert(self, name: str, document: JSONObject) -> WriteResult:
        shape = self._catalog.writable(name)
        doc_id, own = new_document(shape.config, document)
        async with self._write() as write:
            try:
                text = await write.conn.fetchval(
                    f"INSERT INTO {shape.table} AS t (id, doc) VALUES ($1, $2::jsonb) "
                    f"RETURNING {shape.document()}::text", doc_id, json.dumps(own))
            except UniqueViolation:
                raise Conflict(f"a document with id {doc_id!r} exists already") from None
            except DataError as exc:
                raise BadRequest(f"the document cannot be stored: {exc}") from None
            await write.note()
        return WriteResult(parse_document(text), self._token(write.position))

    async def replace(self, name: str, doc_id: str, document: JSONObject) -> WriteResult:
        shape = self._catalog.writable(name)
        own = replacement(shape.config, doc_id, document)
        async with self._write() as write:
            try:
                text = await write.conn.fetchval(
                    f"UPDATE {shape.table} AS t SET doc = $2::jsonb, updated_at = now() "
                    f"WHERE id = $1 RETURNING {shape.document()}::text", doc_id, json.dumps(own))
            except DataError as exc:
                raise BadRequest(f"the document cannot be stored: {exc}") from None
            if text is None:
                raise NotFound(f"no document {doc_id!r} in {name}")
            await write.note(replace=True)
        return WriteResult(parse_document(text), self._token(write.position))

    async def update(self, name: str, doc_id: str, patch: JSONObject) -> WriteResult:
        shape = self._catalog.writable(name)
        patch = patch_fields(doc_id, patch)
        text: object = None
        async with self._write() as write:
            current_text = await write.conn.fetchval(
                f"SELECT doc::text FROM {shape.table} WHERE id = $1 FOR UPDATE", doc_id)
            if current_text is None:
                raise NotFound(f"no document {doc_id!r} in {name}")
            current = parse_document(current_text)
            merged = cast(JSONObject, merge_patch(current, patch))
            if not same_json(current, merged):
                shape.config.validate(merged)
                try:
                    text = await write.conn.fetchval(
                        f"UPDATE {shape.table} AS t SET doc = $2::jsonb, updated_at = now() "
                        f"WHERE id = $1 RETURNING {shape.document()}::text",
                        doc_id, json.dumps(merged))
                except DataError as exc:
                    raise BadRequest(f"the document cannot be stored: {exc}") from None
                await write.note()
        if write.mark is None:
            # A patch that changes nothing makes no change: the document as it is now,
            # with the token of that moment (a read).
            unchanged = await self.get(name, doc_id)
            return WriteResult(unchanged.document, unchanged.token)
        return WriteResult(parse_document(text), self._token(write.position))

    async def delete(self, name: str, doc_id: str) -> WriteResult:
        shape = self._catalog.writable(name)
        async with self._write() as write:
            text = await write.conn.fetchval(
                f"DELETE FROM {shape.table} AS t WHERE id = $1 "
                f"RETURNING {shape.document()}::text", doc_id)
            if text is None:
                raise NotFound(f"no document {doc_id!r} in {name}")
            await write.note()
        return WriteResult(parse_document(text), self._token(write.position))

    # -- reads ----------------------------------------------------------------------------

    async def get(self, name: str, doc_id: str) -> Snapshot:
        shape = self._catalog.get(name)
        async with self._snapshot() as (conn, read):
            try:
                text = await conn.fetchval(
                    f"SELECT {shape.document()}::text FROM {shape.table} AS t "
                    f"WHERE {shape.key_column()} = {shape.key_param('$1')}", doc_id)
            except DataError:  # not a value of the key's type: no such document
                text = None
            if text is None:
                raise NotFound(f"no document {doc_id!r} in {name}")
        return Snapshot(parse_document(text), self._token(read.position))

    async def list(self, name: str, query: ListQuery) -> Page:
        shape = self._catalog.get(name)
        key = shape.config.key
        sort = query.sort or ("created_at" if shape.managed else key)
        sort_expr, sort_value = shape.sort_columns(sort)
        key_expr = shape.key_column()
        params: list[object] = []
        where = [shape.filter_sql(flt, params) for flt in query.filters]
        direction = "DESC" if query.descending else "ASC"
        compare = "<" if query.descending else ">"
        after = query.sql_after()
        if after is not None:
            value, last_key = after
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
        async with self._snapshot() as (conn, read):
            try:
                rows = await conn.fetch(sql, *params)
            except DataError:  # a cursor value that is not of the column's type
                raise BadRequest("malformed cursor") from None
        next_cursor = None
        if len(rows) > query.limit:
            rows = rows[:query.limit]
            sort_text, key_json, _ = rows[-1]
            last_key = cast(JSONValue, json.loads(str(key_json)))
            cursor_value = last_key if sort_expr == key_expr else str(sort_text)
            next_cursor = query.cursor_after(sort, cursor_value, last_key)
        return Page(tuple(parse_document(row[2]) for row in rows), next_cursor,
                    self._token(read.position))
