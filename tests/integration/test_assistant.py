"""The assistant in the chat, over real HTTP: a real `tidings serve` talking to a stand-in
OpenAI-compatible endpoint that this test runs on 127.0.0.1 (a free port).

The stand-in streams `data: {"choices":[{"delta":{"content":...}}]}` chunks, then
`data: [DONE]`. Its modes: `ok`, `gated` (each chunk waits for the test to release it, so
"mid-reply" is a state the test chooses, not a sleep), `malformed`, `500`, `hang` (reads
the request and never answers). Waits are on events with deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.conftest import HubProcess, SSEStream
from tests.integration.feed_backends import eventually
from tests.integration.test_chat import next_of, signup, stream, users
from tidings.sse import Event, EventParser

pytestmark = pytest.mark.anyio

CHUNKS = ["Hel", "lo", ", wörld", " 🌍", "!"]
FULL = "".join(CHUNKS)


class FakeLLM:
    def __init__(self) -> None:
        self.mode = "ok"
        self.requests: list[dict[str, Any]] = []
        self.gate = asyncio.Semaphore(0)
        self.disconnected = asyncio.Event()
        self.url = ""
        self._tasks: set[asyncio.Task[Any]] = set()

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self.gate.release()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        eof: asyncio.Task[bytes] | None = None
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            lines = head.split("\r\n")
            headers = {k.lower(): v for k, v in
                       (line.split(": ", 1) for line in lines[1:] if ": " in line)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            self.requests.append({"path": lines[0].split()[1], "headers": headers,
                                  "json": json.loads(body)})
            mode = self.mode
            eof = asyncio.ensure_future(reader.read())
            if mode == "hang":
                await eof
                return
            if mode == "500":
                writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n"
                             b"Connection: close\r\n\r\noops")
                await writer.drain()
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Connection: close\r\n\r\n")
            writer.write(b'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n')
            for i, piece in enumerate(CHUNKS):
                if mode == "gated":
                    acquire = asyncio.ensure_future(self.gate.acquire())
                    done, _ = await asyncio.wait({acquire, eof},
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if eof in done:
                        acquire.cancel()
                        self.disconnected.set()
                        return
                if mode == "malformed" and i == 2:
                    writer.write(b"data: {not json\n\n")
                    await writer.drain()
                    await eof
                    return
                chunk = {"choices": [{"delta": {"content": piece}, "index": 0}]}
                writer.write(f"data: {json.dumps(chunk)}\n\n".encode())
                await writer.drain()
            writer.write(b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n'
                         b"data: [DONE]\n\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            self.disconnected.set()
        finally:
            if eof is not None:
                eof.cancel()
            writer.close()
            self._tasks.discard(task)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()


@contextlib.asynccontextmanager
async def fake_llm() -> AsyncIterator[FakeLLM]:
    fake = FakeLLM()
    server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    fake.url = f"http://127.0.0.1:{port}"
    try:
        yield fake
    finally:
        await fake.stop()
        server.close()


def apply(text: str, offset: int, piece: str) -> str:
    """What the page does with a delta: keep only what it does not have yet."""
    assert offset <= len(text), "a gap: deltas must arrive in order"
    return text + piece[len(text) - offset:] if offset + len(piece) > len(text) else text


async def ask(client: httpx.AsyncClient, content: str = "@assistant say hello") -> None:
    reply = await client.post("/api/rooms/general/messages", json={"content": content})
    assert reply.status_code == 201, reply.text


async def reply_created(events: SSEStream) -> dict[str, Any]:
    """The next message.created from the assistant (skipping the question)."""
    while True:
        created = await next_of(events, "message.created")
        if created["message"]["sender"] == "assistant":
            return created


async def read_reply(events: SSEStream, message_id: int,
                     text: str = "") -> tuple[str, dict[str, Any]]:
    """Apply deltas until message.completed; returns the text and the completed message."""
    while True:
        update = await next_of(events, "message.delta", "message.completed")
        assert update["message"]["id"] == message_id
        if update["type"] == "message.completed":
            return text, update["message"]
        text = apply(text, update["offset"], update["text"])


async def no_message_within(events: SSEStream, seconds: float) -> None:
    """No message.* update for `seconds` (presence updates may come and go)."""
    with pytest.raises(TimeoutError):
        await next_of(events, "message.created", "message.delta", "message.completed",
                      timeout_s=seconds)


def assistant_hub(chat_hubs: type[HubProcess], url: str, *args: str) -> HubProcess:
    return chat_hubs("--assistant-url", url, "--assistant-model", "test-model",
                       "--assistant-key", "sk-test", *args).start()


@contextlib.asynccontextmanager
async def assistant_server(chat_hubs: type[HubProcess], *args: str, mode: str = "ok",
                           ) -> AsyncIterator[tuple[FakeLLM, HubProcess]]:
    """The stand-in endpoint, answering in `mode`, and a hub whose assistant talks to it."""
    async with fake_llm() as fake:
        fake.mode = mode
        yield fake, assistant_hub(chat_hubs, fake.url, *args)


# -- the room sees the reply grow -----------------------------------------------------------


async def test_the_room_sees_created_deltas_completed(chat_hubs: type[HubProcess]) -> None:
    async with assistant_server(chat_hubs, mode="gated") as (fake, server):
        async with users(server.url, "alice", "bob") as (alice, bob), \
                stream(bob, "/chat/rooms/general") as bob_sees:
            await ask(bob, "earlier words")
            await ask(alice)
            created = await reply_created(bob_sees)
            message = created["message"]
            assert message["content"] == ""
            assert message["assistant"]["state"] == "streaming"
            assert message["assistant"]["asker"] == "alice"
            text = ""
            for i, piece in enumerate(CHUNKS):
                fake.release()
                delta = await next_of(bob_sees, "message.delta")
                assert (delta["offset"], delta["text"]) == (len(text), piece), i
                text += piece
            completed = await next_of(bob_sees, "message.completed")
            assert completed["message"]["content"] == FULL == text
            assert completed["message"]["assistant"]["state"] == "completed"
            stored = (await bob.get("/api/rooms/general/messages?limit=1")).json()["messages"]
            assert stored == [completed["message"]]

        request = fake.requests[0]
        assert request["path"] == "/v1/chat/completions"
        assert request["headers"]["authorization"] == "Bearer sk-test"
        assert request["json"]["stream"] is True
        assert request["json"]["model"] == "test-model"
        messages = request["json"]["messages"]
        assert messages[0]["role"] == "system"
        assert messages[-2:] == [{"role": "user", "content": "bob: earlier words"},
                                 {"role": "user", "content": "alice: @assistant say hello"}]


async def test_a_window_that_connects_mid_reply_catches_up(
        chat_hubs: type[HubProcess]) -> None:
    async with assistant_server(chat_hubs, mode="gated") as (fake, server):
        async with users(server.url, "alice", "bob", "carol") as (alice, bob, carol), \
                stream(alice, "/chat/rooms/general") as alice_sees:
            await ask(alice)
            message_id = (await reply_created(alice_sees))["message"]["id"]
            fake.release()  # one chunk at a time (released together, they may coalesce)
            first = await next_of(alice_sees, "message.delta")
            fake.release()
            second = await next_of(alice_sees, "message.delta")
            assert first["text"] + second["text"] == "Hello"

            # The history has the partial reply, consistent with the deltas so far.
            page = (await carol.get("/api/rooms/general/messages?limit=1")).json()
            snapshot = page["messages"][0]
            assert (snapshot["id"], snapshot["content"]) == (message_id, "Hello")
            assert snapshot["assistant"]["state"] == "streaming"

            async with stream(bob, "/chat/rooms/general", last_event_id="earliest") as bob_sees, \
                    stream(carol, "/chat/rooms/general",
                           last_event_id=first["_id"]) as carol_sees:
                # bob replays everything: the reply's creation, then every delta in order.
                assert (await reply_created(bob_sees))["message"]["id"] == message_id
                fake.release(len(CHUNKS) - 2)
                bob_text, bob_final = await read_reply(bob_sees, message_id)
                # carol resumes after the first delta, on top of her (newer) snapshot: the
                # replayed second delta overlaps it and changes nothing.
                carol_text, carol_final = await read_reply(carol_sees, message_id,
                                                           snapshot["content"])
                alice_text, _ = await read_reply(alice_sees, message_id, "Hello")
        assert bob_text == carol_text == alice_text == FULL
        assert bob_final["content"] == carol_final["content"] == FULL


# -- ending a reply: stop, timeout, failures ------------------------------------------------


async def test_the_asker_can_stop_a_reply(chat_hubs: type[HubProcess]) -> None:
    async with assistant_server(chat_hubs, mode="gated") as (fake, server):
        async with users(server.url, "alice", "bob") as (alice, bob), \
                stream(bob, "/chat/rooms/general") as bob_sees:
            await ask(alice)
            message_id = (await reply_created(bob_sees))["message"]["id"]
            fake.release()
            await next_of(bob_sees, "message.delta")
            cancel = f"/api/rooms/general/assistant/{message_id}/cancel"
            assert (await bob.post(cancel)).status_code == 403
            assert (await alice.post("/api/rooms/general/assistant/999999/cancel")
                    ).status_code == 404
            stopped = await alice.post(cancel)
            assert stopped.status_code == 200, stopped.text
            assert stopped.json()["content"] == CHUNKS[0]
            assert stopped.json()["assistant"]["state"] == "cancelled"
            completed = await next_of(bob_sees, "message.completed")
            assert completed["message"] == stopped.json()
            await asyncio.wait_for(fake.disconnected.wait(), 5)  # the endpoint was hung up
            again = await alice.post(cancel)  # idempotent: the reply as it ended
            assert again.status_code == 200 and again.json() == stopped.json()
            await no_message_within(bob_sees, 0.3)


async def test_failures_end_the_reply_with_a_note(chat_hubs: type[HubProcess]) -> None:
    async with assistant_server(chat_hubs, "--assistant-timeout", "0.5") as (fake, server):
        async with users(server.url, "alice") as (alice,), \
                stream(alice, "/chat/rooms/general") as sees:
            for mode, content, note in (("500", "", "HTTP 500"),
                                        ("malformed", "Hello", "malformed"),
                                        ("hang", "", "did not answer within 0.5 s")):
                fake.mode = mode
                await ask(alice)
                message_id = (await reply_created(sees))["message"]["id"]
                text, final = await read_reply(sees, message_id)
                assert final["assistant"]["state"] == "failed", mode
                assert note in final["assistant"]["note"], (mode, final)
                assert final["content"] == text == content, mode


async def test_an_unreachable_endpoint(chat_hubs: type[HubProcess]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = assistant_hub(chat_hubs, f"http://127.0.0.1:{port}")
    async with users(server.url, "alice") as (alice,), \
            stream(alice, "/chat/rooms/general") as sees:
        await ask(alice)
        message_id = (await reply_created(sees))["message"]["id"]
        _, final = await read_reply(sees, message_id)
        assert final["assistant"] == {"asker": "alice", "reply_to": message_id - 1,
                                      "state": "failed",
                                      "note": "the assistant's endpoint could not be reached"}


async def test_a_restart_ends_a_reply_that_was_streaming(
        chat_hubs: type[HubProcess]) -> None:
    async with assistant_server(chat_hubs, mode="gated") as (fake, server):
        async with users(server.url, "alice") as (alice,), \
                stream(alice, "/chat/rooms/general") as sees:
            await ask(alice)
            message_id = (await reply_created(sees))["message"]["id"]
            fake.release()
            await next_of(sees, "message.delta")
        server.stop(signal.SIGKILL)
        # On SQLite the new process ends it at start; on PostgreSQL (several processes)
        # the reply is the killed process's until its heartbeat expires (`--chat-heartbeat`
        # 0.5: within a second or two), then the sweep ends it.
        again = assistant_hub(chat_hubs, fake.url, "--chat-heartbeat", "0.5")
        async with httpx.AsyncClient(base_url=again.url, timeout=10) as client:
            login = await client.post("/api/auth/login", json={
                "username": "alice", "password": "correct horse battery"})
            assert login.status_code == 200
            latest: list[dict[str, Any]] = []

            async def ended() -> bool:
                latest[:] = (await client.get("/api/rooms/general/messages?limit=1")
                             ).json()["messages"]
                return latest[0]["assistant"]["state"] != "streaming"

            await eventually(ended)
        message = latest[0]
        assert message["id"] == message_id and message["content"] == CHUNKS[0]
        assert message["assistant"]["state"] == "failed"
        assert "interrupted" in message["assistant"]["note"]


# -- no endpoint, limits --------------------------------------------------------------------


async def test_without_an_endpoint_it_says_so_once(chat_hubs: type[HubProcess]) -> None:
    server = chat_hubs().start()
    async with users(server.url, "alice") as (alice,), \
            stream(alice, "/chat/rooms/general") as sees:
        await ask(alice)
        created = await reply_created(sees)
        assert "no assistant is configured" in created["message"]["content"]
        assert created["message"]["assistant"]["state"] == "unavailable"
        await no_message_within(sees, 0.3)
        private = await alice.post("/api/rooms/general/assistant", json={"prompt": "hi"})
        assert private.status_code == 503
    # Nobody can sign up as the assistant.
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        taken = await client.post("/api/auth/signup", json={
            "username": "Assistant", "password": "correct horse battery"})
        assert taken.status_code == 409


async def test_a_prompt_too_large_is_refused(chat_hubs: type[HubProcess]) -> None:
    async with assistant_server(chat_hubs, "--assistant-max-prompt", "50") as (fake, server):
        async with users(server.url, "alice") as (alice,):
            long = "@assistant " + "x" * 60
            refused = await alice.post("/api/rooms/general/messages", json={"content": long})
            assert refused.status_code == 422 and refused.json()["field"] == "content"
            history = (await alice.get("/api/rooms/general/messages")).json()["messages"]
            assert history == []
            # Without the mention it is an ordinary message.
            assert (await alice.post("/api/rooms/general/messages",
                                     json={"content": "x" * 60})).status_code == 201
            private = await alice.post("/api/rooms/general/assistant",
                                       json={"prompt": "x" * 60})
            assert private.status_code == 422 and private.json()["field"] == "prompt"
        assert fake.requests == []


# -- a private answer -----------------------------------------------------------------------


async def post_stream(client: httpx.AsyncClient, prompt: str,
                      fake: FakeLLM | None = None) -> list[Event]:
    """The events of a private answer; with `fake` (gated), each chunk is released only
    once the previous one has arrived, so each is seen as it comes."""
    async with client.stream("POST", "/api/rooms/general/assistant",
                             json={"prompt": prompt}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        parser = EventParser()
        events: list[Event] = []
        if fake is not None:
            fake.release()
        async for chunk in response.aiter_raw():
            new = parser.feed(chunk)
            events.extend(new)
            if fake is not None and new:
                fake.release()
        return events


async def test_a_private_answer_streams_to_the_caller_only(
        chat_hubs: type[HubProcess]) -> None:
    async with assistant_server(chat_hubs) as (fake, server):
        async with users(server.url, "alice", "bob") as (alice, bob), \
                stream(bob, "/chat/rooms/general") as bob_sees:
            fake.mode = "gated"
            events = await post_stream(alice, "what is 2+2?", fake)
            assert [e.event for e in events] == ["delta"] * len(CHUNKS) + ["done"]
            assert [json.loads(e.data)["text"] for e in events[:-1]] == CHUNKS
            assert json.loads(events[-1].data) == {"text": FULL}
            assert fake.requests[0]["json"]["messages"][-1] == {
                "role": "user", "content": "alice: what is 2+2?"}
            await no_message_within(bob_sees, 0.3)
            assert (await bob.get("/api/rooms/general/messages")).json()["messages"] == []

            fake.mode = "500"
            failed = await post_stream(alice, "again")
            assert [e.event for e in failed] == ["error"]
            assert "HTTP 500" in json.loads(failed[0].data)["error"]

        async with httpx.AsyncClient(base_url=server.url, timeout=10) as anonymous:
            assert (await anonymous.post("/api/rooms/general/assistant",
                                         json={"prompt": "hi"})).status_code == 401
        outsider = await signup(server.url, "carol")
        try:
            assert (await outsider.post("/api/rooms/nope/assistant",
                                        json={"prompt": "hi"})).status_code == 404
        finally:
            await outsider.aclose()


async def test_a_caller_who_leaves_a_private_answer_hangs_up_the_endpoint(
        chat_hubs: type[HubProcess]) -> None:
    async with assistant_server(chat_hubs) as (fake, server):
        async with users(server.url, "alice") as (alice,):
            fake.mode = "gated"
            async with alice.stream("POST", "/api/rooms/general/assistant",
                                    json={"prompt": "a long story"}) as response:
                assert response.status_code == 200
                fake.release()
                parser = EventParser()
                async for chunk in response.aiter_raw():
                    if parser.feed(chunk):
                        break  # the first delta is in: leave mid-reply
            await asyncio.wait_for(fake.disconnected.wait(), 5)  # the endpoint was hung up
            assert len(fake.requests) == 1
            # The server is fine: the next question is answered in full.
            fake.mode = "ok"
            events = await post_stream(alice, "again")
            assert [e.event for e in events][-1] == "done"
