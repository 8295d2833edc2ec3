"""The databases the change-feed tests run against, behind one face.

`test_feeds.py` is the contract every feed backend keeps; it runs once per backend through
the `feed` fixture (`tests/integration/conftest.py`), which hands it a `FeedDB`: a
database with the `orders` table of the user's own, a way to start `tidings serve` on it,
and "another writer" (the `sqlite3` shell, psql) to change it behind Tidings' back. What
only one database has is tested in `test_feeds_sqlite.py` / `test_feeds_postgres.py`.

Watched collections (written by another program, read-only through the API) are the part
of the contract a third backend keeps too: MongoDB (`MongoFeedDB`, a database on a
`MongoServer`, written with pymongo). Each backend says how its other writer adds,
changes, replaces and removes an "order" (`add_order`...), and the `watched` fixture runs
those tests on all three.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import asyncpg
import httpx
from bson import ObjectId

from tests.conftest import PUBLISHER, HubProcess, SSEStream
from tests.integration.mongo_server import MongoServer
from tidings.sse import Event

CONFIG = r'''
[collections.messages]
schema.type = "object"
schema.required = ["username", "content"]
schema.properties.username = { type = "string", pattern = "\\S" }
schema.properties.content = { type = "string", pattern = "\\S" }
read = "public"

[collections.secret]
write = "anyone"

[tables.orders]
key = "id"
read = "public"
'''
# PostgreSQL's tests name no key: the table's single-column primary key is the default.
CONFIG_POSTGRES = CONFIG.replace('key = "id"\n', "")
AUTH = {"Authorization": f"Bearer {PUBLISHER}"}


# -- the API, as every test uses it --------------------------------------------------------


@contextlib.asynccontextmanager
async def watch(client: httpx.AsyncClient, url: str, name: str,
                params: Iterable[tuple[str, str]] = (),
                headers: dict[str, str] | None = None) -> AsyncIterator[SSEStream]:
    request = client.build_request("GET", f"{url}/api/collections/{name}/changes",
                                   params=list(params), headers=headers or {})
    response = await client.send(request, stream=True)
    try:
        yield SSEStream(response)
    finally:
        await response.aclose()


def payload(event: Event) -> dict[str, object]:
    data = json.loads(event.data)
    assert isinstance(data, dict)
    return data


def seq_of(tok: str) -> int:
    return int(tok.rsplit(".", 1)[1])


async def insert(client: httpx.AsyncClient, url: str, doc: dict[str, object],
                 name: str = "messages") -> httpx.Response:
    response = await client.post(f"{url}/api/collections/{name}", json=doc, headers=AUTH)
    assert response.status_code == 201, response.text
    return response


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


# -- the databases -------------------------------------------------------------------------


class Writer(Protocol):
    """A connection of another writer, kept open in this test process."""

    async def execute(self, script: str) -> None:
        """Run SQL statements (literal values only), each committed."""
        ...

    async def insert_document(self, table: str, doc_id: str, doc: dict[str, object]) -> None:
        """Insert a row `(id, doc)` into a managed collection's table, committed."""
        ...


