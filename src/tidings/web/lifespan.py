"""The app's lifespan: start the hub and the services that publish through it, run, then
stop them in reverse order, each one even when another failed to stop.

Two process-wide settings belong here because they must follow startup: streams end on
SIGTERM/SIGINT (the server's handlers exist only once it runs the lifespan), and the
cyclic GC stops walking what startup built (see `_freeze_startup_objects`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from types import FrameType
from typing import Any, Protocol

from tidings.hub.hub import Hub

__all__ = ["Service", "lifespan"]


class Service(Protocol):
    """Something that runs beside the hub for the app's life (a change feed, the chat)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def lifespan(
    hub: Hub, *services: Service | None,
) -> Callable[[object], AbstractAsyncContextManager[None]]:
    """Starlette's `lifespan=`: the hub first, then each service that is not None."""

    @contextlib.asynccontextmanager
    async def run(app: object) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as running:
            for part in (hub, *services):
                if part is not None:
                    await part.start()
                    running.push_async_callback(part.stop)
            _end_streams_on_signals(hub)
            _freeze_startup_objects()
            yield

    return run


def _end_streams_on_signals(hub: Hub) -> None:
    """On SIGTERM/SIGINT, end every stream, then let the server's own handler run.

    SSE streams never end by themselves, so a server's graceful shutdown would wait for
    them until its timeout. The server (uvicorn, in each worker process too) has installed
    its handlers before the lifespan starts; ours wraps them and is dropped when the server
    restores the original handlers on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        return  # signals are only delivered to the main thread
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)

        def handler(signum: int, frame: FrameType | None, previous: Any = previous) -> None:
            loop.call_soon_threadsafe(hub.begin_shutdown)
            if callable(previous):
                previous(signum, frame)

        signal.signal(sig, handler)


def _freeze_startup_objects() -> None:
    """Everything imported and built so far lives as long as the process. Keeping it out
    of the cyclic GC's sight makes a full collection (which otherwise stalls every stream
    for tens of milliseconds) walk only what connections allocate."""
    gc.collect()
    gc.freeze()
