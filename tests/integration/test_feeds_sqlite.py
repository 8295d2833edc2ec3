"""Collections and change feeds on real SQLite files, over real HTTP (`tidings serve`).

External writers are separate connections: a `python -c "import sqlite3 ..."` subprocess
or a plain `sqlite3` connection in this test process (the server is another process).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import httpx
import pytest

from tests.conftest import KEY, PUBLISHER, HubProcess, SSEStream, open_stream, token
from tidings.feeds.sqlite import watch_table
from tidings.sse import Event

pytestmark = pytest.mark.anyio

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
AUTH = {"Authorization": f"Bearer {PUBLISHER}"}


def make_db(workdir: Path) -> Path:
    path = workdir / "tidings.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE IF NOT EXISTS orders "
                   "(id INTEGER PRIMARY KEY, item TEXT NOT NULL, qty INTEGER, note TEXT)")
        db.commit()
    return path


def start(hub_factory: type[HubProcess], tmp_path: Path, *args: str,
          config: str = CONFIG) -> HubProcess:
    make_db(tmp_path)
    config_path = tmp_path / "tidings.toml"
    config_path.write_text(config)
    return hub_factory("--config", str(config_path), *args).start()


def external_sql(db: Path, script: str) -> None:
    """Plain SQL from another process, as the `sqlite3` shell would run it."""
    subprocess.run(
        [sys.executable, "-c",
         "import sqlite3, sys; db = sqlite3.connect(sys.argv[1]); "
         "db.executescript(sys.argv[2]); db.close()", str(db), script],
        check=True, timeout=30,
    )


def feed_state(db: Path, name: str) -> int:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return int(conn.execute("SELECT value FROM tidings_feed_state WHERE name = ?",
                                (name,)).fetchone()[0])


def wait_until(predicate: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


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


# -- REST ----------------------------------------------------------------------------------


async def test_crud_round_trip(hub_factory: type[HubProcess], tmp_path: Path) -> None:
    server = start(hub_factory, tmp_path)
    base = f"{server.url}/api/collections/messages"
    async with httpx.AsyncClient(timeout=10) as client:
        created = await insert(client, server.url, {"username": "al", "content": "hi", "n": 1})
        doc = created.json()
        doc_id = doc["id"]
        assert created.headers["location"] == f"/api/collections/messages/{doc_id}"
        assert doc["username"] == "al" and doc["created_at"] == doc["updated_at"]
        first_token = created.headers["tidings-resume-token"]

        got = await client.get(f"{base}/{doc_id}")
        assert got.status_code == 200 and got.json() == doc
        assert got.headers["tidings-resume-token"] == first_token

        given = await insert(client, server.url, {"id": "chosen", "username": "b",
                                                  "content": "c"})
        assert given.json()["id"] == "chosen"
        assert seq_of(given.headers["tidings-resume-token"]) == seq_of(first_token) + 1
        again = await client.post(base, json={"id": "chosen", "username": "b", "content": "c"},
                                  headers=AUTH)
        assert again.status_code == 409

        patched = await client.patch(f"{base}/{doc_id}", json={"content": "yo", "n": None,
                                                               "tags": ["x"]}, headers=AUTH)
        assert patched.status_code == 200
        body = patched.json()
        assert (body["content"], body["tags"], "n" in body) == ("yo", ["x"], False)
        assert body["created_at"] == doc["created_at"]

        replaced = await client.put(f"{base}/{doc_id}", json={"username": "al", "content": "z",
                                                              "created_at": "ignored"},
                                    headers=AUTH)
        assert replaced.status_code == 200
        assert {k: v for k, v in replaced.json().items() if k not in (
            "created_at", "updated_at")} == {"id": doc_id, "username": "al", "content": "z"}
        assert replaced.json()["created_at"] == doc["created_at"]

        deleted = await client.delete(f"{base}/{doc_id}", headers=AUTH)
        assert deleted.status_code == 204 and deleted.headers["tidings-resume-token"]
        assert (await client.get(f"{base}/{doc_id}")).status_code == 404
        assert (await client.delete(f"{base}/{doc_id}", headers=AUTH)).status_code == 404
        assert (await client.put(f"{base}/{doc_id}", json={"username": "a", "content": "b"},
                                 headers=AUTH)).status_code == 404
        index = (await client.get(f"{server.url}/api/collections")).json()
        assert {c["name"] for c in index["collections"]} == {"messages", "secret", "orders"}


async def test_list_filters_pagination_and_sort(hub_factory: type[HubProcess],
                                                tmp_path: Path) -> None:
    server = start(hub_factory, tmp_path)
    base = f"{server.url}/api/collections/messages"
    async with httpx.AsyncClient(timeout=10) as client:
        ids = []
        for i in range(11):
            doc = {"username": "al" if i % 2 else "bo", "content": f"m{i}", "n": i % 3,
                   "meta": {"room": "r1" if i < 5 else "r2"}}
            ids.append((await insert(client, server.url, doc)).json()["id"])

        listed = await client.get(base)
        assert listed.status_code == 200
        page = listed.json()
        assert [d["id"] for d in page["documents"]] == ids  # created_at order
        assert page["next_cursor"] is None
        assert page["resume_token"] == listed.headers["tidings-resume-token"]
        assert seq_of(page["resume_token"]) == 11

        als = (await client.get(base, params={"username": "al"})).json()["documents"]
        assert [d["content"] for d in als] == [f"m{i}" for i in range(1, 11, 2)]
        twos = (await client.get(base, params={"n": "2"})).json()["documents"]
        assert [d["content"] for d in twos] == ["m2", "m5", "m8"]
        nested = (await client.get(base, params={"meta.room": "r1", "username": "bo"})).json()
        assert [d["content"] for d in nested["documents"]] == ["m0", "m2", "m4"]
        by_id = (await client.get(base, params={"id": ids[3]})).json()["documents"]
        assert [d["id"] for d in by_id] == [ids[3]]

        for sort, expected in (("-created_at", ids[::-1]), ("updated_at", ids)):
            seen: list[str] = []
            params: dict[str, str] = {"limit": "4", "sort": sort}
            while True:
                response = await client.get(base, params=params)
                assert response.status_code == 200, response.text
                body = response.json()
                assert len(body["documents"]) <= 4
                seen += [d["id"] for d in body["documents"]]
                if body["next_cursor"] is None:
                    break
                params = {"limit": "4", "cursor": body["next_cursor"]}
            assert seen == expected

        for bad in ({"limit": "0"}, {"limit": "x"}, {"cursor": "%%%"}, {"sort": "content"}):
            response = await client.get(base, params=bad)
            assert response.status_code == 400, bad


async def test_bad_input(hub_factory: type[HubProcess], tmp_path: Path) -> None:
    server = start(hub_factory, tmp_path, "--max-body", "200")
    base = f"{server.url}/api/collections/messages"
    async with httpx.AsyncClient(timeout=10) as client:
        for body in (b"{", b'{"a": NaN}', b"\xff\xfe", b"[1, 2]", b'"text"'):
            response = await client.post(base, content=body, headers=AUTH)
            assert response.status_code == 400, body
            assert response.json()["status"] == 400

        invalid = await client.post(base, json={"username": "  ", "other": 1}, headers=AUTH)
        assert invalid.status_code == 422
        assert {e["field"] for e in invalid.json()["errors"]} == {"username", "content"}
        bad_id = await client.post(base, json={"id": 5, "username": "a", "content": "b"},
                                   headers=AUTH)
        assert bad_id.status_code == 422 and bad_id.json()["errors"][0]["field"] == "id"

        doc = (await insert(client, server.url, {"username": "a", "content": "b"})).json()
        patched = await client.patch(f"{base}/{doc['id']}", json={"content": None},
                                     headers=AUTH)
        assert patched.status_code == 422  # the merged document must satisfy the schema

        too_big = await client.post(base, json={"username": "a", "content": "x" * 300},
                                    headers=AUTH)
        assert too_big.status_code == 413

        for path in ("/api/collections/nope", "/api/collections/nope/1",
                     "/api/collections/nope/changes"):
            response = await client.get(server.url + path)
            assert response.status_code == 404, path
            assert "nope" in response.json()["error"]

        for resume in ("garbage", "0123abcd.1", "zz.1", '{"_data": 1}'):
            response = await client.get(f"{base}/changes", params={"resume_after": resume})
            assert response.status_code == 400, resume
        epoch = doc_token_epoch = (await client.get(base)).headers["tidings-resume-token"]
        future = doc_token_epoch.split(".")[0] + ".999"
        response = await client.get(f"{base}/changes", headers={"Last-Event-ID": future})
        assert response.status_code == 400 and "has not had" in response.json()["error"]
        assert epoch

        table = await client.post(f"{server.url}/api/collections/orders", json={"item": "x"},
                                  headers=AUTH)
        assert table.status_code == 405


async def test_write_and_read_authorization(hub_factory: type[HubProcess],
                                            tmp_path: Path) -> None:
    server = start(hub_factory, tmp_path)
    messages = f"{server.url}/api/collections/messages"
    secret = f"{server.url}/api/collections/secret"
    async with httpx.AsyncClient(timeout=10) as client:
        doc = {"username": "a", "content": "b"}
        anonymous = await client.post(messages, json=doc)
        assert anonymous.status_code == 401 and "www-authenticate" in anonymous.headers
        other = token(publish=["/collections/other"])
        wrong = await client.post(messages, json=doc,
                                  headers={"Authorization": f"Bearer {other}"})
        assert wrong.status_code == 403
        templated = token(publish=["/collections/{name}"])
        assert (await client.post(messages, json=doc, headers={
            "Authorization": f"Bearer {templated}"})).status_code == 201
        bad_token = await client.post(messages, json=doc,
                                      headers={"Authorization": "Bearer not.a.jwt"})
        assert bad_token.status_code == 401
        assert (await client.get(messages)).status_code == 200  # public reads are open

        # secret: write = "anyone", read private (the default)
        created = await client.post(secret, json={"pin": 1234})
        assert created.status_code == 201
        secret_id = created.json()["id"]
        assert (await client.get(secret)).status_code == 401
        assert (await client.get(f"{secret}/changes")).status_code == 401
        elsewhere = token(subscribe=["/collections/messages"])
        assert (await client.get(secret, headers={
            "Authorization": f"Bearer {elsewhere}"})).status_code == 403
        reader = token(subscribe=["/collections/secret"])
        listed = await client.get(secret, params={"authorization": reader})
        assert listed.status_code == 200 and listed.json()["documents"][0]["pin"] == 1234
        one_doc = token(subscribe=[f"/collections/secret/{secret_id}"])
        assert (await client.get(f"{secret}/{secret_id}", headers={
            "Authorization": f"Bearer {one_doc}"})).status_code == 200

        # Private updates reach only subscribers whose claim matches.
        async with (
            open_stream(client, server.url, [("topic", "/collections/secret")]) as public,
            open_stream(client, server.url, [("topic", "/collections/secret")],
                        {"Authorization": f"Bearer {reader}"}) as entitled,
        ):
            await client.post(secret, json={"pin": 1})
            event = await entitled.next()
            assert payload(event)["fullDocument"]["pin"] == 1  # type: ignore[index]
            assert await public.nothing_within(0.3)


# -- change capture and events ----------------------------------------------------------------


async def test_event_shape_per_operation(hub_factory: type[HubProcess], tmp_path: Path) -> None:
    server = start(hub_factory, tmp_path)
    base = f"{server.url}/api/collections/messages"
    async with httpx.AsyncClient(timeout=10) as client:
        async with watch(client, server.url, "messages") as stream:
            assert stream.response.status_code == 200
            assert stream.response.headers["content-type"].startswith("text/event-stream")
            created = await insert(client, server.url, {"id": "m1", "username": "al",
                                                        "content": "hi", "x": 1})
            await client.patch(f"{base}/m1", json={"content": "yo", "x": None}, headers=AUTH)
            await client.put(f"{base}/m1", json={"username": "al", "content": "new"},
                             headers=AUTH)
            await client.delete(f"{base}/m1", headers=AUTH)
            events = await stream.take(4)

    ins, upd, rep, dele = (payload(e) for e in events)
    tokens = [e.id for e in events]
    assert tokens[0] == created.headers["tidings-resume-token"]
    assert [seq_of(t or "") for t in tokens] == [1, 2, 3, 4]
    for event, data in zip(events, (ins, upd, rep, dele), strict=True):
        assert data["_id"] == {"_data": event.id}
        assert data["ns"] == {"db": "tidings", "coll": "messages"}
        assert data["documentKey"] == {"id": "m1"}
        assert isinstance(data["wallTime"], str) and data["wallTime"].endswith("Z")
    assert [d["operationType"] for d in (ins, upd, rep, dele)] == [
        "insert", "update", "replace", "delete"]
    assert ins["fullDocument"]["content"] == "hi"  # type: ignore[index]
    assert "updateDescription" not in ins
    description = upd["updateDescription"]
    assert description["removedFields"] == ["x"]  # type: ignore[index]
    assert set(description["updatedFields"]) == {"content", "updated_at"}  # type: ignore[index]
    assert description["updatedFields"]["content"] == "yo"  # type: ignore[index]
    assert upd["fullDocument"]["content"] == "yo"  # type: ignore[index]
    assert rep["fullDocument"]["content"] == "new" and "updateDescription" not in rep  # type: ignore[index]
    assert "fullDocument" not in dele and "updateDescription" not in dele


async def test_external_writer_appears_on_the_stream(hub_factory: type[HubProcess],
                                                     tmp_path: Path) -> None:
    server = start(hub_factory, tmp_path)
    db = tmp_path / "tidings.db"
    async with httpx.AsyncClient(timeout=10) as client:
        async with (
            watch(client, server.url, "orders") as stream,
            open_stream(client, server.url, [("topic", "/collections/orders/1")]) as one,
        ):
            external_sql(db, "INSERT INTO orders (id, item, qty) VALUES (1, 'book', 1);"
                             "UPDATE orders SET qty = 2, note = 'gift' WHERE id = 1;"
                             "INSERT INTO orders (id, item, qty) VALUES (2, 'pen', 5);"
                             "DELETE FROM orders WHERE id = 1;")
            events = [payload(e) for e in await stream.take(4, timeout_s=5)]
            assert [e["operationType"] for e in events] == ["insert", "update", "insert",
                                                            "delete"]
            assert events[0]["fullDocument"] == {"id": 1, "item": "book", "qty": 1,
                                                 "note": None}
            assert events[0]["documentKey"] == {"id": 1}
            assert events[1]["updateDescription"] == {
                "updatedFields": {"qty": 2, "note": "gift"}, "removedFields": []}
            assert events[3]["documentKey"] == {"id": 1} and "fullDocument" not in events[3]
            per_doc = [payload(e)["operationType"] for e in await one.take(3)]
            assert per_doc == ["insert", "update", "delete"]

            # A plain connection in this process: bounded latency (the tailer checks
            # PRAGMA data_version every 50 ms).
            with contextlib.closing(sqlite3.connect(db)) as conn:
                for n in range(3):
                    conn.execute("INSERT INTO orders (item, qty) VALUES ('x', ?)", (n,))
                    conn.commit()
                    began = time.monotonic()
                    event = payload(await stream.next(timeout_s=5))
                    assert event["fullDocument"]["qty"] == n  # type: ignore[index]
                    assert time.monotonic() - began < 1.0
            # Through the API on a managed collection: the same shape, published at once.
            listed = (await client.get(f"{server.url}/api/collections/orders")).json()
            assert [d["id"] for d in listed["documents"]] == [2, 3, 4, 5]
            assert (await client.get(f"{server.url}/api/collections/orders/2")).json()[
                "item"] == "pen"


async def test_external_writes_to_a_managed_collection(hub_factory: type[HubProcess],
                                                       tmp_path: Path) -> None:
    server = start(hub_factory, tmp_path)
    db = tmp_path / "tidings.db"
    async with httpx.AsyncClient(timeout=10) as client:
        async with watch(client, server.url, "messages") as stream:
            external_sql(db, """INSERT INTO messages (id, doc)
                VALUES ('e1', '{"username": "sh", "content": "from the shell"}');
                UPDATE messages SET doc = json_set(doc, '$.content', 'edited') WHERE id = 'e1';""")
            ins, upd = (payload(e) for e in await stream.take(2, timeout_s=5))
            assert ins["operationType"] == "insert"
            assert ins["fullDocument"]["content"] == "from the shell"  # type: ignore[index]
            assert upd["updateDescription"] == {"updatedFields": {"content": "edited"},
                                                "removedFields": []}
        got = await client.get(f"{server.url}/api/collections/messages/e1")
        assert got.json()["content"] == "edited"


# -- resuming ------------------------------------------------------------------------------


async def test_resume_after_a_token_across_a_restart(hub_factory: type[HubProcess],
                                                     tmp_path: Path) -> None:
    server = start(hub_factory, tmp_path)
    db = tmp_path / "tidings.db"
    async with httpx.AsyncClient(timeout=10) as client:
        tokens = [(await insert(client, server.url, {"username": "a", "content": str(i)}))
                  .headers["tidings-resume-token"] for i in range(3)]
        wait_until(lambda: feed_state(db, "cursor") == 3)
    assert server.stop() == 0
    # Changes made while Tidings is down are captured by the triggers all the same.
    external_sql(db, """
        INSERT INTO messages (id, doc) VALUES ('d1', '{"username": "x", "content": "down 1"}');
        INSERT INTO messages (id, doc) VALUES ('d2', '{"username": "x", "content": "down 2"}');""")

    again = hub_factory("--config", str(tmp_path / "tidings.toml")).start()
    async with httpx.AsyncClient(timeout=10) as client:
        for headers, params in (({}, [("resume_after", tokens[0])]),
                                ({"Last-Event-ID": tokens[0]}, []),
                                ({}, [("resume_after", json.dumps({"_data": tokens[0]}))])):
            async with watch(client, again.url, "messages", params, headers) as stream:
                assert stream.response.status_code == 200
                events = await stream.take(4)
                assert [seq_of(e.id or "") for e in events] == [2, 3, 4, 5]
                assert [payload(e)["fullDocument"]["content"]  # type: ignore[index]
                        for e in events] == ["1", "2", "down 1", "down 2"]
                assert await stream.nothing_within(0.3)
        # From the newest token: live only, then exactly the next change.
        async with watch(client, again.url, "messages",
                         [("resume_after", events[-1].id or "")]) as stream:
            created = await insert(client, again.url, {"username": "a", "content": "live"})
            event = await stream.next()
            assert event.id == created.headers["tidings-resume-token"]
            assert await stream.nothing_within(0.3)


async def test_republish_after_a_crash_is_stored_once(hub_factory: type[HubProcess],
                                                      tmp_path: Path) -> None:
    server = start(hub_factory, tmp_path)
    db = tmp_path / "tidings.db"
    async with httpx.AsyncClient(timeout=10) as client:
        for i in range(5):
            await insert(client, server.url, {"username": "a", "content": str(i)})
        wait_until(lambda: feed_state(db, "cursor") == 5)
    server.stop(signal.SIGKILL)
    # As if the process died after publishing changes 3..5 but before saving its cursor.
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("UPDATE tidings_feed_state SET value = '2' WHERE name = 'cursor'")
        conn.commit()
        epoch = conn.execute(
            "SELECT value FROM tidings_feed_state WHERE name = 'epoch'").fetchone()[0]

    again = hub_factory("--config", str(tmp_path / "tidings.toml")).start()
    wait_until(lambda: feed_state(db, "cursor") == 5)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        stored = conn.execute("SELECT id, COUNT(*) FROM updates GROUP BY id").fetchall()
    assert sorted(stored) == [(f"{epoch}.{n}", 1) for n in range(1, 6)]
    async with httpx.AsyncClient(timeout=10) as client:
        async with watch(client, again.url, "messages",
                         [("resume_after", f"{epoch}.0")]) as stream:
            events = await stream.take(5)
            assert [seq_of(e.id or "") for e in events] == [1, 2, 3, 4, 5]
            assert await stream.nothing_within(0.3)


async def test_a_token_older_than_the_log_gets_an_error_event(hub_factory: type[HubProcess],
                                                              tmp_path: Path) -> None:
    server = start(hub_factory, tmp_path, "--changes-size", "3")
    db = tmp_path / "tidings.db"
    async with httpx.AsyncClient(timeout=10) as client:
        first = (await insert(client, server.url, {"username": "a", "content": "0"})).headers[
            "tidings-resume-token"]
        deadline = time.monotonic() + 15
        while feed_state(db, "pruned_through") < 2:  # pruning runs at most once a second
            assert time.monotonic() < deadline, "the change log was never pruned"
            await insert(client, server.url, {"username": "a", "content": "more"})
            await asyncio.sleep(0.2)
        async with watch(client, server.url, "messages",
                         [("resume_after", first)]) as stream:
            assert stream.response.status_code == 200
            event = await stream.next()
            assert event.event == "error"
            error = payload(event)
            assert error["code"] == "resume_token_too_old" and "snapshot" in str(error["error"])
            with pytest.raises(StopAsyncIteration):
                await stream.next()  # the stream ends: no silence, no live tail
        # A fresh snapshot's token still resumes.
        snapshot = (await client.get(f"{server.url}/api/collections/messages")).json()
        async with watch(client, server.url, "messages",
                         [("resume_after", snapshot["resume_token"])]) as stream:
            created = await insert(client, server.url, {"username": "a", "content": "new"})
            assert (await stream.next()).id == created.headers["tidings-resume-token"]


async def test_a_token_older_than_the_hub_history_gets_an_error_event(
        hub_factory: type[HubProcess], tmp_path: Path) -> None:
    server = start(hub_factory, tmp_path, "--history-size", "10")
    db = tmp_path / "tidings.db"
    async with httpx.AsyncClient(timeout=10) as client:
        first = (await insert(client, server.url, {"username": "a", "content": "0"})).headers[
            "tidings-resume-token"]
        # The SQLite transport prunes its history every 256 appends.
        external_sql(db, "".join(
            f"INSERT INTO orders (item, qty) VALUES ('bulk', {n});" for n in range(300)))
        wait_until(lambda: feed_state(db, "cursor") == 301)
        async with watch(client, server.url, "messages", [("resume_after", first)]) as stream:
            event = await stream.next()
            assert event.event == "error" and "history" in str(payload(event)["error"])


async def test_snapshot_then_live_with_racing_writes(hub_factory: type[HubProcess],
                                                     tmp_path: Path) -> None:
    server = start(hub_factory, tmp_path)
    db = tmp_path / "tidings.db"
    total = 160
    async with httpx.AsyncClient(timeout=10) as client:
        halfway = asyncio.Event()

        async def writer() -> None:
            with contextlib.closing(sqlite3.connect(db)) as conn:
                for n in range(total):
                    if n % 2:
                        await insert(client, server.url, {"id": f"d{n}", "username": "w",
                                                          "content": str(n)})
                    else:  # another writer on the same file, racing the API
                        conn.execute("INSERT INTO messages (id, doc) VALUES (?, ?)",
                                     (f"d{n}", json.dumps({"username": "w",
                                                           "content": str(n)})))
                        conn.commit()
                        await asyncio.sleep(0)
                    if n == total // 3:
                        halfway.set()

        task = asyncio.create_task(writer())
        await halfway.wait()
        snapshot = (await client.get(f"{server.url}/api/collections/messages",
                                     params={"limit": "1000"})).json()
        loaded = {d["id"] for d in snapshot["documents"]}
        assert 0 < len(loaded) < total
        streamed: list[str] = []
        tokens: list[int] = []
        async with watch(client, server.url, "messages",
                         [("resume_after", snapshot["resume_token"])]) as stream:
            while len(loaded) + len(streamed) < total:
                event = await stream.next(timeout_s=10)
                tokens.append(seq_of(event.id or ""))
                streamed.append(str(payload(event)["documentKey"]["id"]))  # type: ignore[index]
            await task
            assert await stream.nothing_within(0.3)
    assert not loaded & set(streamed), "a change in the snapshot was streamed again"
    assert len(streamed) == len(set(streamed))
    assert loaded | set(streamed) == {f"d{n}" for n in range(total)}
    assert tokens == sorted(tokens) and tokens[0] == seq_of(snapshot["resume_token"]) + 1


# -- retention and tables ------------------------------------------------------------------


async def test_retention_prunes_without_breaking_live_streams(
        hub_factory: type[HubProcess], tmp_path: Path) -> None:
    server = start(hub_factory, tmp_path, "--changes-size", "5")
    db = tmp_path / "tidings.db"
    async with httpx.AsyncClient(timeout=10) as client:
        async with watch(client, server.url, "messages") as stream:
            tokens = []
            for n in range(30):
                created = await insert(client, server.url, {"username": "a", "content": str(n)})
                tokens.append(created.headers["tidings-resume-token"])
                if n in (10, 20):
                    await asyncio.sleep(1.1)  # let a prune run mid-stream
            events = await stream.take(30)
            assert [e.id for e in events] == tokens
        wait_until(lambda: feed_state(db, "pruned_through") >= 10)
        with contextlib.closing(sqlite3.connect(db)) as conn:
            kept = conn.execute("SELECT MIN(seq), COUNT(*) FROM tidings_changes").fetchone()
        assert kept[0] > 1 and kept[1] < 30
        # A token still in the log resumes exactly.
        async with watch(client, server.url, "messages",
                         [("resume_after", tokens[-2])]) as stream:
            assert (await stream.next()).id == tokens[-1]


async def test_tidings_watch_command(hub_factory: type[HubProcess], tmp_path: Path) -> None:
    db = make_db(tmp_path)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE pairs (a TEXT, b TEXT, PRIMARY KEY (a, b)) WITHOUT ROWID")
        conn.commit()
    env_db = f"sqlite:///{db}"
    cli = [sys.executable, "-m", "tidings", "watch"]
    done = subprocess.run([*cli, "orders", "--db", env_db, "--read", "public"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "watching orders (key id, public)" in done.stdout
    refused = subprocess.run([*cli, "pairs", "--db", env_db], capture_output=True, text=True,
                             timeout=30)
    assert refused.returncode != 0 and "has no rowid" in refused.stderr
    missing = subprocess.run([*cli, "nope", "--db", env_db], capture_output=True, text=True,
                             timeout=30)
    assert missing.returncode != 0 and "no table 'nope'" in missing.stderr

    server = hub_factory().start()  # no --config: the watched table is in the database
    async with httpx.AsyncClient(timeout=10) as client:
        async with watch(client, server.url, "orders") as stream:
            external_sql(db, "INSERT INTO orders (item) VALUES ('from the shell')")
            event = payload(await stream.next(timeout_s=5))
            assert event["fullDocument"]["item"] == "from the shell"  # type: ignore[index]

        # Watched while the server runs: picked up at its first change.
        with contextlib.closing(sqlite3.connect(db)) as conn:
            conn.execute("CREATE TABLE later (id INTEGER PRIMARY KEY, v TEXT)")
            conn.commit()
        assert subprocess.run([*cli, "later", "--db", env_db, "--read", "public"],
                              timeout=30).returncode == 0
        async with open_stream(client, server.url, [("topic", "/collections/later")]) as later:
            external_sql(db, "INSERT INTO later (v) VALUES ('x')")
            assert payload(await later.next(timeout_s=5))["fullDocument"] == {"id": 1, "v": "x"}

    stopped = subprocess.run([*cli, "orders", "--db", env_db, "--stop"], capture_output=True,
                             text=True, timeout=30)
    assert stopped.returncode == 0
    before = feed_state(db, "cursor")
    external_sql(db, "INSERT INTO orders (item) VALUES ('unwatched')")
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT MAX(seq) FROM tidings_changes").fetchone()[0] == before


def test_wide_tables_and_blobs_are_captured(tmp_path: Path) -> None:
    db = tmp_path / "wide.db"
    columns = [f"c{n}" for n in range(150)]
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute(f"CREATE TABLE wide (id INTEGER PRIMARY KEY, {', '.join(columns)}, "
                     "data BLOB)")
        conn.commit()
    assert watch_table(f"sqlite:///{db}", "wide") == "id"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute(f"INSERT INTO wide ({', '.join(columns)}, data) "
                     f"VALUES ({', '.join('?' * 150)}, ?)", (*range(150), b"\x00\xff"))
        conn.commit()
        new_doc = conn.execute("SELECT new_doc FROM tidings_changes").fetchone()[0]
    document = json.loads(new_doc)
    assert document == {"id": 1, **{c: n for n, c in enumerate(columns)}, "data": "00FF"}


def test_configuration_errors_stop_serve_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[tables.missing]\nkey = "id"\n')
    done = subprocess.run(
        [sys.executable, "-m", "tidings", "serve", "--port", "0", "--jwt-key", KEY,
         "--db", f"sqlite:///{tmp_path / 'x.db'}", "--config", str(config)],
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
    )
    assert done.returncode != 0
    assert "no table 'missing'" in done.stderr and "Traceback" not in done.stderr


async def test_client_watch_snapshot_then_changes(hub_factory: type[HubProcess],
                                                  tmp_path: Path) -> None:
    from tidings.client import Client

    server = start(hub_factory, tmp_path)
    async with httpx.AsyncClient(timeout=10) as http:
        for n in range(3):
            await insert(http, server.url, {"id": f"a{n}", "username": "al", "content": str(n)})
        await insert(http, server.url, {"id": "b0", "username": "bo", "content": "x"})
        async with Client(server.url, token=PUBLISHER) as client:
            seen: list[tuple[str, object]] = []
            async with contextlib.aclosing(client.watch("messages", username="al")) as events:
                async for change in events:
                    seen.append((str(change["operationType"]),
                                 change["documentKey"]["id"]))
                    if len(seen) == 3:  # the snapshot is in: now change things
                        await insert(http, server.url, {"id": "b1", "username": "bo",
                                                        "content": "not al"})
                        await insert(http, server.url, {"id": "a3", "username": "al",
                                                        "content": "3"})
                    if len(seen) == 4:
                        break
    assert seen == [("snapshot", "a0"), ("snapshot", "a1"), ("snapshot", "a2"), ("insert", "a3")]




async def test_watch_filters(hub_factory: type[HubProcess], tmp_path: Path) -> None:
    server = start(hub_factory, tmp_path)
    base = f"{server.url}/api/collections/messages"
    async with httpx.AsyncClient(timeout=10) as client:
        first = await insert(client, server.url, {"id": "x0", "username": "al", "content": "0"})
        async with (
            watch(client, server.url, "messages", [("username", "al")]) as als,
            watch(client, server.url, "messages", [("operationType", "delete,replace")]) as ends,
            watch(client, server.url, "messages", [("resume_after",
                                                    first.headers["tidings-resume-token"]),
                                                   ("operationType", "update")]) as updates,
        ):
            await insert(client, server.url, {"id": "x1", "username": "bo", "content": "1"})
            await insert(client, server.url, {"id": "x2", "username": "al", "content": "2"})
            await client.patch(f"{base}/x1", json={"username": "al"}, headers=AUTH)
            await client.put(f"{base}/x2", json={"username": "cy", "content": "2"},
                             headers=AUTH)
            await client.delete(f"{base}/x1", headers=AUTH)
            got = [(payload(e)["operationType"], payload(e)["documentKey"]["id"])  # type: ignore[index]
                   for e in await als.take(2)]
            assert got == [("insert", "x2"), ("update", "x1")]
            assert await als.nothing_within(0.3)
            assert [payload(e)["operationType"] for e in await ends.take(2)] == [
                "replace", "delete"]
            assert [payload(e)["documentKey"] for e in await updates.take(1)] == [{"id": "x1"}]
            assert await updates.nothing_within(0.2)
