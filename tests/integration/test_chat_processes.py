"""The chat's store shared: migrations applied once when stores start at the same time
(both stores), an old SQLite database adopted, and on PostgreSQL several `tidings serve`
processes on one schema: one relay, another taking over after a kill -9 with nothing lost
or doubled, and a history read on a process that does not relay."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import signal
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import asyncpg
import httpx
import pytest

from tests.conftest import HubProcess
from tests.integration.feed_backends import eventually
from tests.integration.test_chat import PASSWORD, next_of, stream, users
from tests.integration.test_chat_relay import created, running, wait_published
from tidings.chat import Conversation
from tidings.chat.migrations import SQLITE
from tidings.chat.sql import Op, rows
from tidings.chat.store import ChatStore

pytestmark = pytest.mark.anyio

GENERAL = Conversation.of_room("general")
postgres_only = pytest.mark.parametrize("chat_db", ["postgres"], indirect=True)
EVERY_VERSION = list(range(1, len(SQLITE) + 1))  # PostgreSQL's list is as long


def _versions() -> Op[list[int]]:
    found = yield rows("SELECT version FROM chat_schema_version ORDER BY version")
    return [int(str(r[0])) for r in found.rows]


def _split(chat_db: str) -> tuple[str, str]:
    """(the URL without search_path, the schema) of a PostgreSQL `chat_db`."""
    parts = urlsplit(chat_db)
    params = dict(parse_qsl(parts.query))
    schema = params.pop("search_path")
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return urlunsplit(parts._replace(query=query)), schema


async def _fetch(chat_db: str, query: str, *args: object) -> Sequence[asyncpg.Record]:
    base, schema = _split(chat_db)
    conn = await asyncpg.connect(base, server_settings={"search_path": schema})
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def relay_sessions(chat_db: str) -> tuple[int, int]:
    """(relaying, standing by): the chat relays' connections to this schema."""
    found = await _fetch(
        chat_db, "SELECT wait_event_type = 'Lock' AS waiting FROM pg_stat_activity "
        "WHERE application_name = $1", f"tidings-chat-relay:{_split(chat_db)[1]}")
    waiting = sum(1 for r in found if r["waiting"])
    return len(found) - waiting, waiting


# -- migrations ------------------------------------------------------------------------------


async def test_stores_starting_at_once_migrate_once(chat_db: str) -> None:
    stores = [ChatStore(chat_db) for _ in range(4)]
    try:
        await asyncio.gather(*(store.start() for store in stores))
        assert len({store.epoch for store in stores}) == 1
        for store in stores:
            assert await store.database.run("read", _versions()) == EVERY_VERSION
            assert await store.room_names() == {"general"}
    finally:
        for store in stores:
            await store.stop()


@postgres_only
async def test_two_servers_starting_at_once_on_a_new_schema(
        chat_db: str, chat_hubs: type[HubProcess]) -> None:
    """Two `tidings serve` started together on an empty schema: both come up, the
    migrations are applied once, and a user made on one signs in on the other."""
    servers = [chat_hubs(), chat_hubs()]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for started in [pool.submit(server.start) for server in servers]:
            started.result(timeout=60)
    versions = await _fetch(chat_db, "SELECT version FROM chat_schema_version")
    assert [r["version"] for r in versions] == EVERY_VERSION
    async with users(servers[0].url, "alice"):
        async with httpx.AsyncClient(base_url=servers[1].url, timeout=10) as other:
            reply = await other.post("/api/auth/login", json={
                "username": "alice", "password": PASSWORD})
            assert reply.status_code == 200, reply.text


async def test_an_old_sqlite_database_is_adopted(tmp_path: Path) -> None:
    """A database made before migrations were numbered: no version table, its data and an
    outbox row the old relay had not published yet."""
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    for statement in SQLITE[0].split(";"):
        db.execute(statement)
    db.executemany("INSERT INTO chat_state VALUES (?, ?)", [("epoch", "0ld0ld00"),
                                                           ("cursor", "1")])
    db.execute("INSERT INTO chat_rooms VALUES ('general', NULL, '2026-01-01T00:00:00.000Z')")
    db.execute("INSERT INTO chat_users VALUES ('alice', 'x', '2026-01-01T00:00:00.000Z')")
    db.execute("INSERT INTO chat_members VALUES ('general', 'alice')")
    db.execute("INSERT INTO chat_messages (conv, sender, content, created_at) "
               "VALUES ('room:general', 'alice', 'from before', '2026-01-01T00:00:00.000Z')")
    data = json.dumps({"type": "message.created", "message": {"content": "from before"}})
    db.execute("INSERT INTO chat_outbox (seq, topic, data) VALUES (1, '/x', '{}'), "
               "(2, '/chat/rooms/general', ?)", (data,))
    db.commit()
    db.close()
    async with running(f"sqlite:///{path}") as service:
        assert service.store.epoch == "0ld0ld00"
        assert await service.store.database.run("read", _versions()) == EVERY_VERSION
        messages, position = await service.store.history(GENERAL, None, 10)
        assert [m.content for m in messages] == ["from before"] and position == 2
        updates = await wait_published(service, 1)
        assert created(updates) == ["from before"]
        assert [u.id for u in updates] == ["chat-0ld0ld00-2"]  # row 1 was published before
        await service.signup("bob", "password-2")
        await service.post("bob", GENERAL, "after")
        assert created(await wait_published(service, 2)) == ["from before", "after"]


