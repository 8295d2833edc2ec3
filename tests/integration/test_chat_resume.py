"""The history's resume point: "load a page of history, then subscribe with its
`last_event_id`" sees every later update once, none the page already has, while others
post (and while the assistant's reply streams)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from tests.conftest import HubProcess, SSEStream
from tests.integration.test_assistant import (
    CHUNKS,
    FULL,
    ask,
    assistant_hub,
    fake_llm,
    reply_created,
)
from tests.integration.test_chat import next_of, stream, users

pytestmark = pytest.mark.anyio

POSTS = 150
ROUNDS = 4


async def created_ids(events: SSEStream, last_id: int, timeout_s: float = 20.0) -> list[int]:
    """The ids of message.created updates, in order, through `last_id`."""
    ids: list[int] = []
    deadline = time.monotonic() + timeout_s
    while not ids or ids[-1] < last_id:
        update = await next_of(events, "message.created",
                               timeout_s=max(0.01, deadline - time.monotonic()))
        ids.append(update["message"]["id"])
    return ids


async def test_history_then_its_resume_point_misses_and_doubles_nothing(
        chat_hubs: type[HubProcess]) -> None:
    server = chat_hubs("--chat-rate-messages", "100000").start()
    async with users(server.url, "alice", "bob", "carol") as (alice, bob, carol), \
            contextlib.AsyncExitStack() as streams:
        posted: list[int] = []
        progress = asyncio.Event()

        async def post_all() -> None:
            for i in range(POSTS):
                client = alice if i % 2 else bob
                reply = await client.post("/api/rooms/general/messages",
                                          json={"content": f"#{i}"})
                assert reply.status_code == 201, reply.text
                posted.append(reply.json()["id"])
                progress.set()

        poster = asyncio.create_task(post_all())
        # Several readers, each loading the history at another moment of the posting and
        # subscribing from its resume point while the posts go on.
        rounds: list[tuple[set[int], SSEStream]] = []
        for n in range(ROUNDS):
            while len(posted) < n * POSTS // ROUNDS and not poster.done():
                progress.clear()
                await progress.wait()
            page = (await carol.get("/api/rooms/general/messages?limit=100")).json()
            assert page["last_event_id"].startswith("chat-")
            seen = {m["id"] for m in page["messages"]}
            events = await streams.enter_async_context(
                stream(carol, "/chat/rooms/general", last_event_id=page["last_event_id"]))
            rounds.append((seen, events))
        await poster
        for seen, events in rounds:
            ids = await created_ids(events, posted[-1])
            newest = max(seen, default=0)
            assert len(ids) == len(set(ids)), "an update came twice"
            assert not set(ids) & seen, "the stream repeated what the history had"
            assert ids == [i for i in posted if i > newest], "the stream missed a message"


async def test_a_history_read_mid_reply_resumes_exactly_after_it(
        chat_hubs: type[HubProcess]) -> None:
    async with fake_llm() as fake:
        fake.mode = "gated"
        server = assistant_hub(chat_hubs, fake.url)
        async with users(server.url, "alice", "carol") as (alice, carol), \
                stream(alice, "/chat/rooms/general") as alice_sees:
            await ask(alice)
            message_id = (await reply_created(alice_sees))["message"]["id"]
            fake.release(2)
            await next_of(alice_sees, "message.delta")  # the second may come during the read
            page = (await carol.get("/api/rooms/general/messages?limit=1")).json()
            snapshot = page["messages"][0]
            assert snapshot["id"] == message_id
            assert snapshot["assistant"]["state"] == "streaming"
            text = snapshot["content"]
            assert text and FULL.startswith(text)
            async with stream(carol, "/chat/rooms/general",
                              last_event_id=page["last_event_id"]) as carol_sees:
                fake.release(len(CHUNKS) - 2)
                while True:
                    update = await next_of(carol_sees, "message.created", "message.delta",
                                           "message.completed")
                    assert update["message"]["id"] == message_id
                    if update["type"] == "message.completed":
                        break
                    assert update["type"] == "message.delta"
                    # Exactly after what the page had: no overlap, no gap.
                    assert update["offset"] == len(text), (update, text)
                    text += update["text"]
        assert text == FULL == update["message"]["content"]