class FeedDB:
    """One test's database, and `tidings serve` on it."""

    name = ""
    key = "id"  # the documentKey field of a watched collection's changes
    db_name = ""  # what change events say in `ns.db`
    updates = ""  # the hub's history table
    config = CONFIG

    def __init__(self, hub_factory: type[HubProcess], tmp_path: Path) -> None:
        self._hub_factory = hub_factory
        self._tmp_path = tmp_path
        self.workdir = tmp_path
        self.url = ""
        self.fresh_url = ""  # a database the feed has never set up

    def sql(self, **by_backend: str) -> str:
        """The statement of this backend's dialect, where the dialects differ."""
        return by_backend[self.name]

    def _config_args(self, config: str | None) -> tuple[str, ...]:
        if config is None:
            return ()
        path = self._tmp_path / "tidings.toml"
        path.write_text(config)
        return ("--config", str(path))

    def start(self, *args: str, config: str | None = "") -> HubProcess:
        """`tidings serve --config FILE` on this database (`config`: this backend's
        default when empty; None: no --config)."""
        raise NotImplementedError

    async def execute(self, script: str) -> None:
        """SQL from another writer, as its shell would run it."""
        raise NotImplementedError

    async def query(self, sql: str) -> list[tuple[object, ...]]:
        raise NotImplementedError

    def connect(self) -> contextlib.AbstractAsyncContextManager[Writer]:
        raise NotImplementedError

    async def watch_command(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`tidings watch ARGS --db` this database, in another process."""
        return await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "tidings", "watch", *args, "--db", self.url],
            capture_output=True, text=True, timeout=30)

    async def collection_command(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`tidings collection ARGS --db` this database, in another process."""
        return await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "tidings", "collection", *args, "--db", self.url],
            capture_output=True, text=True, timeout=30, cwd=self.workdir)

    async def has_table(self, name: str) -> bool:
        rows = await self.query(self.sql(
            sqlite=f"SELECT count(*) FROM sqlite_master WHERE name = '{name}'",
            postgres=f"SELECT count(*) FROM pg_tables WHERE tablename = '{name}' "
                     f"AND schemaname = current_schema()"))
        return int(str(rows[0][0])) > 0

    async def state(self, name: str) -> int:
        """The feed's saved state: `cursor`, `pruned_through`."""
        rows = await self.query(
            f"SELECT value FROM tidings_feed_state WHERE name = '{name}'")
        return int(str(rows[0][0]))

    async def state_at_least(self, name: str, value: int) -> bool:
        return await self.state(name) >= value

    # -- another writer's orders (the watched collection) --------------------------------

    async def add_order(self, item: str, qty: int) -> object:
        """Insert an order; its key."""
        await self.execute(f"INSERT INTO orders (item, qty) VALUES ('{item}', {qty})")
        return (await self.query("SELECT max(id) FROM orders"))[0][0]

    async def add_orders(self, count: int) -> None:
        await self.execute("".join(
            f"INSERT INTO orders (item, qty) VALUES ('bulk', {n});" for n in range(count)))

    async def set_qty(self, key: object, qty: int) -> None:
        await self.execute(f"UPDATE orders SET qty = {qty} WHERE id = {key}")

    async def replace_order(self, key: object, item: str) -> None:
        """The whole order anew (SQL has no replace: an update of every column)."""
        await self.execute(f"UPDATE orders SET item = '{item}', qty = NULL, note = NULL "
                           f"WHERE id = {key}")

    async def remove_order(self, key: object) -> None:
        await self.execute(f"DELETE FROM orders WHERE id = {key}")

    async def add_watched_orders(self, url: str, count: int, item: str) -> list[str]:
        """Add `count` orders (qty 0..count-1) while watching them on the server at `url`;
        their tokens, once published."""
        async with httpx.AsyncClient(timeout=10) as client:
            async with watch(client, url, "orders") as stream:
                for n in range(count):
                    await self.add_order(item, n)
                return [e.id or "" for e in await stream.take(count)]

    async def published_all(self) -> None:
        """Wait until the tailer's saved cursor reaches the newest change in the log."""
        async def caught_up() -> bool:
            newest = (await self.query(
                "SELECT coalesce(max(seq), 0) FROM tidings_changes"))[0][0]
            return await self.state("cursor") >= int(str(newest))

        await eventually(caught_up)


class SQLiteDB(FeedDB):
    """A SQLite file; the other writers are `python -c "import sqlite3 ..."` processes or
    a plain `sqlite3` connection in this process (the server is another process)."""

    name = "sqlite"
    db_name = "tidings"  # the file's stem
    updates = "updates"

    def __init__(self, hub_factory: type[HubProcess], tmp_path: Path) -> None:
        super().__init__(hub_factory, tmp_path)
        self.path = make_db(tmp_path)
        self.url = f"sqlite:///{self.path}"
        self.fresh_url = f"sqlite:///{tmp_path / 'x.db'}"

    def start(self, *args: str, config: str | None = "") -> HubProcess:
        make_db(self._tmp_path)
        extra = self._config_args(self.config if config == "" else config)
        return self._hub_factory(*extra, *args).start()

    async def execute(self, script: str) -> None:
        await asyncio.to_thread(external_sql, self.path, script)

    async def query(self, sql: str) -> list[tuple[object, ...]]:
        with contextlib.closing(sqlite3.connect(self.path)) as conn:
            return [tuple(row) for row in conn.execute(sql).fetchall()]

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[Writer]:
        with contextlib.closing(sqlite3.connect(self.path, isolation_level=None)) as conn:
            yield _SQLiteWriter(conn)


class _SQLiteWriter:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    async def execute(self, script: str) -> None:
        self._conn.executescript(script)

    async def insert_document(self, table: str, doc_id: str, doc: dict[str, object]) -> None:
        self._conn.execute(f"INSERT INTO {table} (id, doc) VALUES (?, ?)",
                           (doc_id, json.dumps(doc)))


def make_db(workdir: Path) -> Path:
    path = workdir / "tidings.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE IF NOT EXISTS orders "
                   "(id INTEGER PRIMARY KEY, item TEXT NOT NULL, qty INTEGER, note TEXT)")
        db.commit()
    return path


def external_sql(db: Path, script: str) -> None:
    """Plain SQL from another process, as the `sqlite3` shell would run it."""
    subprocess.run(
        [sys.executable, "-c",
         "import sqlite3, sys; db = sqlite3.connect(sys.argv[1]); "
         "db.executescript(sys.argv[2]); db.close()", str(db), script],
        check=True, timeout=30,
    )


