"""Requests that arrive while earlier ones run go to the database together.

A chat post on PostgreSQL is one call of a function (`chat_post`): one round trip, one
commit. Under load most of its cost is the round trip itself (a write to the database's
socket that wakes its backend, the reply, the pool), not the work. A `Batcher` sends the
first `in_flight` requests at once, each alone, and holds the ones that come while they
run; each time a batch returns, everything held (up to `most`) goes as the next one. So
an idle server adds no wait, and a busy one makes fewer, larger calls: the way a
database groups commits.

`run` answers a batch with one outcome per request, in order: a value, or the exception
that request alone gets. An exception `run` raises goes to every request of its batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["Batcher"]

Req = TypeVar("Req")
Res = TypeVar("Res")


class Batcher(Generic[Req, Res]):
    def __init__(self, run: Callable[[list[Req]], Awaitable[Sequence[Res | Exception]]],
                 *, most: int = 64, in_flight: int = 4) -> None:
        self._run = run
        self._most = most
        self._in_flight = in_flight
        self._held: list[tuple[Req, asyncio.Future[Res]]] = []
        self._running: set[asyncio.Task[None]] = set()

    async def submit(self, request: Req) -> Res:
        future: asyncio.Future[Res] = asyncio.get_running_loop().create_future()
        self._held.append((request, future))
        if len(self._running) < self._in_flight:
            task = asyncio.create_task(self._drain())
            self._running.add(task)
            task.add_done_callback(self._running.discard)
        return await future

    async def _drain(self) -> None:
        while self._held:
            batch, self._held = self._held[:self._most], self._held[self._most:]
            try:
                outcomes = await self._run([request for request, _ in batch])
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            except BaseException as exc:  # cancelled (the server stops): so are they
                for _, future in batch:
                    future.cancel()
                raise exc
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():  # its caller went away
                    continue
                if isinstance(outcome, Exception):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