# -- several processes on one PostgreSQL schema ------------------------------------------------


@postgres_only
async def test_one_relay_and_a_takeover_after_kill_9(chat_db: str,
                                                     chat_hubs: type[HubProcess]) -> None:
    """Two servers: one relays, the other stands by. Messages posted on the second while
    the first relays, while it is killed and after reach a window on the second once each,
    in order; the hub's history holds each update once."""
    first = chat_hubs("--chat-rate-messages", "1000").start()
    await eventually(lambda: _relays(chat_db, (1, 0)))
    second = chat_hubs("--chat-rate-messages", "1000").start()
    await eventually(lambda: _relays(chat_db, (1, 1)))
    async with users(second.url, "alice", "bob") as (alice, bob), \
            stream(bob, "/chat/rooms/general") as bob_sees:
        posted: list[int] = []

        async def post(n: int) -> None:
            for _ in range(n):
                reply = await alice.post("/api/rooms/general/messages",
                                         json={"content": f"#{len(posted)}"})
                assert reply.status_code == 201, reply.text
                posted.append(reply.json()["id"])

        await post(10)
        poster = asyncio.create_task(post(30))
        await eventually(lambda: _true(len(posted) >= 15 or poster.done()))
        first.stop(signal.SIGKILL)  # in the middle of the posts
        await poster
        await eventually(lambda: _relays(chat_db, (1, 0)))  # the second took over
        await post(5)
        seen = [(await next_of(bob_sees, "message.created", timeout_s=15))["message"]["id"]
                for _ in posted]
        assert seen == posted
        assert await bob_sees.nothing_within(0.3)
    stored = await _fetch(chat_db, "SELECT id, count(*) AS n FROM tidings_updates "
                          "WHERE id LIKE 'chat-%' GROUP BY id")
    assert all(r["n"] == 1 for r in stored)
    assert len(stored) >= len(posted) + 2  # and the two members joining


@postgres_only
async def test_a_history_read_on_a_process_that_does_not_relay(
        chat_db: str, chat_hubs: type[HubProcess]) -> None:
    """The second server does not relay; its history's resume point is published (it
    waited for the relay's saved cursor), so subscribing from it misses and doubles
    nothing, even right after a burst of posts."""
    chat_hubs("--chat-rate-messages", "1000").start()
    await eventually(lambda: _relays(chat_db, (1, 0)))
    second = chat_hubs("--chat-rate-messages", "1000").start()
    await eventually(lambda: _relays(chat_db, (1, 1)))
    async with users(second.url, "alice", "bob") as (alice, bob):
        for round_ in range(3):
            for i in range(20):
                reply = await alice.post("/api/rooms/general/messages",
                                         json={"content": f"{round_}.{i}"})
                assert reply.status_code == 201, reply.text
            page = await bob.get("/api/rooms/general/messages", params={"limit": "5"})
            assert page.status_code == 200, page.text
            body = page.json()
            assert body["messages"][0]["content"] == f"{round_}.19"
            async with stream(bob, "/chat/rooms/general",
                              last_event_id=body["last_event_id"]) as bob_sees:
                more = await alice.post("/api/rooms/general/messages",
                                        json={"content": "after the page"})
                got = await next_of(bob_sees, "message.created")
                assert got["message"]["id"] == more.json()["id"]


async def _relays(chat_db: str, expected: tuple[int, int]) -> bool:
    return await relay_sessions(chat_db) == expected


async def _true(value: bool) -> bool:
    return value


async def test_a_task_s_progress_never_goes_back_and_its_end_is_final(chat_db: str) -> None:
    """Two runs of one export (a process taken for gone that runs again after another
    took the export over) write progress into one row: what is shown never goes back, and
    after the end nothing changes and nothing more is announced."""
    store = ChatStore(chat_db)
    await store.start()
    try:
        await store.create_task("alice.t1", "alice", "general", "json")
        await store.task_progress("alice.t1", "running", 60, "read 60")
        await store.task_progress("alice.t1", "running", 30, "read 30")  # the other run
        assert ((await store.task("alice.t1")).percent, (await store.task("alice.t1")).step) \
            == (60, "read 60")
        await store.task_progress("alice.t1", "completed", 100, "done", result=b"[]")
        await store.task_progress("alice.t1", "running", 97, "writing the file")
        await store.task_progress("alice.t1", "failed", 0, "failed", error="late")
        task = await store.task("alice.t1")
        assert (task.state, task.percent, task.error) == ("completed", 100, None)
        announced = await store.database.run("read", _task_events("alice.t1"))
        assert announced == [("task.progress", "queued", 0), ("task.progress", "running", 60),
                             ("task.completed", "completed", 100)]
    finally:
        await store.stop()


def _task_events(task_id: str) -> Op[list[tuple[str, str, int]]]:
    found = yield rows("SELECT data FROM chat_outbox WHERE topic = ? ORDER BY seq",
                       f"/tasks/{task_id}", pg="SELECT data FROM chat_outbox "
                       "WHERE topic = ? ORDER BY id")
    events = [json.loads(str(row[0])) for row in found.rows]
    return [(event["type"], event["state"], event["percent"]) for event in events]
