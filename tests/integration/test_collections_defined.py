"""Collections without a configuration file, once per database backend: defined and dropped
over HTTP (`PUT` / `DELETE /api/collections/NAME`) and with `tidings collection`, kept in
the database, picked up by every running process within a second, with `create`,
`modify` and `drop` events on the collection's topic. Waits are bounded by deadlines.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.conftest import PUBLISHER, open_stream, token
from tests.integration.feed_backends import (
    AUTH,
    FeedDB,
    eventually,
    insert,
    payload,
    watch,
)
from tests.services import REDIS_URL, require
from tidings.transports import open_transport

pytestmark = pytest.mark.anyio

SCHEMA = {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}}


async def status_is(client: httpx.AsyncClient, url: str, status: int) -> bool:
    return (await client.get(url)).status_code == status


async def test_define_over_http_write_watch_replace_and_drop(feed: FeedDB) -> None:
    server = feed.start(config=None)  # nothing to watch: the feed starts idle
    base = f"{server.url}/api/collections/notes"
    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.get(base)).status_code == 404
        created = await client.put(base, json={"read": "public", "schema": SCHEMA},
                                   headers=AUTH)
        assert created.status_code == 201, created.text
        assert created.json() == {
            "name": "notes", "kind": "managed", "key": "id", "read": "public",
            "write": "publisher", "topic": "/collections/notes", "schema": SCHEMA}
        assert created.headers["location"] == "/api/collections/notes"
        same = await client.put(base, json={"read": "public", "schema": SCHEMA}, headers=AUTH)
        assert same.status_code == 200 and same.json() == created.json()
        listed = (await client.get(f"{server.url}/api/collections")).json()["collections"]
        assert [c["name"] for c in listed] == ["notes"]

        # From the snapshot's token: the `create` event is before it (the tailer may still
        # be publishing it as the watches open).
        after = ("resume_after", (await client.get(base)).json()["resume_token"])
        async with watch(client, server.url, "notes", [after]) as stream, \
                watch(client, server.url, "notes", [after, ("operationType", "delete")]) \
                as deletes:
            doc = (await insert(client, server.url, {"text": "hello"}, name="notes")).json()
            event = payload(await stream.next())
            assert event["operationType"] == "insert"
            assert event["fullDocument"] == doc
            refused = await client.post(base, json={"text": 1}, headers=AUTH)
            assert refused.status_code == 422  # the schema holds

            # Other settings: replaced (200), the documents stay, a `modify` event.
            replaced = await client.put(base, json={"read": "public", "write": "anyone"},
                                        headers=AUTH)
            assert replaced.status_code == 200
            assert (replaced.json()["write"], replaced.json()["schema"]) == ("anyone", None)
            modify = payload(await stream.next())
            assert modify["operationType"] == "modify"
            assert modify["ns"]["coll"] == "notes"  # type: ignore[index]
            assert modify["operationDescription"] == {"read": "public", "write": "anyone"}
            anyone = await client.post(base, json={"text": 1})  # no token, no schema now
            assert anyone.status_code == 201, anyone.text
            assert payload(await stream.next())["operationType"] == "insert"
            assert len((await client.get(base)).json()["documents"]) == 2

            # Dropped: the table and its documents go; the watchers get a `drop` event.
            assert (await client.delete(base, headers=AUTH)).status_code == 204
            drop = await stream.next()
            assert payload(drop)["operationType"] == "drop"
            assert payload(drop)["ns"]["coll"] == "notes"  # type: ignore[index]
            assert drop.id == payload(drop)["_id"]["_data"]  # type: ignore[index]
            # Events about the collection pass a watcher's filters.
            kinds = [payload(e)["operationType"] for e in await deletes.take(2)]
            assert kinds == ["modify", "drop"]
        assert (await client.get(base)).status_code == 404
        assert (await client.delete(base, headers=AUTH)).status_code == 404
        assert not await feed.has_table("notes")

        # Defined again: a new, empty collection with the defaults (private reads).
        assert (await client.put(base, json={}, headers=AUTH)).status_code == 201
        assert (await client.get(base)).status_code == 401
        reader = {"Authorization": f"Bearer {token(subscribe=['/collections/notes'])}"}
        assert (await client.get(base, headers=reader)).json()["documents"] == []

    # A restart serves what the database defines.
    server.stop()
    again = feed.start(config=None)
    async with httpx.AsyncClient(timeout=10) as client:
        listed = (await client.get(f"{again.url}/api/collections")).json()["collections"]
        assert [(c["name"], c["read"]) for c in listed] == [("notes", "private")]
        assert (await client.post(f"{again.url}/api/collections/notes", json={"a": 1},
                                  headers=AUTH)).status_code == 201


async def test_the_cli_defines_lists_and_drops_while_a_server_runs(feed: FeedDB) -> None:
    server = feed.start(config=None)
    base = f"{server.url}/api/collections/notes"
    schema_file = feed.workdir / "notes.schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    async with httpx.AsyncClient(timeout=10) as client, \
            open_stream(client, server.url, [("topic", "/collections/notes")]) as topic:
        done = await feed.collection_command("create", "notes", "--read", "public",
                                             "--schema", str(schema_file))
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("created notes (public, write: publisher, schema)")
        created_at = time.monotonic()
        # The server had nothing to watch: it sets itself up and publishes the definition
        # by itself, before any request names the collection.
        create = payload(await topic.next())
        assert (create["operationType"], create["ns"]["coll"]) == (  # type: ignore[index]
            "create", "notes")
        await eventually(lambda: status_is(client, base, 200), timeout_s=5)
        assert time.monotonic() - created_at < 1.0
        await insert(client, server.url, {"text": "from the API"}, name="notes")
        assert payload(await topic.next())["operationType"] == "insert"
        assert (await client.post(base, json={}, headers=AUTH)).status_code == 422

        listed = await feed.collection_command("list")
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout == "notes\tread: public\twrite: publisher, schema\n"
        updated = await feed.collection_command("create", "notes", "--read", "public",
                                                "--write", "anyone")
        assert updated.returncode == 0 and updated.stdout.startswith("updated notes")
        assert payload(await topic.next())["operationType"] == "modify"

        dropped = await feed.collection_command("drop", "notes")
        assert dropped.returncode == 0 and dropped.stdout == "dropped notes\n", dropped.stderr
        assert payload(await topic.next())["operationType"] == "drop"
        await eventually(lambda: status_is(client, base, 404), timeout_s=1.0)
        assert (await feed.collection_command("list")).stdout == ""

    again = await feed.collection_command("drop", "notes")
    assert again.returncode != 0 and "no collection named 'notes'" in again.stderr
    for args, reason in (
        (("create", "bad-name"), "must be letters, digits and _"),
        (("create", "tidings_x"), "reserved"),
        (("create", "notes", "--schema", str(feed.workdir / "missing.json")),
         "cannot read the schema"),
    ):
        failed = await feed.collection_command(*args)
        assert failed.returncode != 0 and reason in failed.stderr, (args, failed.stderr)
    schema_file.write_text(json.dumps({"type": "nonsense"}))
    invalid = await feed.collection_command("create", "notes", "--schema", str(schema_file))
    assert invalid.returncode != 0 and "not a valid JSON Schema" in invalid.stderr
    config = feed.workdir / "declared.toml"
    config.write_text(feed.config)
    declared = await feed.collection_command("create", "messages", "--config", str(config))
    assert declared.returncode != 0 and "configuration file" in declared.stderr


async def test_bad_definitions(feed: FeedDB) -> None:
    server = feed.start()  # the configuration declares messages, secret and orders
    api = f"{server.url}/api/collections"
    async with httpx.AsyncClient(timeout=10) as client:
        # Who may: a publisher token whose publish claim matches /collections/NAME.
        assert (await client.put(f"{api}/notes", json={})).status_code == 401
        assert (await client.put(f"{api}/notes", json={}, headers={
            "Authorization": "Bearer not.a.jwt"})).status_code == 401
        other = {"Authorization": f"Bearer {token(publish=['/collections/other'])}"}
        assert (await client.put(f"{api}/notes", json={}, headers=other)).status_code == 403
        assert (await client.delete(f"{api}/notes", headers=other)).status_code == 403
        assert (await client.delete(f"{api}/notes")).status_code == 401

        for name in ("bad-name", "tidings_x", "updates", "1st", "x" * 64):
            response = await client.put(f"{api}/{name}", json={}, headers=AUTH)
            assert response.status_code == 400, name
            assert (await client.delete(f"{api}/{name}", headers=AUTH)).status_code == 400
        for body in (b"{", b"\xff\xfe", b'{"read": NaN}', b"[1]", b'"public"'):
            response = await client.put(f"{api}/notes", content=body, headers=AUTH)
            assert response.status_code == 400, body

        for body, field in (({"read": "everyone"}, "read"), ({"write": "admin"}, "write"),
                            ({"read": 1}, "read"), ({"colour": "red"}, "colour"),
                            ({"schema": 5}, "schema"), ({"schema": {"type": "nonsense"}},
                                                        "schema")):
            response = await client.put(f"{api}/notes", json=body, headers=AUTH)
            assert response.status_code == 422, body
            assert [e["field"] for e in response.json()["errors"]] == [field]
        nonsense = await client.put(f"{api}/notes", json={"schema": {"type": "nonsense"}},
                                    headers=AUTH)
        assert "nonsense" in nonsense.json()["error"]
        assert "not a valid JSON Schema" in nonsense.json()["error"]

        # The configuration file wins for the names it declares.
        for name in ("messages", "orders"):
            put = await client.put(f"{api}/{name}", json={"read": "private"}, headers=AUTH)
            assert put.status_code == 409 and "configuration file" in put.json()["error"]
            delete = await client.delete(f"{api}/{name}", headers=AUTH)
            assert delete.status_code == 409, name
        assert (await client.get(f"{api}/messages")).status_code == 200  # still public

        # A table of the user's own is not turned into a collection.
        await feed.execute("CREATE TABLE people (id integer PRIMARY KEY, name text)")
        taken = await client.put(f"{api}/people", json={}, headers=AUTH)
        assert taken.status_code == 409 and "not a Tidings collection" in taken.json()["error"]
        assert (await client.delete(f"{api}/people", headers=AUTH)).status_code == 404
        assert (await client.delete(f"{api}/nope", headers=AUTH)).status_code == 404
        if feed.name == "sqlite":  # SQLite's table names do not tell case apart
            assert (await client.put(f"{api}/notes", json={}, headers=AUTH)).status_code == 201
            assert (await client.put(f"{api}/Notes", json={},
                                     headers=AUTH)).status_code == 409


@pytest.fixture
async def redis_bus() -> AsyncIterator[str]:
    url = f"{require(REDIS_URL)}?namespace=t{uuid.uuid4().hex[:12]}"
    yield url
    transport = open_transport(url)
    await transport.start()
    await transport.destroy()  # type: ignore[attr-defined]
    await transport.close()


async def test_a_second_process_sees_a_definition_within_a_second(
        feed: FeedDB, redis_bus: str) -> None:
    a = feed.start("--bus", redis_bus, config=None)
    b = feed.start("--bus", redis_bus, config=None)
    on_a, on_b = f"{a.url}/api/collections/notes", f"{b.url}/api/collections/notes"
    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.get(on_b)).status_code == 404
        assert (await client.put(on_a, json={"read": "public"}, headers=AUTH)).status_code \
            == 201
        defined_at = time.monotonic()
        await eventually(lambda: status_is(client, on_b, 200), timeout_s=5)
        assert time.monotonic() - defined_at < 1.0, "b learned of notes too late"
        after = ("resume_after", (await client.get(on_b)).json()["resume_token"])
        async with watch(client, b.url, "notes", [after]) as b_sees:
            first = (await insert(client, a.url, {"text": "written on a"}, name="notes")).json()
            second = (await insert(client, b.url, {"text": "written on b"}, name="notes")).json()
            events = [payload(e) for e in await b_sees.take(2)]
            assert [e["fullDocument"] for e in events] == [first, second]

            assert (await client.delete(on_a, headers=AUTH)).status_code == 204
            dropped_at = time.monotonic()
            assert payload(await b_sees.next())["operationType"] == "drop"
            await eventually(lambda: status_is(client, on_b, 404), timeout_s=5)
            assert time.monotonic() - dropped_at < 1.0, "b served notes too long"
        assert (await client.post(on_b, json={"text": "late"},
                                  headers={"Authorization": f"Bearer {PUBLISHER}"})
                ).status_code == 404
