"""The chat over real HTTP: a real `tidings serve`, two (or three) users, their live streams.

Every stream is a real hub subscription authorized by the user's session cookie alone
(`mercureAuthorization`, set at sign-up), read with the project's SSE parser. Waits are on
events with deadlines; the only fixed wait is `nothing_within`, which proves an absence.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import PUBLISHER, HubProcess, SSEStream, open_stream, token
from tests.integration.test_lifecycle import eventually, metric

pytestmark = pytest.mark.anyio

PASSWORD = "correct horse battery"


# -- helpers -------------------------------------------------------------------------------


async def signup(url: str, name: str, password: str = PASSWORD) -> httpx.AsyncClient:
    """A client holding `name`'s session cookies (the caller closes it)."""
    client = httpx.AsyncClient(base_url=url, timeout=10)
    reply = await client.post("/api/auth/signup", json={"username": name, "password": password})
    assert reply.status_code == 201, reply.text
    return client


@contextlib.asynccontextmanager
async def users(url: str, *names: str) -> AsyncIterator[list[httpx.AsyncClient]]:
    clients = [await signup(url, name) for name in names]
    try:
        yield clients
    finally:
        for client in clients:
            await client.aclose()


@contextlib.asynccontextmanager
async def stream(client: httpx.AsyncClient, *topics: str,
                 last_event_id: str | None = None) -> AsyncIterator[SSEStream]:
    """A hub subscription with this client's cookies (and nothing else)."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    async with open_stream(client, str(client.base_url).rstrip("/"),
                           [("topic", t) for t in topics], headers) as opened:
        assert opened.response.status_code == 200
        yield opened


async def next_of(events: SSEStream, *types: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """The next update of one of `types`, skipping others (presence, members, ...)."""
    deadline = time.monotonic() + timeout_s
    while True:
        event = await events.next(max(0.01, deadline - time.monotonic()))
        data = json.loads(event.data)
        if data["type"] in types:
            data["_id"] = event.id
            return dict(data)


def cookie_attributes(reply: httpx.Response) -> dict[str, str]:
    return {header.split("=", 1)[0]: header for header in reply.headers.get_list("set-cookie")}


@pytest.fixture
def server(chat_hubs: type[HubProcess]) -> HubProcess:
    return chat_hubs().start()


# -- accounts ------------------------------------------------------------------------------


async def test_signup_login_logout_and_the_cookies(server: HubProcess) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        reply = await client.post("/api/auth/signup",
                                  json={"username": "Alice", "password": PASSWORD})
        assert reply.status_code == 201
        assert reply.json()["username"] == "alice"  # case-folded
        cookies = cookie_attributes(reply)
        for name, path in (("tidings_session", "Path=/;"), ("mercureAuthorization",
                                                             "Path=/.well-known/mercure")):
            assert "HttpOnly" in cookies[name] and "SameSite=lax" in cookies[name]
            assert path in cookies[name] + ";"
        assert (await client.get("/api/me")).json()["username"] == "alice"

        taken = await client.post("/api/auth/signup",
                                  json={"username": "ALICE", "password": PASSWORD})
        assert taken.status_code == 409

        logout = await client.post("/api/auth/logout")
        assert logout.status_code == 204
        assert (await client.get("/api/me")).status_code == 401

        wrong = await client.post("/api/auth/login",
                                  json={"username": "alice", "password": "not the password"})
        nobody = await client.post("/api/auth/login",
                                   json={"username": "nobody", "password": PASSWORD})
        assert wrong.status_code == nobody.status_code == 401
        assert wrong.json()["error"] == nobody.json()["error"] == "wrong username or password"

        login = await client.post("/api/auth/login",
                                  json={"username": "alice", "password": PASSWORD})
        assert login.status_code == 200 and login.json()["username"] == "alice"
        me = (await client.get("/api/me")).json()
        assert "/users/alice/notifications" in me["subscribe"]


async def test_a_logged_out_token_is_revoked_for_the_api(server: HubProcess) -> None:
    async with users(server.url, "alice", "bob") as (alice, bob):
        session = alice.cookies["tidings_session"]
        assert (await alice.post("/api/rooms/general/messages",
                                 json={"content": "before"})).status_code == 201
        assert (await alice.post("/api/auth/logout")).status_code == 204
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as other:
            auth = {"Authorization": f"Bearer {session}"}
            reply = await other.get("/api/me", headers=auth)
            assert reply.status_code == 401
            # Nor may it post: on PostgreSQL the post's own call checks the session (a
            # plain message, one with a mention, a direct one: each path of a post).
            for path, content in (("/api/rooms/general/messages", "after"),
                                  ("/api/rooms/general/messages", "after, @bob"),
                                  ("/api/dm/bob/messages", "after, to bob")):
                reply = await other.post(path, json={"content": content}, headers=auth)
                assert reply.status_code == 401, (path, content, reply.text)
            # A publisher token is no session either.
            reply = await other.get("/api/me", headers={"Authorization": f"Bearer {PUBLISHER}"})
            assert reply.status_code == 401
        history = (await bob.get("/api/rooms/general/messages")).json()["messages"]
        assert [m["content"] for m in history if m["sender"] == "alice"] == ["before"]
        dm = (await bob.get("/api/dm/alice/messages")).json()["messages"]
        assert dm == []


# -- bad input -------------------------------------------------------------------------------


async def test_bad_input(server: HubProcess) -> None:
    async with users(server.url, "alice") as (alice,):
        post = "/api/rooms/general/messages"
        for content in ("", "   \n\t ", None, 5):
            reply = await alice.post(post, json={"content": content})
            assert reply.status_code == 422, content
            assert reply.json()["field"] == "content"
        too_long = await alice.post(post, json={"content": "x" * 4001})
        assert too_long.status_code in (413, 422)
        assert (await alice.post(post, json={"content": "x" * 4000})).status_code == 201
        assert (await alice.post("/api/rooms/nope/messages",
                                 json={"content": "hi"})).status_code == 404
        assert (await alice.get("/api/rooms/nope/messages")).status_code == 404
        assert (await alice.post("/api/dm/nobody/messages",
                                 json={"content": "hi"})).status_code == 404
        assert (await alice.get("/api/dm/nobody/messages")).status_code == 404
        assert (await alice.patch("/api/messages/999999",
                                  json={"content": "x"})).status_code == 404
        assert (await alice.post(post, content=b"{not json",
                                 headers={"Content-Type": "application/json"})).status_code == 400
        assert (await alice.post(post, content=b"content=hi", headers={
            "Content-Type": "application/x-www-form-urlencoded"})).status_code == 400
        assert (await alice.get(post + "?limit=0")).status_code == 422
        assert (await alice.get(post + "?before=abc")).status_code == 422
        for body in ({"username": "a", "password": PASSWORD},
                     {"username": "bad name", "password": PASSWORD},
                     {"username": "bob", "password": "short"}):
            reply = await alice.post("/api/auth/signup", json=body)
            assert reply.status_code == 422, body
        assert (await alice.post("/api/rooms", json={"name": "Bad Room!"})).status_code == 422
        assert (await alice.post("/api/rooms", json={"name": "general"})).status_code == 409

    async with httpx.AsyncClient(base_url=server.url, timeout=10) as anonymous:
        assert (await anonymous.post(post, json={"content": "hi"})).status_code == 401
        assert (await anonymous.get(post)).status_code == 401
        assert (await anonymous.post("/api/rooms", json={"name": "x"})).status_code == 401


async def test_posting_too_fast_is_429_with_retry_after(server: HubProcess) -> None:
    async with users(server.url, "alice", "bob") as (alice, bob):
        for i in range(10):  # the default: 10 messages per 10 s
            reply = await alice.post("/api/rooms/general/messages", json={"content": f"m{i}"})
            assert reply.status_code == 201
        refused = await alice.post("/api/rooms/general/messages", json={"content": "one more"})
        assert refused.status_code == 429
        assert 1 <= int(refused.headers["Retry-After"]) <= 10
        # Per user: bob is not slowed down by alice.
        assert (await bob.post("/api/dm/alice/messages",
                               json={"content": "hi"})).status_code == 201


async def test_the_rate_is_configurable(chat_hubs: type[HubProcess]) -> None:
    server = chat_hubs("--chat-rate-messages", "2", "--chat-rate-window", "60").start()
    async with users(server.url, "alice") as (alice,):
        codes = [(await alice.post("/api/rooms/general/messages",
                                   json={"content": str(i)})).status_code for i in range(3)]
        assert codes == [201, 201, 429]


# -- messages, live ------------------------------------------------------------------------


async def test_messages_reach_the_other_window_live(server: HubProcess) -> None:
    async with users(server.url, "alice", "bob") as (alice, bob), \
            stream(bob, "/chat/rooms/general") as bob_sees:
        sent_at = time.monotonic()
        reply = await alice.post("/api/rooms/general/messages",
                                 json={"content": "hello <b>bob</b>"})
        assert reply.status_code == 201
        message = reply.json()
        assert set(message) >= {"id", "room", "sender", "content", "created_at"}
        assert (message["room"], message["sender"]) == ("general", "alice")
        created = await next_of(bob_sees, "message.created")
        assert time.monotonic() - sent_at < 1.0
        assert created["message"] == message

        edit = await alice.patch(f"/api/rooms/general/messages/{message['id']}",
                                 json={"content": "hello, bob"})
        assert edit.status_code == 200 and edit.json()["edited_at"]
        updated = await next_of(bob_sees, "message.updated")
        assert updated["message"]["content"] == "hello, bob"

        # Only the author may change it.
        assert (await bob.patch(f"/api/messages/{message['id']}",
                                json={"content": "mine now"})).status_code == 403
        assert (await bob.delete(f"/api/messages/{message['id']}")).status_code == 403

        assert (await alice.delete(f"/api/messages/{message['id']}")).status_code == 204
        deleted = await next_of(bob_sees, "message.deleted")
        assert deleted["message"] == {"id": message["id"], "room": "general", "dm": None}
        history = (await bob.get("/api/rooms/general/messages")).json()
        assert history["messages"] == []


async def test_history_is_newest_first_with_a_cursor(server: HubProcess) -> None:
    async with users(server.url, "alice", "bob") as (alice, bob):
        ids = []
        for i in range(7):
            client = alice if i % 2 else bob
            reply = await client.post("/api/rooms/general/messages", json={"content": f"#{i}"})
            ids.append(reply.json()["id"])
        page = (await alice.get("/api/rooms/general/messages?limit=3")).json()
        assert [m["id"] for m in page["messages"]] == ids[::-1][:3]
        seen = [m["id"] for m in page["messages"]]
        while page["next_before"] is not None:
            page = (await alice.get(
                f"/api/rooms/general/messages?limit=3&before={page['next_before']}")).json()
            seen += [m["id"] for m in page["messages"]]
        assert seen == ids[::-1]


async def test_rooms_join_leave_create_and_membership(server: HubProcess) -> None:
    async with users(server.url, "alice", "bob") as (alice, bob), \
            stream(bob, "/chat/rooms") as bob_rooms:
        created = await alice.post("/api/rooms", json={"name": "Random"})
        assert created.status_code == 201 and created.json()["name"] == "random"
        assert (await next_of(bob_rooms, "room.created"))["room"]["name"] == "random"
        rooms = {r["name"]: r for r in (await bob.get("/api/rooms")).json()["rooms"]}
        assert rooms["general"]["joined"] and not rooms["random"]["joined"]
        # Public rooms: readable by anyone signed in; writing needs joining.
        assert (await bob.get("/api/rooms/random/messages")).status_code == 200
        assert (await bob.post("/api/rooms/random/messages",
                               json={"content": "hi"})).status_code == 403
        async with stream(alice, "/chat/rooms/random") as alice_sees:
            joined = await bob.post("/api/rooms/random/join")
            assert joined.status_code == 200 and joined.json()["joined"]
            assert (await next_of(alice_sees, "member.joined"))["user"] == "bob"
            assert (await bob.post("/api/rooms/random/messages",
                                   json={"content": "hi"})).status_code == 201
            left = await bob.post("/api/rooms/random/leave")
            assert left.status_code == 200 and not left.json()["joined"]
            assert (await next_of(alice_sees, "member.left"))["user"] == "bob"
        assert (await bob.post("/api/rooms/nope/join")).status_code == 404


# -- direct messages: private topics ------------------------------------------------------


async def test_direct_messages_reach_only_the_two(server: HubProcess) -> None:
    dm_topic = "/chat/dm/alice/bob"
    async with users(server.url, "bob", "alice", "carol") as (bob, alice, carol), \
            stream(bob, "/chat/dm/{a}/{b}") as bob_sees, \
            stream(carol, "/chat/dm/{a}/{b}", dm_topic) as carol_sees:
        async with httpx.AsyncClient(timeout=10) as anonymous, \
                open_stream(anonymous, server.url, [("topic", dm_topic)]) as nobody_sees:
            reply = await alice.post("/api/dm/BOB/messages", json={"content": "psst"})
            assert reply.status_code == 201
            assert reply.json()["dm"] == ["alice", "bob"]
            created = await next_of(bob_sees, "message.created")
            assert created["message"]["content"] == "psst"
            assert await carol_sees.nothing_within(0.5)
            assert await nobody_sees.nothing_within(0.1)

        # History: the two read it; the URL always means "me and that user".
        bob_view = (await bob.get("/api/dm/alice/messages")).json()
        assert [m["content"] for m in bob_view["messages"]] == ["psst"]
        carol_view = (await carol.get("/api/dm/alice/messages")).json()
        assert carol_view["messages"] == []
        conversations = (await bob.get("/api/dm")).json()["conversations"]
        assert [(c["user"], c["unread"]) for c in conversations] == [("alice", 1)]
        message_id = reply.json()["id"]
        assert (await carol.patch(f"/api/messages/{message_id}",
                                  json={"content": "x"})).status_code == 404


async def test_a_session_token_reads_exactly_its_own_private_topics(server: HubProcess) -> None:
    async with users(server.url, "alice", "bob") as (alice, bob):
        # Alice's session asks for bob's notifications and every task: the hub lets the
        # stream open (the selectors are just wishes) and delivers none of them.
        async with stream(alice, "/users/bob/notifications", "/tasks/{id}") as alice_sees, \
                stream(bob, "/users/bob/notifications") as bob_sees:
            async with httpx.AsyncClient(timeout=10) as publisher:
                await publisher.post(server.url + "/api/notifications", json={
                    "user": "bob", "message": "for bob only", "type": "info"},
                    headers={"Authorization": f"Bearer {PUBLISHER}"})
            assert (await next_of(bob_sees, "notification"))["message"] == "for bob only"
            assert await alice_sees.nothing_within(0.3)


# -- presence, typing, unread ------------------------------------------------------------------


async def test_presence_follows_the_streams(server: HubProcess) -> None:
    async with users(server.url, "alice", "bob") as (alice, bob), \
            stream(bob, "/chat/rooms/general") as bob_sees:
        first = await next_of(bob_sees, "presence")
        assert (first["room"], first["online"]) == ("general", ["bob"])
        async with stream(alice, "/chat/rooms/general"):
            both = await next_of(bob_sees, "presence")
            assert both["online"] == ["alice", "bob"]
            reply = (await bob.get("/api/rooms/general/presence")).json()
            assert reply == {"room": "general", "online": ["alice", "bob"]}
            everyone = (await bob.get("/api/users")).json()["users"]
            assert all(user["online"] for user in everyone)
        # Leaving is announced after a short grace period (a reconnect does not flicker).
        alone = await next_of(bob_sees, "presence", timeout_s=10)
        assert alone["online"] == ["bob"]


async def test_typing_is_live_and_not_in_history(server: HubProcess) -> None:
    async with users(server.url, "alice", "bob") as (alice, bob), \
            stream(bob, "/chat/rooms/general", "/chat/dm/{a}/{b}") as bob_sees:
        assert (await alice.post("/api/rooms/general/typing")).status_code == 202
        typing = await next_of(bob_sees, "typing")
        assert (typing["room"], typing["user"]) == ("general", "alice")
        assert (await alice.post("/api/dm/bob/typing")).status_code == 202
        typing = await next_of(bob_sees, "typing")
        assert (typing["dm"], typing["user"]) == (["alice", "bob"], "alice")
        history = (await bob.get("/api/rooms/general/messages")).json()
        assert history["messages"] == []
        assert (await alice.post("/api/rooms/nope/typing")).status_code == 404


async def test_unread_counts_and_read_markers(server: HubProcess) -> None:
    async with users(server.url, "alice", "bob") as (alice, bob), \
            stream(bob, "/users/bob/notifications") as bob_notes:
        for text in ("one", "two", "three"):
            await alice.post("/api/rooms/general/messages", json={"content": text})
        await alice.post("/api/dm/bob/messages", json={"content": "dm"})
        rooms = {r["name"]: r for r in (await bob.get("/api/rooms")).json()["rooms"]}
        assert rooms["general"]["unread"] == 3
        # One's own messages are never unread.
        assert {r["name"]: r["unread"] for r in
                (await alice.get("/api/rooms")).json()["rooms"]} == {"general": 0}
        assert (await bob.get("/api/dm")).json()["conversations"][0]["unread"] == 1

        marked = await bob.post("/api/rooms/general/read", json={})
        assert marked.status_code == 200
        read = await next_of(bob_notes, "read")  # every window of bob clears its count
        assert (read["room"], read["last_read"]) == ("general", rooms["general"]["last_id"])
        rooms = {r["name"]: r for r in (await bob.get("/api/rooms")).json()["rooms"]}
        assert rooms["general"]["unread"] == 0
        await bob.post("/api/dm/alice/read")
        assert (await bob.get("/api/dm")).json()["conversations"][0]["unread"] == 0


# -- notifications ------------------------------------------------------------------------------


async def test_notifications_need_a_publisher_token(server: HubProcess) -> None:
    async with users(server.url, "alice", "bob") as (alice, bob), \
            stream(bob, "/users/bob/notifications") as bob_notes, \
            httpx.AsyncClient(base_url=server.url, timeout=10) as service:
        body = {"user": "bob", "message": "Your build passed", "type": "success"}
        sent = await service.post("/api/notifications", json=body,
                                  headers={"Authorization": f"Bearer {PUBLISHER}"})
        assert sent.status_code == 202
        note = await next_of(bob_notes, "notification")
        assert (note["kind"], note["message"]) == ("success", "Your build passed")

        assert (await service.post("/api/notifications", json=body)).status_code == 401
        narrow = token(publish=["/users/alice/notifications"])
        assert (await service.post("/api/notifications", json=body, headers={
            "Authorization": f"Bearer {narrow}"})).status_code == 403
        # A session cookie is not a publisher token.
        assert (await alice.post("/api/notifications", json=body)).status_code == 401
        assert (await service.post("/api/notifications", json={**body, "user": "nobody"},
                                   headers={"Authorization": f"Bearer {PUBLISHER}"})
                ).status_code == 404
        assert (await service.post("/api/notifications", json={**body, "message": " "},
                                   headers={"Authorization": f"Bearer {PUBLISHER}"})
                ).status_code == 422


async def test_a_mention_notifies_that_user(server: HubProcess) -> None:
    async with users(server.url, "alice", "bob", "carol") as (alice, bob, carol), \
            stream(bob, "/users/bob/notifications") as bob_notes, \
            stream(carol, "/users/carol/notifications") as carol_notes:
        reply = await alice.post("/api/rooms/general/messages",
                                 json={"content": "@Bob look, and @nobody too"})
        note = await next_of(bob_notes, "notification")
        assert note["kind"] == "mention" and note["from"] == "alice"
        assert (note["room"], note["message_id"]) == ("general", reply.json()["id"])
        assert await carol_notes.nothing_within(0.3)


# -- long tasks ----------------------------------------------------------------------------------


async def test_export_reports_progress_and_serves_the_file(
        chat_hubs: type[HubProcess]) -> None:
    server = chat_hubs("--chat-rate-messages", "1000").start()
    async with users(server.url, "alice", "bob") as (alice, bob), \
            stream(alice, "/tasks/alice.{id}") as alice_tasks, \
            stream(bob, "/tasks/{id}") as bob_tasks:
        for i in range(450):
            await alice.post("/api/rooms/general/messages", json={"content": f"=1+{i}"})
        reply = await alice.post("/api/rooms/general/export", json={"format": "csv"})
        assert reply.status_code == 202
        task_id = reply.json()["task"]
        assert reply.headers["location"] == f"/api/tasks/{task_id}"
        percents = []
        while True:
            update = await next_of(alice_tasks, "task.progress", "task.completed",
                                   "task.failed", timeout_s=20)
            assert update["task"] == task_id and update["type"] != "task.failed"
            percents.append(update["percent"])
            if update["type"] == "task.completed":
                break
        assert percents == sorted(percents) and percents[-1] == 100 and len(percents) >= 5
        assert update["download"] == f"/api/tasks/{task_id}/download"
        assert (await alice.get(f"/api/tasks/{task_id}")).json()["state"] == "completed"
        download = await alice.get(update["download"])
        assert download.status_code == 200 and download.headers["content-type"].startswith(
            "text/csv")
        lines = download.text.splitlines()
        assert lines[0] == "id,sender,content,created_at,edited_at" and len(lines) == 451
        assert ",'=1+0," in lines[1]  # no formulas for spreadsheets
        # Private to its owner: the topic, the state and the file.
        assert await bob_tasks.nothing_within(0.2)
        assert (await bob.get(f"/api/tasks/{task_id}")).status_code == 404
        assert (await bob.get(f"/api/tasks/{task_id}/download")).status_code == 404

        as_json = await alice.post("/api/rooms/general/export", json={})
        task_id = as_json.json()["task"]
        while (update := await next_of(alice_tasks, "task.completed", timeout_s=20)
               )["task"] != task_id:
            pass
        document = (await alice.get(update["download"])).json()
        assert document["room"] == "general" and len(document["messages"]) == 450
        assert (await alice.post("/api/rooms/general/export",
                                 json={"format": "xml"})).status_code == 422
        assert (await alice.post("/api/rooms/nope/export", json={})).status_code == 404


# -- nothing lost, nothing doubled ------------------------------------------------------------


async def test_a_stream_resumes_across_a_restart_with_every_message_once(
        chat_hubs: type[HubProcess]) -> None:
    first = chat_hubs().start()
    port = urlsplit(first.url).port
    async with users(first.url, "alice", "bob") as (alice, bob):
        async with stream(bob, "/chat/rooms/general") as bob_sees:
            await alice.post("/api/rooms/general/messages", json={"content": "before"})
            last_id = (await next_of(bob_sees, "message.created"))["_id"]
        first.stop()
        second = chat_hubs("--port", str(port)).start()
        assert second.url == first.url
        sent = []
        for i in range(5):  # while bob is away
            reply = await alice.post("/api/rooms/general/messages", json={"content": f"m{i}"})
            sent.append(reply.json()["id"])
        async with stream(bob, "/chat/rooms/general", last_event_id=last_id) as bob_sees:
            got = [(await next_of(bob_sees, "message.created"))["message"]["id"]
                   for _ in sent]
            assert got == sent
            more = await alice.post("/api/rooms/general/messages", json={"content": "live"})
            assert (await next_of(bob_sees, "message.created"))["message"]["id"] == \
                more.json()["id"]


async def test_the_page_and_the_debugger(server: HubProcess) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        page = await client.get("/")
        assert page.status_code == 200 and "Tidings chat" in page.text
        assert 'href="/hub"' in page.text
        debugger = await client.get("/hub")
        assert debugger.status_code == 200 and "debugger.js" in debugger.text
        assert (await client.get("/static/chat/chat.js")).status_code == 200


async def test_no_chat_keeps_the_debugger_at_the_root(hub_factory: type[HubProcess]) -> None:
    server = hub_factory("--no-chat").start()
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        assert "debugger.js" in (await client.get("/")).text
        assert (await client.get("/api/me")).status_code == 404


# -- for operators -----------------------------------------------------------------------------


async def test_metrics_say_what_the_chat_does(server: HubProcess, chat_db: str) -> None:
    store = "postgresql" if chat_db.startswith("postgresql") else "sqlite"

    async def value(name: str) -> float:
        return await metric(ops, server, name)

    async def equals(name: str, expected: float) -> bool:
        return await value(name) == expected

    async with httpx.AsyncClient(timeout=10) as ops, users(server.url, "alice") as (alice,):
        assert await value(f'tidings_chat_info{{store="{store}"}}') == 1
        await eventually(lambda: equals("tidings_chat_relay_leading", 1), 10, "the relay")
        assert await value("tidings_chat_messages_posted_total") == 0
        async with stream(alice, "/chat/rooms/general") as events:
            await eventually(lambda: equals("tidings_chat_streams", 1), 10, "one stream")
            before = await value("tidings_chat_relay_published_position")
            for text in ("one", "two"):
                reply = await alice.post("/api/rooms/general/messages", json={"content": text})
                assert reply.status_code == 201, reply.text
            for text in ("one", "two"):
                assert (await next_of(events, "message.created"))["message"]["content"] == text
            assert await value("tidings_chat_messages_posted_total") == 2
            # Both messages' updates went through this process's relay to the stream.
            assert await value("tidings_chat_relay_published_position") >= before + 2
        await eventually(lambda: equals("tidings_chat_streams", 0), 10, "no stream")
        if store == "postgresql":
            assert await value("tidings_chat_cluster_processes") == 1
        else:
            assert "tidings_chat_cluster_processes" not in (
                await ops.get(server.url + "/metrics")).text
