"""The chat's outbox and relay on each store (a SQLite file, a PostgreSQL schema), in
process (no HTTP).

What the HTTP tests cannot time: a process that dies after committing a message but
before publishing it, and one that dies after publishing but before saving its cursor.
Both are set up here by stopping the relay at the right moment.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from tests.conftest import KEY
from tidings.chat import ChatConfig, ChatService, Conversation
from tidings.hub.auth import KeyConfig
from tidings.hub.hub import Hub
from tidings.hub.update import Update
from tidings.transports import open_transport

pytestmark = pytest.mark.anyio

GENERAL = Conversation.of_room("general")


@asynccontextmanager
async def running(url: str, *, relay: bool = True,
                  rate_messages: int = 10) -> AsyncIterator[ChatService]:
    hub = Hub(open_transport(url))
    await hub.start()
    service = ChatService(hub, ChatConfig(db_url=url, rate_messages=rate_messages),
                          KeyConfig(KEY))
    await service.start()
    if not relay:
        await service.relay.stop()
    try:
        yield service
    finally:
        await service.stop()
        await hub.stop()


async def history(service: ChatService) -> list[Update]:
    return await service.hub.transport.read_after(0, 10_000)


def created(updates: list[Update]) -> list[str]:
    out = []
    for update in updates:
        data = json.loads(update.data)
        if data["type"] == "message.created":
            out.append(data["message"]["content"])
    return out


async def wait_published(service: ChatService, count: int) -> list[Update]:
    """The hub's history once `count` messages are in it (the relay is asynchronous)."""
    import anyio

    with anyio.fail_after(5):
        while len(created(updates := await history(service))) < count:
            await anyio.sleep(0.01)
    return updates


async def outbox_emptied(service: ChatService) -> None:
    """Return once the relay dropped the rows it published (it saves after the hub's
    ack, so a moment after they are in the hub's history)."""
    import anyio

    with anyio.fail_after(5):
        while await service.store.outbox_after(0, 100):
            await anyio.sleep(0.01)


async def test_messages_committed_before_a_crash_are_published_after_it(chat_db: str) -> None:
    db = chat_db
    async with running(db, relay=False) as service:
        await service.signup("alice", "password-1")
        for text in ("one", "two", "three"):
            await service.post("alice", GENERAL, text)
        assert created(await history(service)) == []  # committed, never published
    async with running(db) as service:
        updates = await wait_published(service, 3)
        assert created(updates) == ["one", "two", "three"]
        assert all(u.private and u.id.startswith(f"chat-{service.store.epoch}-")
                   for u in updates)
        assert [u.topics for u in updates if "message" in u.data][-1] == ("/chat/rooms/general",)


async def test_a_republished_outbox_is_stored_once(chat_db: str) -> None:
    db = chat_db
    async with running(db, relay=False) as service:
        await service.signup("alice", "password-1")
        await service.post("alice", GENERAL, "one")
        await service.post("alice", GENERAL, "two")
        # A relay that published the first rows and died before saving its cursor.
        rows = await service.store.outbox_after(0, 100)
        for row in rows[:-1]:
            await service.hub.publish(Update.create(
                [row.topic], row.data, id=service.relay.update_id(row.seq), private=True))
        assert created(await history(service)) == ["one"]
    async with running(db) as service:
        updates = await wait_published(service, 2)
        assert created(updates) == ["one", "two"]
        ids = [u.id for u in updates]
        assert len(ids) == len(set(ids))
        await outbox_emptied(service)  # published: dropped


async def test_a_rolled_back_write_publishes_nothing(chat_db: str) -> None:
    from tidings.chat.errors import NotAllowed

    db = chat_db
    async with running(db) as service:
        await service.signup("alice", "password-1")
        await service.create_room("alice", "private-ish")
        await service.leave("alice", "private-ish")
        with pytest.raises(NotAllowed):
            await service.post("alice", Conversation.of_room("private-ish"), "not a member")
        await service.post("alice", GENERAL, "ok")
        updates = await wait_published(service, 1)
        assert created(updates) == ["ok"]


async def test_posts_made_at_once_are_each_stored_and_published_once(chat_db: str) -> None:
    # On PostgreSQL posts that arrive while others run go to the database together
    # (chat/batching.py): the rate limit still counts each, and each answer is its own.
    async with running(chat_db, rate_messages=5) as service:
        users = [f"user{n}" for n in range(4)]
        for user in users:
            await service.signup(user, "password-1")
        await service.signup("dora", "password-1")
        await service.leave("dora", "general")

        async def post(user: str, n: int) -> str:
            message = await service.post(user, GENERAL, f"{user} {n}")
            assert message.sender == user and message.content == f"{user} {n}"
            return message.content

        results = await asyncio.gather(*(post(user, n) for n in range(8) for user in users),
                                       post("dora", 0), return_exceptions=True)
        accepted = [r for r in results if isinstance(r, str)]
        refused = [type(r).__name__ for r in results if not isinstance(r, str)]
        for user in users:
            assert len([c for c in accepted if c.startswith(f"{user} ")]) == 5
        assert sorted(refused) == ["NotAllowed"] + ["RateLimited"] * 12
        updates = await wait_published(service, len(accepted))
        assert sorted(created(updates)) == sorted(accepted)
        ids = [json.loads(u.data)["message"]["id"] for u in updates
               if json.loads(u.data)["type"] == "message.created"]
        assert len(set(ids)) == len(ids) == 20