class PostgresDB(FeedDB):
    """One test's schema on the test server (`?search_path=SCHEMA`: the change log, the
    hub's history and the tables all live there). The other writers are plain asyncpg
    connections in this process (the server is another process)."""

    name = "postgres"
    updates = "tidings_updates"
    config = CONFIG_POSTGRES

    def __init__(self, hub_factory: type[HubProcess], tmp_path: Path, schema: str,
                 base_url: str, *, capture: str = "trigger", slot_read: str = "auto") -> None:
        super().__init__(hub_factory, tmp_path)
        self.schema = schema
        self.capture = capture  # --pg-capture
        self.slot_read = slot_read  # --pg-slot-read
        self.db_name = urlsplit(base_url).path.lstrip("/")
        joiner = "&" if "?" in base_url else "?"
        # What `--db` gets: everything Tidings creates goes into the schema.
        self.url = f"{base_url}{joiner}search_path={schema}"
        self.fresh_url = self.url

    def start(self, *args: str, config: str | None = "") -> HubProcess:
        extra = self._config_args(self.config if config == "" else config)
        return self._hub_factory(*extra, "--pg-capture", self.capture,
                                 "--pg-slot-read", self.slot_read, *args,
                                 db=self.url).start()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        conn = await asyncpg.connect(self.url)
        try:
            yield conn
        finally:
            await conn.close()

    async def execute(self, script: str, *args: object) -> None:
        async with self.connection() as conn:
            await conn.execute(script, *args)

    async def fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        async with self.connection() as conn:
            return list(await conn.fetch(sql, *args))

    async def fetchval(self, sql: str, *args: object) -> object:
        async with self.connection() as conn:
            return await conn.fetchval(sql, *args)

    async def query(self, sql: str) -> list[tuple[object, ...]]:
        return [tuple(row) for row in await self.fetch(sql)]

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[Writer]:
        async with self.connection() as conn:
            yield _PostgresWriter(conn)

    async def published_all(self) -> None:
        """Wait until the tailer's saved cursor reaches the newest change. Positions are
        dense (docs/feeds.md, "Order"): the newest is the number of changes ever
        committed, those pruned plus those in the log (the log's `seq` has gaps)."""
        async def caught_up() -> bool:
            newest = await self.fetchval(
                "SELECT (SELECT value::bigint FROM tidings_feed_state "
                "WHERE name = 'pruned_through') + (SELECT count(*) FROM tidings_changes)")
            return await self.state("cursor") >= int(str(newest))

        await eventually(caught_up)

    async def tailer_sessions(self) -> tuple[int, int]:
        """(tailing, standing by): the feed's tailer connections for this schema."""
        rows = await self.fetch(
            "SELECT wait_event_type = 'Lock' AS waiting FROM pg_stat_activity "
            "WHERE application_name = $1", f"tidings-feed-tailer:{self.schema}")
        waiting = sum(1 for r in rows if r["waiting"])
        return len(rows) - waiting, waiting


class _PostgresWriter:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def execute(self, script: str) -> None:
        await self.conn.execute(script)

    async def insert_document(self, table: str, doc_id: str, doc: dict[str, object]) -> None:
        await self.conn.execute(f"INSERT INTO {table} (id, doc) VALUES ($1, $2::jsonb)",
                                doc_id, json.dumps(doc))


MONGO_CONFIG = """
[mongodb.collections.orders]
read = "public"

[mongodb.collections.secret]
"""


class MongoFeedDB(FeedDB):
    """A database on a MongoDB server (`MongoServer`), its collections `orders` and
    `secret` watched (`--mongo URL` with `[mongodb]` read rules); the hub's own database
    (history, saved tokens) is the default SQLite file. The other writer is pymongo in
    this process (the server is another process)."""

    name = "mongodb"
    key = "_id"
    updates = "updates"
    config = MONGO_CONFIG

    def __init__(self, hub_factory: type[HubProcess], tmp_path: Path,
                 server: MongoServer) -> None:
        super().__init__(hub_factory, tmp_path)
        self.server = server
        self.db_name = server.db_name
        self.url = server.url
        self.db = server.db

    def start(self, *args: str, config: str | None = "", db: str | None = None) -> HubProcess:
        extra = self._config_args(self.config if config == "" else config)
        return self._hub_factory(*extra, "--mongo", self.url, "--mongo-watch", "orders",
                                 *args, db=db).start()

    async def query(self, sql: str) -> list[tuple[object, ...]]:
        """SQL on the hub's database (its history, the saved tokens)."""
        with contextlib.closing(sqlite3.connect(self.workdir / "tidings.db")) as conn:
            return [tuple(row) for row in conn.execute(sql).fetchall()]

    async def add_order(self, item: str, qty: int) -> object:
        done = await asyncio.to_thread(self.db.orders.insert_one, {"item": item, "qty": qty})
        return str(done.inserted_id)

    async def add_orders(self, count: int) -> None:
        await asyncio.to_thread(self.db.orders.insert_many,
                                [{"item": "bulk", "qty": n} for n in range(count)])

    async def set_qty(self, key: object, qty: int) -> None:
        await asyncio.to_thread(self.db.orders.update_one, {"_id": ObjectId(str(key))},
                                {"$set": {"qty": qty}})

    async def replace_order(self, key: object, item: str) -> None:
        await asyncio.to_thread(self.db.orders.replace_one, {"_id": ObjectId(str(key))},
                                {"item": item})

    async def remove_order(self, key: object) -> None:
        await asyncio.to_thread(self.db.orders.delete_one, {"_id": ObjectId(str(key))})
