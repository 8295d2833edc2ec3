"""The assistant in rooms: a message that mentions `@assistant` gets a reply that streams
into the room as it is written.

    message.created    the reply, empty, `"assistant": {"state": "streaming", "asker", ...}`
    message.delta      `{"offset", "text"}`: text to put at `offset` (code points), repeated
    message.completed  the whole stored message, state `completed`, `cancelled` or `failed`
                       (with a `note` saying why)

Each delta is one commit: the text appended to the stored message and its update in the
outbox, together. So the hub's history holds every delta in order (a window that resumes
mid-reply replays them), and the stored message is, at any moment, exactly the text of the
deltas so far (a window that loads the history mid-reply gets it, then applies only the
deltas past what it has). Deltas coalesce by themselves: while one commits, the next bytes
wait in the socket, and the next read takes them all.

A reply always ends: the endpoint's errors, silence past `--assistant-timeout`, the asker's
Stop, a restart (replies still streaming at start are marked failed) and shutdown each
store a final state. No polling: one task per reply, cancelled to stop it. The first end
wins, and nothing is appended after it: a delta is written only while the reply's row
says it streams.

On several processes (`cluster.py`) the process streaming a reply claims it: a process
that starts marks failed only the streaming replies nobody claims, and the replies of a
killed process end as failed when the sweep finds it gone. Stop pressed on a window
served by another process reaches the streaming one as a message on the cluster's
channel; the stopping process waits for "ended" (or, if the owner is gone, ends the reply
itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tidings.chat.assistant import AssistantClient, AssistantConfig, AssistantFailed
from tidings.chat.errors import InvalidInput, NotAllowed, UnknownMessage
from tidings.chat.model import ASSISTANT, MAX_MESSAGE_LENGTH, Conversation, Message
from tidings.chat.store import ChatStore
from tidings.errors import ServiceUnavailable, TidingsError

if TYPE_CHECKING:
    from tidings.chat.cluster import Cluster, Expired

__all__ = ["NOT_CONFIGURED", "Replies"]

log = logging.getLogger(__name__)

NOT_CONFIGURED = ("Sorry, no assistant is configured on this server. (Whoever runs it can "
                  "start it with --assistant-url, see docs/chat.md.)")
_MAX_RUNNING = 16
_MAX_REPLY_S = 600.0
# How long Stop waits for another process to end the reply it streams.
_STOP_WAIT_S = 5.0
_CLAIM = "reply"
_SYSTEM = ("You are the assistant in the chat room #{room}. Each message from a person "
           "starts with their username and a colon. Answer briefly, in plain text.")


@dataclass(slots=True)
class _Running:
    task: asyncio.Task[None]
    asker: str
    conversation: Conversation
    cancelled_by: str | None = None


class Replies:
    def __init__(self, store: ChatStore, config: AssistantConfig | None,
                 cluster: Cluster | None = None) -> None:
        self._store = store
        self.config = config or AssistantConfig()
        self._client: AssistantClient | None = None
        self._running: dict[int, _Running] = {}
        self._cluster = cluster
        # Stops asked of other processes, waiting for their "ended".
        self._ending: dict[int, asyncio.Event] = {}
        if cluster is not None:
            cluster.on_message(self._received)
            cluster.on_expired(self._expired)

    @property
    def configured(self) -> bool:
        return bool(self.config.url)

    async def start(self) -> None:
        if self.configured:
            self._client = AssistantClient(self.config)
        streaming = await self._store.streaming_replies()
        if self._cluster is not None:  # only those no live process is streaming
            streaming = [int(i) for i in await self._cluster.claim(
                _CLAIM, [str(i) for i in streaming])]
        for message_id in streaming:
            await self._finish(message_id, "failed", "interrupted: the server restarted")

    async def stop(self) -> None:
        running = list(self._running.values())
        for reply in running:
            reply.task.cancel()
        if running:
            await asyncio.wait([reply.task for reply in running])
        if self._client is not None:
            await self._client.close()
            self._client = None

    def check_prompt(self, text: str, field: str) -> None:
        if len(text) > self.config.max_prompt:
            raise InvalidInput(field, f"a question to the assistant is at most "
                                      f"{self.config.max_prompt} characters")

    async def context(self, conversation: Conversation, before: int | None) -> list[
            dict[str, str]]:
        """The room's latest messages (before id `before`) as chat messages, oldest first."""
        history = await self._store.recent(conversation, before, self.config.history)
        messages = [{"role": "system", "content": _SYSTEM.format(room=conversation.room)}]
        for message in reversed(history):
            if message.sender == ASSISTANT:
                if message.content and (message.reply is None
                                        or message.reply.state != "unavailable"):
                    messages.append({"role": "assistant", "content": message.content})
            else:
                messages.append({"role": "user",
                                 "content": f"{message.sender}: {message.content}"})
        return messages

    # -- replies in the room -------------------------------------------------------------

    async def answer(self, asker: str, question: Message) -> Message:
        """Start the reply to `question` (returned at once, empty while it streams)."""
        conversation = question.conversation
        if self._client is None:
            return await self._store.start_reply(conversation, asker, question.id,
                                                 NOT_CONFIGURED, "unavailable")
        if len(self._running) >= _MAX_RUNNING:
            return await self._store.start_reply(
                conversation, asker, question.id, "", "failed",
                "the assistant is busy with other replies; ask again in a moment")
        message = await self._store.start_reply(conversation, asker, question.id)
        if self._cluster is not None:
            await self._cluster.claim(_CLAIM, [str(message.id)])
        task = asyncio.create_task(self._run(message, self._client),
                                   name=f"tidings-assistant-{message.id}")
        self._running[message.id] = _Running(task, asker, conversation)
        task.add_done_callback(lambda _: self._running.pop(message.id, None))
        return message

    async def _run(self, message: Message, client: AssistantClient) -> None:
        state, note = "completed", None
        offset = 0
        try:
            prompt = await self.context(message.conversation, message.id)
            async with asyncio.timeout(_MAX_REPLY_S), client.stream(prompt) as pieces:
                async for piece in pieces:
                    room = MAX_MESSAGE_LENGTH - offset
                    text = piece[:room]
                    if not await self._store.append_reply(message.id, message.conversation,
                                                          offset, text):
                        log.info("assistant: reply %s was ended elsewhere; it stops here",
                                 message.id)
                        break  # (its end is stored: the `_finish` below changes nothing)
                    offset += len(text)
                    if len(piece) >= room:
                        note = f"cut at {MAX_MESSAGE_LENGTH} characters"
                        break
        except AssistantFailed as exc:
            state, note = "failed", exc.message
        except TimeoutError:
            state, note = "failed", f"the reply took longer than {_MAX_REPLY_S:g} s"
        except asyncio.CancelledError:
            running = self._running.get(message.id)
            if running is None or running.cancelled_by is None:
                await self._finish(message.id, "failed", "the server stopped")
                raise
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            state, note = "cancelled", f"stopped by {running.cancelled_by}"
        except Exception:
            log.exception("assistant: reply %s failed", message.id)
            state, note = "failed", "the reply failed on the server"
        await self._finish(message.id, state, note)

    async def _finish(self, message_id: int, state: str, note: str | None) -> None:
        try:
            await self._store.finish_reply(message_id, state, note)
            if self._cluster is not None:
                await self._cluster.release(_CLAIM, str(message_id))
                await self._cluster.send("ended", str(message_id))
        except TidingsError as exc:  # the database went away: the next start marks it
            log.warning("assistant: could not end reply %s: %s", message_id, exc)

    # -- across processes -----------------------------------------------------------------

    def _received(self, kind: str, argument: str) -> None:
        if kind == "ended":
            event = self._ending.get(_int(argument))
            if event is not None:
                event.set()
        elif kind == "stop":
            message_id, _, user = argument.partition(" ")
            running = self._running.get(_int(message_id))
            if running is not None and running.asker == user and not running.cancelled_by:
                running.cancelled_by = user
                running.task.cancel()

    async def _expired(self, leftovers: Expired) -> None:
        for kind, item in leftovers.claims:
            if kind == _CLAIM:
                await self._finish(_int(item), "failed",
                                   "interrupted: the server writing it stopped")

    async def _stop_elsewhere(self, me: str, message: Message) -> Message:
        """Stop a reply another process streams: ask it on the cluster's channel and wait
        for it to end; if it does not in time (the process is gone or stuck), end it here
        (the first end wins)."""
        if self._cluster is None:
            return message
        ended = self._ending.setdefault(message.id, asyncio.Event())
        try:
            await self._cluster.send("stop", f"{message.id} {me}")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_STOP_WAIT_S):
                    await ended.wait()
        finally:
            self._ending.pop(message.id, None)
        return await self._store.finish_reply(message.id, "cancelled", f"stopped by {me}")

    async def cancel(self, me: str, conversation: Conversation, message_id: int) -> Message:
        """Stop a reply (its asker only); it keeps the text it has, marked cancelled. A
        reply that has ended already is returned as it is."""
        running = self._running.get(message_id)
        if running is None:
            message = await self._store.message(message_id)
            if message.conversation != conversation or message.reply is None:
                raise UnknownMessage(f"no reply {message_id} here")
            if message.reply.asker != me:
                raise NotAllowed("only the person who asked can stop this reply")
            if message.reply.state == "streaming":
                return await self._stop_elsewhere(me, message)
            return message
        if running.conversation != conversation:
            raise UnknownMessage(f"no reply {message_id} here")
        if running.asker != me:
            raise NotAllowed("only the person who asked can stop this reply")
        running.cancelled_by = me
        running.task.cancel()
        await asyncio.wait([running.task])
        # A task cancelled before it ran never stored its end: store it here (no-op else).
        return await self._store.finish_reply(message_id, "cancelled", f"stopped by {me}")

    # -- private answers ----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def private(self, me: str, conversation: Conversation,
                      prompt: str) -> AsyncIterator[AsyncIterator[str]]:
        """A reply for `me` alone (with the room's latest messages as context)."""
        if self._client is None:
            raise ServiceUnavailable("no assistant is configured on this server")
        messages = await self.context(conversation, None)
        messages.append({"role": "user", "content": f"{me}: {prompt}"})
        async with asyncio.timeout(_MAX_REPLY_S), self._client.stream(messages) as pieces:
            yield pieces


def _int(text: str) -> int:
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else -1
