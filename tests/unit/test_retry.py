"""The background loops' retry: an attempt that raises is started again, one that returns
ends the loop, and cancellation goes through."""

from __future__ import annotations

import asyncio

import pytest

from tidings.retry import run_with_backoff

pytestmark = pytest.mark.anyio


async def test_an_attempt_that_raises_is_started_again_until_one_returns() -> None:
    attempts: list[int] = []

    async def attempt() -> None:
        attempts.append(len(attempts))
        if len(attempts) < 3:
            raise ConnectionError("the bus went away")

    await asyncio.wait_for(run_with_backoff(attempt, what="test", position=lambda: 0), 5)
    assert attempts == [0, 1, 2]


async def test_cancellation_is_not_retried() -> None:
    started = asyncio.Event()

    async def attempt() -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(run_with_backoff(attempt, what="test", position=lambda: 0))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
