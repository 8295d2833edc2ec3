"""Stopping background tasks (tidings/tasks.py): the tasks end, and a cancellation of the
caller itself is not swallowed on the way."""

from __future__ import annotations

import asyncio

import pytest

from tidings.tasks import cancel_and_wait

pytestmark = pytest.mark.anyio


async def test_running_tasks_are_cancelled_and_waited_for() -> None:
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    tasks = [asyncio.create_task(forever()) for _ in range(3)]
    await started.wait()
    await cancel_and_wait(None, *tasks, None)
    assert all(task.cancelled() for task in tasks)


async def test_a_cancellation_of_the_caller_while_it_waits_goes_through() -> None:
    """A task that takes a while to stop (closing a connection, say): the caller is
    cancelled meanwhile, as a server stopping cancels a component's `stop()`. With
    `suppress(CancelledError)` around the wait the caller would return normally."""
    stopping = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            stopping.set()
            await asyncio.Event().wait()  # until cancelled again: by the caller's end

    task = asyncio.create_task(slow_to_stop())
    await asyncio.sleep(0)
    returned = False

    async def stop() -> None:
        nonlocal returned
        await cancel_and_wait(task)
        returned = True

    caller = asyncio.create_task(stop())
    await stopping.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert not returned
    assert task.cancelled()


async def test_an_exception_a_task_ended_with_is_raised_after_all_have_ended() -> None:
    async def fails() -> None:
        raise RuntimeError("the bus went away")

    async def forever() -> None:
        await asyncio.Event().wait()

    failed, other = asyncio.create_task(fails()), asyncio.create_task(forever())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="the bus went away"):
        await cancel_and_wait(failed, other)
    assert other.cancelled()
