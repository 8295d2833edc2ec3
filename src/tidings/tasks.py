"""Stopping background tasks.

`task.cancel()` followed by `with suppress(CancelledError): await task` is the usual way
to stop a task, and it has a flaw: when the caller itself is cancelled while it waits (a
server stopping while a component stops), the suppress swallows the caller's
cancellation too, and the caller carries on as if nothing had asked it to end.
`cancel_and_wait` tells the two apart (`Task.cancelling`, Python 3.11).
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["cancel_and_wait"]


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None) -> None:
    """Cancel each task (None: nothing to stop) and wait until all have ended.

    A task's own cancellation is what was asked for and ends quietly; an exception the task
    ended with is raised, after the others have been waited for too. A cancellation of the
    caller while it waits is raised at once."""
    running = [task for task in tasks if task is not None]
    for task in running:
        task.cancel()
    failure: BaseException | None = None
    for task in running:
        try:
            await task
        except asyncio.CancelledError:
            caller = asyncio.current_task()
            if caller is not None and caller.cancelling():
                raise
        except Exception as exc:
            failure = failure or exc
    if failure is not None:
        raise failure
