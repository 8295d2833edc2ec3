"""Keep a background loop going through failures of what it reads from.

The hub's fan-out, the change-feed tailers and the chat relay each read from something
that can go away for a while (a bus, a database connection). Each resumes from its own
position, so all it needs from here is: try again, not too eagerly, and say so in the log.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

__all__ = ["run_with_backoff"]

log = logging.getLogger(__name__)

FIRST_BACKOFF_S = 0.05
MAX_BACKOFF_S = 5.0


async def run_with_backoff(
    attempt: Callable[[], Awaitable[None]], *, what: str, position: Callable[[], object]
) -> None:
    """Await `attempt()` until it returns. When it raises, log `what` was interrupted and
    where (`position()`), and start it again after a jittered backoff: 50 ms, doubling up
    to 5 s, and back to 50 ms when the failed attempt had run for a while (a new failure,
    not the same one again). Only the first failure of a series is a WARNING: the attempts
    that fail while the source is still away are DEBUG lines, not one line every 5 s for
    the length of an outage."""
    backoff_s = FIRST_BACKOFF_S
    in_a_row = 0
    while True:
        began = time.monotonic()
        try:
            await attempt()
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # Stopped, and something on the way out turned the cancellation into
                # another error (or swallowed it): stop, do not retry.
                raise asyncio.CancelledError() from exc
            if time.monotonic() - began > 2 * MAX_BACKOFF_S:
                backoff_s, in_a_row = FIRST_BACKOFF_S, 0
            in_a_row += 1
            log.log(logging.WARNING if in_a_row == 1 else logging.DEBUG,
                    "%s interrupted (%s); resuming after %s in %.2f s%s", what, exc,
                    position(), backoff_s, "" if in_a_row == 1 else f" (attempt {in_a_row})")
            await asyncio.sleep(backoff_s * random.uniform(0.5, 1.5))
            backoff_s = min(backoff_s * 2, MAX_BACKOFF_S)
