"""The background loops' retry: an attempt that raises is started again, one that returns
ends the loop, and cancellation goes through."""

from __future__ import annotations

import asyncio
import logging

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


async def test_a_cancellation_swallowed_on_the_way_out_still_stops_the_loop() -> None:
    """A stop that arrives while a failed attempt cleans up (closing a connection that
    catches the cancellation and aborts) leaves the attempt's own error propagating: the
    loop must end, not retry forever with nobody left to cancel it again."""
    cleaning_up = asyncio.Event()
    attempts: list[int] = []

    async def attempt() -> None:
        attempts.append(len(attempts))
        if len(attempts) > 1:
            return  # a retry: the loop ends without the cancellation
        try:
            raise ConnectionError("the hub is shutting down")
        finally:
            try:
                cleaning_up.set()
                await asyncio.Event().wait()  # a close that waits for the server
            except asyncio.CancelledError:
                pass  # aborted instead, the cancellation lost

    task = asyncio.create_task(run_with_backoff(attempt, what="test", position=lambda: 0))
    await cleaning_up.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert attempts == [0]


async def test_an_outage_is_one_warning_and_the_retries_are_debug(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tidings.retry.FIRST_BACKOFF_S", 0.0)
    attempts: list[int] = []

    async def attempt() -> None:
        attempts.append(len(attempts))
        if len(attempts) < 5:
            raise ConnectionError("the bus went away")

    caplog.set_level(logging.DEBUG, logger="tidings.retry")
    await asyncio.wait_for(run_with_backoff(attempt, what="fan-out", position=lambda: 7), 5)
    levels = [record.levelno for record in caplog.records]
    assert levels == [logging.WARNING] + [logging.DEBUG] * 3
    assert caplog.records[0].getMessage().startswith(
        "fan-out interrupted (the bus went away); resuming after 7 in")
    assert caplog.records[-1].getMessage().endswith("(attempt 4)")
