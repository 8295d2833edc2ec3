"""The chat on two `tidings serve` processes sharing its PostgreSQL schema and a Redis bus:
what one process does, windows on the other see; presence, the rate limit, the
assistant's Stop and exports work from either; a SIGKILLed process's users go offline
within its heartbeat window.

A user signs up on the first process; the same session cookies are then used against
either (`on`), as a browser behind a load balancer would."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import pytest

from tests.conftest import HubProcess
from tests.integration.test_assistant import CHUNKS, fake_llm, reply_created
from tests.integration.test_chat import next_of, stream, users
from tests.integration.test_lifecycle import eventually, metric
from tests.services import REDIS_URL, require
from tidings.pgdb import LEADER_IDLE_LIMIT_S

pytestmark = pytest.mark.anyio
postgres_only = pytest.mark.parametrize("chat_db", ["postgres"], indirect=True)

HEARTBEAT_S = 1.0
Start = Callable[..., HubProcess]


@pytest.fixture
def bus() -> Iterator[str]:
    yield f"{require(REDIS_URL)}?namespace=cs{uuid.uuid4().hex[:12]}"


@pytest.fixture
def start(chat_hubs: type[HubProcess], bus: str) -> Start:
    """A server on the shared chat schema and bus (with `args`)."""

    def make(*args: str) -> HubProcess:
        return chat_hubs("--bus", bus, "--chat-heartbeat", str(HEARTBEAT_S), *args).start()

    return make


@contextlib.asynccontextmanager
async def on(client: httpx.AsyncClient, server: HubProcess) -> AsyncIterator[httpx.AsyncClient]:
    """The same user (cookies) talking to another server."""
    async with httpx.AsyncClient(base_url=server.url, cookies=client.cookies,
                                 timeout=10) as other:
        yield other


async def presence_until(events: object, online: list[str], timeout_s: float = 15.0) -> None:
    """Skip presence updates of the room until one says exactly `online`."""
    async with asyncio.timeout(timeout_s):
        while True:
            update = await next_of(events, "presence", timeout_s=timeout_s)  # type: ignore[arg-type]
            if update["room"] == "general" and update["online"] == online:
                return


@postgres_only
async def test_messages_presence_and_typing_across_processes(start: Start) -> None:
    a, b = start(), start()
    async with users(a.url, "alice", "bob") as (alice, bob_a), on(bob_a, b) as bob, \
            stream(bob, "/chat/rooms/general", "/chat/dm/{x}/{y}") as bob_sees:
        await presence_until(bob_sees, ["bob"])
        async with stream(alice, "/chat/rooms/general"):  # alice's window is on A
            await presence_until(bob_sees, ["alice", "bob"])
            assert (await bob.get("/api/rooms/general/presence")).json()["online"] == \
                ["alice", "bob"]
            assert all(user["online"] for user in (await bob.get("/api/users")).json()["users"])
            posted = await alice.post("/api/rooms/general/messages", json={"content": "hi"})
            assert posted.status_code == 201
            created = await next_of(bob_sees, "message.created")
            assert created["message"] == posted.json()
            edited = await alice.patch(f"/api/messages/{posted.json()['id']}",
                                       json={"content": "hi!"})
            assert (await next_of(bob_sees, "message.updated"))["message"] == edited.json()
            await alice.post("/api/dm/bob/messages", json={"content": "psst"})
            assert (await next_of(bob_sees, "message.created"))["message"]["content"] == "psst"
            assert (await alice.post("/api/rooms/general/typing")).status_code == 202
            typing = await next_of(bob_sees, "typing")
            assert (typing["room"], typing["user"]) == ("general", "alice")
        await presence_until(bob_sees, ["bob"])  # alice closed her window: after the grace


@postgres_only
async def test_a_room_created_on_one_process_is_known_to_the_other(start: Start) -> None:
    a, b = start(), start()
    async with users(a.url, "alice") as (alice,), on(alice, b) as alice_b:
        assert (await alice.post("/api/rooms", json={"name": "dev"})).status_code == 201
        assert (await alice_b.get("/api/rooms/dev")).status_code == 200
        assert (await alice_b.post("/api/rooms/dev/messages",
                                   json={"content": "x"})).status_code == 201


@postgres_only
async def test_a_killed_process_s_users_go_offline_on_the_other(start: Start) -> None:
    a, b = start(), start()
    async with users(a.url, "alice", "bob") as (alice, bob_a), on(bob_a, b) as bob, \
            stream(bob, "/chat/rooms/general") as bob_sees:
        async with stream(alice, "/chat/rooms/general"):
            await presence_until(bob_sees, ["alice", "bob"])
            a.stop(signal.SIGKILL)
            # Within two heartbeats and one sweep (3 s here), plus the relay's takeover.
            await presence_until(bob_sees, ["bob"], timeout_s=20)
        assert (await bob.get("/api/rooms/general/presence")).json()["online"] == ["bob"]


@postgres_only
async def test_the_rate_limit_holds_across_processes(start: Start) -> None:
    a, b = (start("--chat-rate-messages", "3", "--chat-rate-window", "60")
            for _ in range(2))
    async with users(a.url, "alice") as (alice,), on(alice, b) as alice_b:
        for client in (alice, alice_b, alice):
            reply = await client.post("/api/rooms/general/messages", json={"content": "x"})
            assert reply.status_code == 201, reply.text
        for client in (alice_b, alice):
            refused = await client.post("/api/rooms/general/messages", json={"content": "x"})
            assert refused.status_code == 429
            assert 1 <= int(refused.headers["retry-after"]) <= 60


@postgres_only
async def test_stop_on_one_process_stops_a_reply_streaming_on_the_other(
        start: Start) -> None:
    async with fake_llm() as fake:
        fake.mode = "gated"
        a, b = (start("--assistant-url", fake.url, "--assistant-model", "m") for _ in range(2))
        async with users(a.url, "alice", "bob") as (alice, bob_a), on(bob_a, b) as bob, \
                on(alice, b) as alice_b, stream(bob, "/chat/rooms/general") as bob_sees:
            await alice.post("/api/rooms/general/messages",
                             json={"content": "@assistant say hello"})  # streams on A
            message_id = (await reply_created(bob_sees))["message"]["id"]
            fake.release()
            delta = await next_of(bob_sees, "message.delta")
            assert delta["text"] == CHUNKS[0]
            cancel = f"/api/rooms/general/assistant/{message_id}/cancel"
            assert (await bob.post(cancel)).status_code == 403
            stopped = await alice_b.post(cancel)  # Stop pressed on a window served by B
            assert stopped.status_code == 200, stopped.text
            assert stopped.json()["assistant"]["state"] == "cancelled"
            assert stopped.json()["content"] == CHUNKS[0]
            completed = await next_of(bob_sees, "message.completed")
            assert completed["message"] == stopped.json()
            await asyncio.wait_for(fake.disconnected.wait(), 5)  # A hung up the endpoint


@postgres_only
async def test_an_export_started_on_one_process_is_served_by_the_other(
        start: Start) -> None:
    a, b = start(), start()
    texts = [f"m{i}" for i in range(5)]
    async with users(a.url, "alice") as (alice,), on(alice, b) as alice_b, \
            stream(alice_b, "/tasks/alice.{id}") as progress_on_b:
        await asyncio.gather(*(alice.post("/api/rooms/general/messages", json={"content": t})
                               for t in texts))
        started = await alice.post("/api/rooms/general/export", json={"format": "json"})
        assert started.status_code == 202
        task_id = started.json()["task"]
        done = await next_of(progress_on_b, "task.completed", timeout_s=20)
        assert done["task"] == task_id
        assert (await alice_b.get(f"/api/tasks/{task_id}")).json()["state"] == "completed"
        download = await alice_b.get(f"/api/tasks/{task_id}/download")
        assert download.status_code == 200
        assert sorted(m["content"] for m in download.json()["messages"]) == texts


@postgres_only
async def test_two_workers_on_one_port_serve_one_chat(start: Start) -> None:
    """`--workers 2`: connections land on either worker (the kernel spreads them);
    whichever they land on, every window sees the same presence, messages and limit."""
    server = start("--workers", "2", "--chat-rate-messages", "4", "--chat-rate-window", "60")
    async with users(server.url, "alice", "bob") as (alice, bob), \
            contextlib.AsyncExitStack() as stack:
        windows = []
        for _ in range(6):  # bob's windows, each on a connection of its own
            window = await stack.enter_async_context(on(bob, server))
            windows.append(await stack.enter_async_context(stream(window,
                                                                  "/chat/rooms/general")))
        async with stream(alice, "/chat/rooms/general"):
            for seen in windows:
                await presence_until(seen, ["alice", "bob"])
            for i in range(4):
                async with on(alice, server) as fresh:  # a new connection each time
                    reply = await fresh.post("/api/rooms/general/messages",
                                             json={"content": f"w{i}"})
                    assert reply.status_code == 201, reply.text
            async with on(alice, server) as fresh:
                refused = await fresh.post("/api/rooms/general/messages", json={"content": "x"})
                assert refused.status_code == 429
            for seen in windows:
                texts = [(await next_of(seen, "message.created"))["message"]["content"]
                         for _ in range(4)]
                assert texts == [f"w{i}" for i in range(4)]
    pids = {httpx.get(server.url + "/healthz", timeout=5,
                      headers={"Connection": "close"}).json()["pid"] for _ in range(20)}
    assert len(pids) == 2


@pytest.mark.parametrize("chat_db", ["sqlite"], indirect=True)
async def test_on_sqlite_several_workers_turn_the_chat_off_and_say_why(start: Start) -> None:
    server = start("--workers", "2")
    assert httpx.get(server.url + "/api/me", timeout=5).status_code == 404
    assert "chat: off, because --workers 2 needs the chat's tables shared" in server.log()


@postgres_only
async def test_metrics_show_one_relay_and_who_takes_over(start: Start) -> None:
    """`/metrics` of each process: one of the two relays, both count two processes; when
    the relay is SIGKILLed, the other relays and counts one."""
    a, b = start(), start()
    async with httpx.AsyncClient(timeout=10) as ops:

        async def values(name: str, *servers: HubProcess) -> list[float]:
            return [await metric(ops, server, name) for server in servers]

        async def one_relay_two_processes() -> bool:
            return (sorted(await values("tidings_chat_relay_leading", a, b)) == [0, 1]
                    and await values("tidings_chat_cluster_processes", a, b) == [2, 2])

        await eventually(one_relay_two_processes, 15, "one relay among two processes")
        relay, other = (a, b) if await values("tidings_chat_relay_leading", a) == [1] else (b, a)
        relay.stop(signal.SIGKILL)

        async def taken_over() -> bool:
            return (await values("tidings_chat_relay_leading", other) == [1]
                    and await values("tidings_chat_cluster_processes", other) == [1])

        await eventually(taken_over, 15, "the other process relays and counts itself alone")


@postgres_only
async def test_a_reply_ended_elsewhere_gets_no_more_text(start: Start) -> None:
    """A stalls (SIGSTOP) past two heartbeats while it streams a reply: B's sweep takes
    it for gone and ends the reply as failed. When A runs again and its endpoint sends
    more, A appends nothing (no delta after the end, the stored text is the one the end
    announced) and hangs up."""
    async with fake_llm() as fake, httpx.AsyncClient(timeout=10) as ops:
        fake.mode = "gated"
        args = ("--assistant-url", fake.url, "--assistant-model", "m")
        b = await start_relaying(start, ops, *args)  # it relays on while A is stopped
        a = start(*args)
        assert a.proc is not None
        async with users(a.url, "alice") as (alice,), on(alice, b) as alice_b, \
                stream(alice_b, "/chat/rooms/general") as seen:
            await alice.post("/api/rooms/general/messages",
                             json={"content": "@assistant say hello"})  # streams on A
            message_id = (await reply_created(seen))["message"]["id"]
            fake.release()
            assert (await next_of(seen, "message.delta"))["text"] == CHUNKS[0]
            a.proc.send_signal(signal.SIGSTOP)
            try:
                ended = await next_of(seen, "message.completed", timeout_s=15)
            finally:
                a.proc.send_signal(signal.SIGCONT)
            assert ended["message"]["id"] == message_id
            assert ended["message"]["assistant"]["state"] == "failed"
            assert ended["message"]["content"] == CHUNKS[0]

            fake.release()  # A's endpoint goes on: A finds the reply ended, hangs up
            await asyncio.wait_for(fake.disconnected.wait(), 10)
            history = (await alice_b.get("/api/rooms/general/messages")).json()["messages"]
            stored = next(m for m in history if m["id"] == message_id)
            assert stored == ended["message"]
            with pytest.raises(TimeoutError):
                await next_of(seen, "message.delta", timeout_s=1.0)


@postgres_only
async def test_a_stalled_relay_is_taken_over(start: Start) -> None:
    """The relaying process stops running without dying (SIGSTOP): PostgreSQL ends its
    idle session after LEADER_IDLE_LIMIT_S, so the other process relays and a message
    posted meanwhile reaches a window. Run again, the stalled one stands by; nothing is
    doubled."""
    async with httpx.AsyncClient(timeout=10) as ops:
        b = await start_relaying(start, ops)
        a = start()
        assert b.proc is not None
        async with users(a.url, "alice") as (alice,), \
                httpx.AsyncClient(base_url=a.url, cookies=alice.cookies,
                                  timeout=httpx.Timeout(10, read=60)) as window, \
                stream(window, "/chat/rooms/general") as seen:  # waits past the limit
            b.proc.send_signal(signal.SIGSTOP)
            try:
                reply = await alice.post("/api/rooms/general/messages",
                                         json={"content": "while the relay is stopped"})
                assert reply.status_code == 201, reply.text
                created = await next_of(seen, "message.created",
                                        timeout_s=LEADER_IDLE_LIMIT_S + 15)
                assert created["message"]["content"] == "while the relay is stopped"
                assert await relays(ops, a)
            finally:
                b.proc.send_signal(signal.SIGCONT)
            await eventually(lambda: relays(ops, b, 0), 15, "B runs again and stands by")
            reply = await alice.post("/api/rooms/general/messages", json={"content": "after"})
            assert reply.status_code == 201, reply.text
            assert (await next_of(seen, "message.created"))["message"]["content"] == "after"


async def start_relaying(start: Start, ops: httpx.AsyncClient, *args: str) -> HubProcess:
    """A server started (with `args`) and waited for until it relays: the first on the
    schema, so the relay stays with it while others start."""
    server = start(*args)
    await eventually(lambda: relays(ops, server), 15, "the first server relays")
    return server


async def relays(ops: httpx.AsyncClient, server: HubProcess, leading: int = 1) -> bool:
    """Whether `server`'s `/metrics` says it relays the outbox (`leading` 1) or not (0)."""
    return await metric(ops, server, "tidings_chat_relay_leading") == leading
