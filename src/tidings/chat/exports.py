"""Long tasks: exporting a room's history as JSON or CSV, with progress on the task's topic.

A task is a row in `chat_tasks`; each step (queued, reading page after page, writing,
completed or failed) updates the row and emits a `task.*` update in the same commit, so the
progress a page shows is never ahead of, or lost from, what the task row says. The result
is kept in the row and downloaded with the owner's session. Tasks left unfinished by a
stopped server are run again when it starts (an export is a pure function of the data).

On several processes (`cluster.py`) the process running an export claims it, so a process
that starts runs again only the unfinished tasks nobody claims, and the exports of a
process that is gone (killed, or stopped mid-export) are run again by the one that
sweeps it. The task row, its result and its progress updates are in the shared database,
so any process serves them.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import secrets
from typing import TYPE_CHECKING

from tidings.chat.model import Conversation, Message, now_iso
from tidings.chat.store import ChatStore, TaskRow
from tidings.errors import TidingsError
from tidings.tasks import cancel_and_wait

if TYPE_CHECKING:
    from tidings.chat.cluster import Cluster, Expired

__all__ = ["FORMATS", "Exports", "render"]

log = logging.getLogger(__name__)

FORMATS = ("json", "csv")
_CSV_FIELDS = ("id", "sender", "content", "created_at", "edited_at")
# Spreadsheets run cells that start with these as formulas (CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_CLAIM = "export"


def _csv_cell(value: object) -> str:
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def render(room: str, messages: list[Message], fmt: str) -> bytes:
    """The export file: JSON (the API's message objects) or CSV (one row per message,
    formula-looking cells prefixed with `'`)."""
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(_CSV_FIELDS)
        for message in messages:
            row = message.to_json()
            writer.writerow([_csv_cell(row[name]) for name in _CSV_FIELDS])
        return out.getvalue().encode("utf-8")
    document = {"room": room, "exported_at": now_iso(),
                "messages": [message.to_json() for message in messages]}
    return json.dumps(document, ensure_ascii=False, indent=1).encode("utf-8")


class Exports:
    def __init__(self, store: ChatStore, *, page_size: int = 200, concurrency: int = 2,
                 cluster: Cluster | None = None) -> None:
        self._store = store
        self._page_size = page_size
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._cluster = cluster
        if cluster is not None:
            cluster.on_expired(self._expired)

    async def start(self) -> None:
        await self._resume(await self._store.unfinished_tasks())

    async def _resume(self, task_ids: list[str]) -> None:
        if self._cluster is not None:  # only those no live process is running
            task_ids = await self._cluster.claim(_CLAIM, task_ids)
        for task_id in task_ids:
            log.info("chat export %s was interrupted: running it again", task_id)
            self._spawn(task_id)

    async def _expired(self, leftovers: Expired) -> None:
        await self._resume([item for kind, item in leftovers.claims if kind == _CLAIM])

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks)

    async def submit(self, owner: str, room: str, fmt: str) -> TaskRow:
        # The owner's name and a dot: the owner's token may read `/tasks/OWNER.{id}`.
        task_id = f"{owner}.{secrets.token_hex(8)}"
        row = await self._store.create_task(task_id, owner, room, fmt)
        if self._cluster is not None:
            await self._cluster.claim(_CLAIM, [task_id])
        self._spawn(task_id)
        return row

    def _spawn(self, task_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._run(task_id),
                                                      name=f"tidings-chat-export-{task_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, task_id: str) -> None:
        store = self._store
        try:
            async with self._slots:
                task = await store.task(task_id)
                conversation = Conversation.of_room(task.room)
                total = await store.count(conversation)
                await store.task_progress(task_id, "running", 0, f"reading {total} messages")
                messages: list[Message] = []
                after = 0
                while True:
                    page = await store.messages_after(conversation, after, self._page_size)
                    if not page:
                        break
                    messages.extend(page)
                    after = page[-1].id
                    percent = min(95, len(messages) * 95 // max(total, 1))
                    await store.task_progress(
                        task_id, "running", percent,
                        f"read {len(messages)} of {max(total, len(messages))} messages")
                await store.task_progress(task_id, "running", 97, "writing the file")
                data = await asyncio.to_thread(render, task.room, messages, task.format)
                await store.task_progress(task_id, "completed", 100, "done", result=data)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("chat export %s failed: %r", task_id, exc)
            try:
                await store.task_progress(task_id, "failed", 0, "failed", error=str(exc))
            except Exception as again:
                log.warning("chat export %s: cannot record the failure: %r", task_id, again)
        await self._release(task_id)

    async def _release(self, task_id: str) -> None:
        if self._cluster is None:
            return
        try:
            await self._cluster.release(_CLAIM, task_id)
        except TidingsError as exc:  # its process row expires, and the claim with it
            log.warning("chat export %s: cannot release its claim: %s", task_id, exc)
