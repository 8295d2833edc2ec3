"""`AssistantStream` without a server: fake ASGI `receive`/`send` and a fake reply, so each
way a private answer ends is a state the test builds, not a race it waits out."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from types import TracebackType

import pytest
from starlette.background import BackgroundTask
from starlette.types import Message, Scope

from tidings.errors import ServiceUnavailable, TidingsError
from tidings.sse import EventParser
from tidings.web.assistant_stream import AssistantStream

pytestmark = pytest.mark.anyio


class Reply:
    """Hands out `pieces`, then ends, fails with `fail`, or (`hang`) waits forever; records
    how many tasks were alive while it streamed and how its context ended."""

    def __init__(self, *pieces: str, fail: TidingsError | None = None,
                 hang: bool = False) -> None:
        self.pieces = pieces
        self.fail = fail
        self.hang = hang
        self.hanging = asyncio.Event()
        self.tasks_alive: set[int] = set()
        self.ended_by: type[BaseException] | str | None = "still open"

    async def __aenter__(self) -> AsyncIterator[str]:
        return self._pieces()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.ended_by = exc_type

    async def _pieces(self) -> AsyncIterator[str]:
        for piece in self.pieces:
            self.tasks_alive.add(len(asyncio.all_tasks()))
            yield piece
        if self.fail is not None:
            raise self.fail
        if self.hang:
            self.hanging.set()
            await asyncio.Event().wait()


def scope(spec_version: str) -> Scope:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}}


def events(sent: list[Message]) -> list[tuple[str, dict[str, object]]]:
    parser = EventParser()
    out = []
    for message in sent:
        if message["type"] == "http.response.body":
            out += [(e.event, json.loads(e.data)) for e in parser.feed(message["body"])]
    return out


async def never() -> Message:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
async def test_deltas_then_done_as_a_starlette_response(spec_version: str) -> None:
    background: list[str] = []
    reply = Reply("Hel", "lo")
    response = AssistantStream(reply, BackgroundTask(background.append, "ran"))
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert "content-length" not in response.headers
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    before = len(asyncio.all_tasks())
    await response(scope(spec_version), never, send)
    assert sent[0] == {"type": "http.response.start", "status": 200,
                       "headers": response.raw_headers}
    assert events(sent) == [("delta", {"text": "Hel"}), ("delta", {"text": "lo"}),
                            ("done", {"text": "Hello"})]
    assert sent[-1]["more_body"] is False
    assert reply.ended_by is None and background == ["ran"]
    # One listener task before ASGI 2.4 (the server drops sends to a gone client
    # silently), none from 2.4 on; gone once the response is.
    assert reply.tasks_alive == {before + (spec_version == "2.3")}
    assert len(asyncio.all_tasks()) == before


async def test_a_failed_reply_ends_with_an_error_event_and_what_came_before() -> None:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await AssistantStream(Reply("a", fail=ServiceUnavailable("upstream down")))(
        scope("2.3"), never, send)
    assert events(sent)[-1] == ("error", {"error": "upstream down", "text": "a"})


async def test_from_asgi_2_4_a_failed_send_unwinds_the_reply_in_its_own_task() -> None:
    reply = Reply("a", "b", "c")
    sent: list[Message] = []

    async def send(message: Message) -> None:
        if len(sent) == 2:  # the start and one delta went out; then the caller is gone
            raise OSError("the client went away")
        sent.append(message)

    before = len(asyncio.all_tasks())
    await AssistantStream(reply)(scope("2.4"), never, send)
    assert events(sent) == [("delta", {"text": "a"})]
    assert reply.ended_by is not None and reply.ended_by != "still open"
    assert reply.tasks_alive == {before}


async def test_before_asgi_2_4_a_disconnect_cancels_the_reply_through_one_listener() -> None:
    reply = Reply("a", hang=True)
    task = asyncio.current_task()
    assert task is not None

    async def send(message: Message) -> None:
        pass  # uvicorn (spec 2.3) drops sends to a gone client without a word

    async def receive() -> Message:
        await reply.hanging.wait()
        return {"type": "http.disconnect"}

    background: list[str] = []
    before = len(asyncio.all_tasks())
    async with asyncio.timeout(5):
        await AssistantStream(reply, BackgroundTask(background.append, "ran"))(
            scope("2.3"), receive, send)
    assert reply.ended_by is asyncio.CancelledError and background == []
    assert reply.tasks_alive == {before + 1}
    assert task.cancelling() == 0  # the task group's cancellation is spent, not left over
    assert len(asyncio.all_tasks()) == before


async def test_a_cancellation_from_outside_is_not_swallowed() -> None:
    reply = Reply("a", hang=True)

    async def send(message: Message) -> None:
        pass

    before = len(asyncio.all_tasks())
    streaming = asyncio.create_task(AssistantStream(reply)(scope("2.3"), never, send))
    await reply.hanging.wait()
    streaming.cancel()  # the server shutting down
    with pytest.raises(asyncio.CancelledError):
        await streaming
    assert reply.ended_by is asyncio.CancelledError
    assert len(asyncio.all_tasks()) == before  # the task group ended the listener too
