"""The change-feed contract, over real HTTP (`tidings serve`), once per database backend.

Every backend (`feed`: SQLite, PostgreSQL; see `feed_backends.py`) keeps the same
contract: the REST API on collections, change events of one shape for the API's writes
and for any other writer's, resume tokens that survive restarts and crashes (each change
published exactly once), snapshots that join the live stream with no gap and no double,
retention, and the client's watch. What only one database has (SQLite's wide tables,
PostgreSQL's rollbacks, order lock and one tailer among servers) is in
`test_feeds_sqlite.py` and `test_feeds_postgres.py`. Waits are bounded by deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import KEY, PUBLISHER, open_stream, token
from tests.integration.feed_backends import (
    AUTH,
    FeedDB,
    eventually,
    insert,
    payload,
    seq_of,
    watch,
)

pytestmark = pytest.mark.anyio


# -- REST ----------------------------------------------------------------------------------


async def test_crud_round_trip(feed: FeedDB) -> None:
    server = feed.start()
    base = f"{server.url}/api/collections/messages"
    async with httpx.AsyncClient(timeout=10) as client:
        created = await insert(client, server.url, {"username": "al", "content": "hi", "n": 1})
        doc = created.json()
        doc_id = doc["id"]
        assert created.headers["location"] == f"/api/collections/messages/{doc_id}"
        assert doc["username"] == "al" and doc["created_at"] == doc["updated_at"]
        assert doc["created_at"].endswith("Z")
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
        # A patch that changes nothing makes no change: the token stays where it was.
        same = await client.patch(f"{base}/{doc_id}", json={"content": "yo"}, headers=AUTH)
        assert same.json() == body
        assert same.headers["tidings-resume-token"] == patched.headers["tidings-resume-token"]

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
        assert (await client.patch(f"{base}/{doc_id}", json={"content": "b"},
                                   headers=AUTH)).status_code == 404
        index = (await client.get(f"{server.url}/api/collections")).json()
        assert {c["name"] for c in index["collections"]} == {"messages", "secret", "orders"}
        orders = next(c for c in index["collections"] if c["name"] == "orders")
        assert (orders["kind"], orders["key"], orders["write"]) == ("table", "id", "none")


async def test_list_filters_pagination_and_sort(feed: FeedDB) -> None:
    server = feed.start()
    base = f"{server.url}/api/collections/messages"
    async with httpx.AsyncClient(timeout=10) as client:
        ids = []
        for i in range(11):
            doc = {"username": "al" if i % 2 else "bo", "content": f"m{i}", "n": i % 3,
                   "meta": {"room": "r1" if i < 5 else "r2"}, "flag": i == 4}
            ids.append((await insert(client, server.url, doc)).json()["id"])

        listed = await client.get(base)
        assert listed.status_code == 200
        page = listed.json()
        assert [d["id"] for d in page["documents"]] == ids  # created_at order
        assert page["next_cursor"] is None
        assert page["resume_token"] == listed.headers["tidings-resume-token"]
        assert seq_of(page["resume_token"]) == 11

        async def contents(params: dict[str, str]) -> list[str]:
            response = await client.get(base, params=params)
            assert response.status_code == 200, response.text
            return [d["content"] for d in response.json()["documents"]]

        assert await contents({"username": "al"}) == [f"m{i}" for i in range(1, 11, 2)]
        assert await contents({"n": "2"}) == ["m2", "m5", "m8"]
        assert await contents({"n": "2.0"}) == ["m2", "m5", "m8"]  # JSON equality
        assert await contents({"flag": "true"}) == ["m4"]
        assert await contents({"meta.room": "r1", "username": "bo"}) == ["m0", "m2", "m4"]
        assert await contents({"missing": "null"}) == [f"m{i}" for i in range(11)]
        assert await contents({"id": ids[3]}) == ["m3"]
        by_id = (await client.get(base, params={"id": ids[3]})).json()["documents"]
        assert [d["id"] for d in by_id] == [ids[3]]

        for sort, expected in (("-created_at", ids[::-1]), ("updated_at", ids),
                               ("id", sorted(ids)), ("-id", sorted(ids, reverse=True))):
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
            assert seen == expected, sort

        for bad in ({"limit": "0"}, {"limit": "x"}, {"cursor": "%%%"}, {"sort": "content"}):
            response = await client.get(base, params=bad)
            assert response.status_code == 400, bad

        # A watched table: its key orders and pages; filters are on columns.
        await feed.execute("".join(
            f"INSERT INTO orders (item, qty) VALUES ('i{n}', {n % 2});" for n in range(7)))
        orders = f"{server.url}/api/collections/orders"
        await feed.published_all()
        seen_keys: list[int] = []
        params = {"limit": "3"}
        while True:
            body = (await client.get(orders, params=params)).json()
            seen_keys += [d["id"] for d in body["documents"]]
            if body["next_cursor"] is None:
                break
            params = {"limit": "3", "cursor": body["next_cursor"]}
        assert seen_keys == list(range(1, 8))
        odd = (await client.get(orders, params={"qty": "1", "sort": "-id"})).json()
        assert [d["id"] for d in odd["documents"]] == [6, 4, 2]
        assert (await client.get(orders, params={"nope": "1"})).status_code == 400
        assert (await client.get(orders, params={"sort": "item"})).status_code == 400


async def test_bad_input(feed: FeedDB) -> None:
    server = feed.start("--max-body", "200")
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
        # An integer key: a document id that is not one is no document.
        response = await client.get(f"{server.url}/api/collections/orders/not-a-number")
        assert response.status_code == 404

        for resume in ("garbage", "0123abcd.1", "zz.1", '{"_data": 1}'):
            response = await client.get(f"{base}/changes", params={"resume_after": resume})
            assert response.status_code == 400, resume
        current = (await client.get(base)).headers["tidings-resume-token"]
        future = current.split(".")[0] + ".999"
        response = await client.get(f"{base}/changes", headers={"Last-Event-ID": future})
        assert response.status_code == 400 and "has not had" in response.json()["error"]

        table = await client.post(f"{server.url}/api/collections/orders", json={"item": "x"},
                                  headers=AUTH)
        assert table.status_code == 405


async def test_write_and_read_authorization(feed: FeedDB) -> None:
    server = feed.start()
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
            if payload(event)["fullDocument"]["pin"] == 1234:  # type: ignore[index]
                # The first write's change, which a tailer (PostgreSQL) may publish only
                # after these streams opened: the 201 answers the commit, not the update.
                event = await entitled.next()
            assert payload(event)["fullDocument"]["pin"] == 1  # type: ignore[index]
            assert await public.nothing_within(0.3)


# -- change capture and events ----------------------------------------------------------------


async def test_event_shape_per_operation(feed: FeedDB) -> None:
    server = feed.start()
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
        assert data["ns"] == {"db": feed.db_name, "coll": "messages"}
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


async def test_external_writer_appears_on_the_stream(feed: FeedDB) -> None:
    server = feed.start()
    async with httpx.AsyncClient(timeout=10) as client:
        async with (
            watch(client, server.url, "orders") as stream,
            open_stream(client, server.url, [("topic", "/collections/orders/1")]) as one,
            feed.connect() as writer,
        ):
            await feed.execute("INSERT INTO orders (id, item, qty) VALUES (1, 'book', 1);"
                               "UPDATE orders SET qty = 2, note = 'gift' WHERE id = 1;"
                               "INSERT INTO orders (id, item, qty) VALUES (2, 'pen', 5);"
                               "DELETE FROM orders WHERE id = 1;")
            events = [payload(e) for e in await stream.take(4, timeout_s=5)]
            assert [e["operationType"] for e in events] == ["insert", "update", "insert",
                                                            "delete"]
            assert events[0]["fullDocument"] == {"id": 1, "item": "book", "qty": 1,
                                                 "note": None}
            assert events[0]["documentKey"] == {"id": 1}
            assert events[0]["ns"] == {"db": feed.db_name, "coll": "orders"}
            assert events[1]["updateDescription"] == {
                "updatedFields": {"qty": 2, "note": "gift"}, "removedFields": []}
            assert events[3]["documentKey"] == {"id": 1} and "fullDocument" not in events[3]
            per_doc = [payload(e)["operationType"] for e in await one.take(3)]
            assert per_doc == ["insert", "update", "delete"]

            # One commit at a time: bounded latency (a NOTIFY wakes PostgreSQL's tailer;
            # SQLite's checks PRAGMA data_version every 50 ms).
            for n in range(3):
                await writer.execute(
                    f"INSERT INTO orders (id, item, qty) VALUES ({3 + n}, 'x', {n})")
                began = time.monotonic()
                event = payload(await stream.next(timeout_s=5))
                assert event["fullDocument"]["qty"] == n  # type: ignore[index]
                assert time.monotonic() - began < 1.0
            # A key changed by an UPDATE also goes to the old key's topic.
            async with open_stream(client, server.url,
                                   [("topic", "/collections/orders/5")]) as old_key:
                await writer.execute("UPDATE orders SET id = 50 WHERE id = 5")
                moved = payload(await old_key.next(timeout_s=5))
                assert moved["documentKey"] == {"id": 50}
            assert payload(await stream.next())["documentKey"] == {"id": 50}

        listed = (await client.get(f"{server.url}/api/collections/orders")).json()
        assert [d["id"] for d in listed["documents"]] == [2, 3, 4, 50]
        assert (await client.get(f"{server.url}/api/collections/orders/2")).json()[
            "item"] == "pen"


async def test_external_writes_to_a_managed_collection(feed: FeedDB) -> None:
    server = feed.start()
    async with httpx.AsyncClient(timeout=10) as client:
        async with watch(client, server.url, "messages") as stream:
            await feed.execute(
                """INSERT INTO messages (id, doc)
                   VALUES ('e1', '{"username": "sh", "content": "from the shell"}');"""
                + feed.sql(
                    sqlite="""UPDATE messages SET doc = json_set(doc, '$.content', 'edited')
                              WHERE id = 'e1';""",
                    postgres="""UPDATE messages SET doc = jsonb_set(doc, '{content}',
                                '"edited"'), updated_at = now() WHERE id = 'e1';"""))
            ins, upd = (payload(e) for e in await stream.take(2, timeout_s=5))
            assert ins["operationType"] == "insert"
            assert ins["fullDocument"]["content"] == "from the shell"  # type: ignore[index]
            assert upd["updateDescription"] == {"updatedFields": {"content": "edited"},
                                                "removedFields": []}
        got = await client.get(f"{server.url}/api/collections/messages/e1")
        assert got.json()["content"] == "edited"
        assert got.json()["created_at"] == ins["fullDocument"]["created_at"]  # type: ignore[index]


# -- resuming ------------------------------------------------------------------------------


async def test_resume_after_a_token_across_a_restart(feed: FeedDB) -> None:
    server = feed.start()
    async with httpx.AsyncClient(timeout=10) as client:
        tokens = [(await insert(client, server.url, {"username": "a", "content": str(i)}))
                  .headers["tidings-resume-token"] for i in range(3)]
        await feed.published_all()
    assert server.stop() == 0
    # Changes made while Tidings is down are captured by the triggers all the same.
    await feed.execute("""
        INSERT INTO messages (id, doc) VALUES ('d1', '{"username": "x", "content": "down 1"}');
        INSERT INTO messages (id, doc) VALUES ('d2', '{"username": "x", "content": "down 2"}');""")

    again = feed.start()
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


async def test_republish_after_a_crash_is_stored_once(feed: FeedDB) -> None:
    server = feed.start()
    async with httpx.AsyncClient(timeout=10) as client:
        for i in range(5):
            await insert(client, server.url, {"username": "a", "content": str(i)})
    await eventually(lambda: feed.state_at_least("cursor", 5))
    server.stop(signal.SIGKILL)
    # As if the process died after publishing changes 3..5 but before saving its cursor.
    await feed.execute("UPDATE tidings_feed_state SET value = '2' WHERE name = 'cursor'")
    epoch = str((await feed.query(
        "SELECT value FROM tidings_feed_state WHERE name = 'epoch'"))[0][0])

    again = feed.start()
    await eventually(lambda: feed.state_at_least("cursor", 5))
    stored = await feed.query(f"SELECT id, count(*) FROM {feed.updates} GROUP BY id")
    assert sorted(stored) == [(f"{epoch}.{n}", 1) for n in range(1, 6)]
    async with httpx.AsyncClient(timeout=10) as client:
        async with watch(client, again.url, "messages",
                         [("resume_after", f"{epoch}.0")]) as stream:
            events = await stream.take(5)
            assert [seq_of(e.id or "") for e in events] == [1, 2, 3, 4, 5]
            assert await stream.nothing_within(0.3)


async def test_a_token_older_than_the_log_gets_an_error_event(feed: FeedDB) -> None:
    server = feed.start("--changes-size", "3")
    async with httpx.AsyncClient(timeout=10) as client:
        first = (await insert(client, server.url, {"username": "a", "content": "0"})).headers[
            "tidings-resume-token"]
        deadline = time.monotonic() + 15
        while await feed.state("pruned_through") < 2:  # pruning runs at most once a second
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


async def test_a_token_older_than_the_hub_history_gets_an_error_event(feed: FeedDB) -> None:
    server = feed.start("--history-size", "10")
    async with httpx.AsyncClient(timeout=10) as client:
        first = (await insert(client, server.url, {"username": "a", "content": "0"})).headers[
            "tidings-resume-token"]
        # The transports prune their history every 256 appends.
        await feed.execute("".join(
            f"INSERT INTO orders (item, qty) VALUES ('bulk', {n});" for n in range(300)))
        await eventually(lambda: feed.state_at_least("cursor", 301))
        async with watch(client, server.url, "messages", [("resume_after", first)]) as stream:
            event = await stream.next()
            assert event.event == "error" and "history" in str(payload(event)["error"])


async def test_snapshot_then_live_with_racing_writes(feed: FeedDB) -> None:
    server = feed.start()
    total = 160
    async with httpx.AsyncClient(timeout=10) as client:
        halfway = asyncio.Event()

        async def writer() -> None:
            async with feed.connect() as conn:
                for n in range(total):
                    if n % 2:
                        await insert(client, server.url, {"id": f"d{n}", "username": "w",
                                                          "content": str(n)})
                    else:  # another writer on the same database, racing the API
                        await conn.insert_document("messages", f"d{n}",
                                                   {"username": "w", "content": str(n)})
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


# -- retention, configuration --------------------------------------------------------------


async def test_retention_prunes_without_breaking_live_streams(feed: FeedDB) -> None:
    server = feed.start("--changes-size", "5")
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
        await eventually(lambda: feed.state_at_least("pruned_through", 10))
        low, count = (await feed.query("SELECT min(seq), count(*) FROM tidings_changes"))[0]
        assert int(str(low)) > 1 and int(str(count)) < 30
        # A token still in the log resumes exactly.
        async with watch(client, server.url, "messages",
                         [("resume_after", tokens[-2])]) as stream:
            assert (await stream.next()).id == tokens[-1]


async def test_tidings_watch_command(feed: FeedDB) -> None:
    done = await feed.watch_command("orders", "--read", "public")
    assert done.returncode == 0, done.stderr
    assert "watching orders (key id, public)" in done.stdout
    missing = await feed.watch_command("nope")
    assert missing.returncode != 0 and "no table 'nope'" in missing.stderr

    server = feed.start(config=None)  # no --config: the watched table is in the database
    async with httpx.AsyncClient(timeout=10) as client:
        async with watch(client, server.url, "orders") as stream:
            await feed.execute("INSERT INTO orders (item) VALUES ('from the shell')")
            event = payload(await stream.next(timeout_s=5))
            assert event["fullDocument"]["item"] == "from the shell"  # type: ignore[index]

        # Watched while the server runs: picked up at its first change.
        await feed.execute(feed.sql(sqlite="CREATE TABLE later (id INTEGER PRIMARY KEY, v TEXT)",
                                    postgres="CREATE TABLE later (id bigint PRIMARY KEY, v text)"))
        assert (await feed.watch_command("later", "--read", "public")).returncode == 0
        async with open_stream(client, server.url, [("topic", "/collections/later")]) as later:
            await feed.execute("INSERT INTO later (id, v) VALUES (1, 'x')")
            assert payload(await later.next(timeout_s=5))["fullDocument"] == {"id": 1, "v": "x"}

    stopped = await feed.watch_command("orders", "--stop")
    assert stopped.returncode == 0, stopped.stderr
    assert (await feed.watch_command("orders", "--stop")).returncode != 0  # not watched now
    before = (await feed.query("SELECT max(seq) FROM tidings_changes"))[0][0]
    await feed.execute("INSERT INTO orders (item) VALUES ('unwatched')")
    assert (await feed.query("SELECT max(seq) FROM tidings_changes"))[0][0] == before


async def test_configuration_errors_stop_serve(feed: FeedDB) -> None:
    config = feed.workdir / "bad.toml"
    config.write_text('[tables.missing]\nkey = "id"\n')
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tidings", "serve", "--port", "0", "--jwt-key", KEY,
         "--db", feed.fresh_url, "--config", str(config)],
        capture_output=True, text=True, timeout=30, cwd=feed.workdir)
    assert done.returncode != 0
    assert "no table 'missing'" in done.stderr
    if feed.name == "sqlite":
        # Checked when the feed is built, before the server starts: one line. PostgreSQL
        # can check only once connected, in the lifespan, which uvicorn reports with a
        # traceback.
        assert "Traceback" not in done.stderr


# -- the client ----------------------------------------------------------------------------


async def test_client_watch_snapshot_then_changes(feed: FeedDB) -> None:
    from tidings.client import Client

    server = feed.start()
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


async def test_watch_filters(feed: FeedDB) -> None:
    server = feed.start()
    base = f"{server.url}/api/collections/messages"
    async with httpx.AsyncClient(timeout=10) as client:
        first = await insert(client, server.url, {"id": "x0", "username": "al", "content": "0"})
        # Published before the watches open (else a watch without a token sees it live).
        await feed.published_all()
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


# -- a collection another program writes: every backend, MongoDB too ----------------------
# (`watched`: SQLite and PostgreSQL tables, a MongoDB collection written with pymongo.)


async def test_another_writers_changes_are_published(watched: FeedDB) -> None:
    server = watched.start()
    key_field = watched.key
    async with httpx.AsyncClient(timeout=10) as client:
        async with watch(client, server.url, "orders") as stream:
            key = await watched.add_order("book", 1)
            events = [await stream.next()]  # published: the document's topic sees the rest
            async with open_stream(client, server.url,
                                   [("topic", f"/collections/orders/{key}")]) as one:
                await watched.set_qty(key, 2)
                await watched.remove_order(key)
                per_doc = [payload(e)["operationType"] for e in await one.take(2)]
            events += await stream.take(2)
    data = [payload(e) for e in events]
    assert [d["operationType"] for d in data] == ["insert", "update", "delete"]
    assert per_doc == ["update", "delete"]
    for event, change in zip(events, data, strict=True):
        assert change["_id"] == {"_data": event.id}
        assert change["documentKey"] == {key_field: key}
        assert change["ns"] == {"db": watched.db_name, "coll": "orders"}
        assert isinstance(change["wallTime"], str) and change["wallTime"].endswith("Z")
    assert data[0]["fullDocument"][key_field] == key  # type: ignore[index]
    assert data[0]["fullDocument"]["item"] == "book"  # type: ignore[index]
    assert data[1]["fullDocument"]["qty"] == 2  # type: ignore[index]
    assert "fullDocument" not in data[2]


async def test_a_watched_collection_resumes_across_a_restart(watched: FeedDB) -> None:
    server = watched.start()
    tokens = await watched.add_watched_orders(server.url, 3, "before")
    assert server.stop() == 0
    # Changes made while Tidings is down are not lost.
    await watched.add_order("down", 3)
    await watched.add_order("down", 4)

    again = watched.start()
    async with httpx.AsyncClient(timeout=10) as client:
        for headers, params in (({}, [("resume_after", tokens[0])]),
                                ({"Last-Event-ID": tokens[0]}, []),
                                ({}, [("resume_after", json.dumps({"_data": tokens[0]}))])):
            async with watch(client, again.url, "orders", params, headers) as stream:
                assert stream.response.status_code == 200
                events = await stream.take(4)
                assert [e.id for e in events[:2]] == tokens[1:]
                assert [payload(e)["fullDocument"]["qty"]  # type: ignore[index]
                        for e in events] == [1, 2, 3, 4]
                assert await stream.nothing_within(0.3)
        async with watch(client, again.url, "orders",
                         [("resume_after", events[-1].id or "")]) as stream:
            await watched.add_order("live", 5)
            assert payload(await stream.next())["fullDocument"]["qty"] == 5  # type: ignore[index]
            assert await stream.nothing_within(0.3)
    stored = await watched.query(f"SELECT id, count(*) FROM {watched.updates} GROUP BY id")
    assert len(stored) == 6 and all(n == 1 for _, n in stored), stored


async def test_a_watched_collection_snapshot_then_live(watched: FeedDB) -> None:
    server = watched.start()
    base = f"{server.url}/api/collections/orders"
    async with httpx.AsyncClient(timeout=10) as client:
        keys = [await watched.add_order("first", n) for n in range(5)]
        seen: list[object] = []
        params = {"limit": "2"}
        while True:
            body = (await client.get(base, params=params)).json()
            seen += [d[watched.key] for d in body["documents"]]
            if body["next_cursor"] is None:
                break
            params = {"limit": "2", "cursor": body["next_cursor"]}
        assert seen == keys
        odd = (await client.get(base, params={"qty": "1"})).json()["documents"]
        assert [d[watched.key] for d in odd] == [keys[1]]
        one = await client.get(f"{base}/{keys[2]}")
        assert one.status_code == 200 and one.json()["qty"] == 2
        assert (await client.get(f"{base}/nope")).status_code == 404

        snapshot = await client.get(base)
        token = snapshot.json()["resume_token"]
        assert snapshot.headers["tidings-resume-token"] == token
        loaded = {d[watched.key] for d in snapshot.json()["documents"]}
        later = [await watched.add_order("later", n) for n in range(3)]
        async with watch(client, server.url, "orders", [("resume_after", token)]) as stream:
            streamed: list[object] = []
            while not set(later) <= set(streamed):
                event = payload(await stream.next(timeout_s=10))
                streamed.append(event["documentKey"][watched.key])  # type: ignore[index]
            assert await stream.nothing_within(0.3)
    # No gap: every document is in the snapshot or on the stream after its token.
    assert loaded | set(streamed) == set(keys) | set(later)
    assert streamed[-3:] == later


async def test_a_watched_collection_is_read_only_and_checks_tokens(watched: FeedDB) -> None:
    server = watched.start("--history-size", "10")
    base = f"{server.url}/api/collections/orders"
    async with httpx.AsyncClient(timeout=10) as client:
        refused = await client.post(base, json={"item": "x"}, headers=AUTH)
        assert refused.status_code == 405 and "read-only" in refused.json()["error"]
        assert (await client.delete(f"{base}/1", headers=AUTH)).status_code == 405
        for resume in ("garbage token", '{"_data": 1}', "a" * 2000):
            response = await client.get(f"{base}/changes", params={"resume_after": resume})
            assert response.status_code == 400, resume

        async with watch(client, server.url, "orders") as stream:
            await watched.add_order("first", 0)
            first = (await stream.next()).id or ""
            # The transports prune their history every 256 appends.
            await watched.add_orders(300)
            for _ in range(300):
                await stream.next()
        async with watch(client, server.url, "orders", [("resume_after", first)]) as stream:
            event = await stream.next()
            assert event.event == "error"
            error = payload(event)
            assert error["code"] == "resume_token_too_old" and "history" in str(error["error"])
            with pytest.raises(StopAsyncIteration):
                await stream.next()
