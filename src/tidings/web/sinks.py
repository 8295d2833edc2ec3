"""Where a live subscriber's bytes go: the hub's `Sink`, written to an HTTP response.

Fan-out writes one joined chunk per subscriber per flush, so a sink's `write` is the hot
path of every delivery: it never switches tasks unless the connection makes it wait.
`AsgiSink` works on any ASGI server. `UvicornSink` writes to uvicorn's transport itself;
it leans on uvicorn's private response cycle, so it is contained here: `fits()` checks
every attribute it uses, pyproject.toml pins uvicorn to the versions
tests/integration/test_fast_path.py covers (and that test fails if the pinned uvicorn no
longer takes this path), and the `uvicorn_fast_path` setting switches it off.

A write that fails because the client is gone closes the subscriber as CLIENT_GONE. Any
other failure is a bug: it is logged as a warning with its traceback, then the subscriber
is closed the same way, so one broken connection never stops fan-out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from starlette.types import Send

from tidings.hub.subscriber import CloseReason, Subscriber

__all__ = ["AsgiSink", "UvicornSink", "sink_for"]

log = logging.getLogger(__name__)

# What writing to a connection whose client is gone raises: OSError for the socket and
# for ASGI servers that follow ASGI 2.4 (uvicorn's ClientDisconnected is one), and
# RuntimeError from a closed transport: uvloop's "the handler is closed" (asyncio's own
# transport drops the write silently), or uvicorn's send() after the response was ended
# under a write that was waiting for the connection to drain.
_GONE = (OSError, RuntimeError)


def _failed(subscriber: Subscriber, exc: Exception) -> None:
    if isinstance(exc, _GONE):
        log.debug("write to subscriber %s failed: %r", subscriber.id, exc)
    else:
        log.warning("write to subscriber %s failed unexpectedly", subscriber.id, exc_info=exc)
    subscriber.close(CloseReason.CLIENT_GONE)


def sink_for(send: Send, subscriber: Subscriber, *, uvicorn_fast_path: bool = True
             ) -> AsgiSink | UvicornSink:
    """The cheapest way to write this response's live chunks: straight to the socket when
    the server is uvicorn's httptools protocol (unless switched off), else through the
    ASGI `send`. A middleware's wrapper of uvicorn's `send` that only watches the
    response start (`functools.wraps`, as the chat's presence tracking does) is seen
    through."""
    if uvicorn_fast_path:
        cycle = getattr(getattr(send, "__wrapped__", send), "__self__", None)
        if UvicornSink.fits(cycle):
            return UvicornSink(cycle, send, subscriber)
    return AsgiSink(send, subscriber)


class AsgiSink:
    """Writes a chunk with the ASGI `send` without a task switch when it can.

    `send()` returns a coroutine; it is stepped right here. Under uvicorn a body write
    finishes in that first step (the bytes go to the socket buffer) unless the connection
    is paused by flow control, in which case the coroutine is resumed when the future it
    waits on completes, and the subscriber is told when it has drained. One task switch per
    delivery costs more than the write itself, so this is the hot path of fan-out.
    """

    __slots__ = ("_send", "_subscriber")

    def __init__(self, send: Send, subscriber: Subscriber) -> None:
        self._send = send
        self._subscriber = subscriber

    def write(self, chunk: bytes) -> bool:
        coroutine = self._send({"type": "http.response.body", "body": chunk, "more_body": True})
        return self._step(coroutine)  # type: ignore[arg-type]

    def _step(self, coroutine: Coroutine[Any, Any, None]) -> bool:
        try:
            waiting_on = coroutine.send(None)
        except StopIteration:
            return True
        except Exception as exc:
            _failed(self._subscriber, exc)
            return True
        if isinstance(waiting_on, asyncio.Future):
            # What asyncio.Task does with a future a coroutine yields.
            waiting_on._asyncio_future_blocking = False
            waiting_on.add_done_callback(lambda _: self._resume(coroutine))
        else:  # a bare yield (sleep(0)): try again on the next loop iteration
            asyncio.get_running_loop().call_soon(self._resume, coroutine)
        return False

    def _resume(self, coroutine: Coroutine[Any, Any, None]) -> None:
        if self._step(coroutine):
            self._subscriber.drained()


class UvicornSink:
    """Writes chunks to uvicorn's transport itself, framed as uvicorn would frame them.

    Fan-out's cost is one write per subscriber per flush, and uvicorn's `send()` around
    that write (a message dict, a coroutine, its checks) costs more than the write's own
    Python work: measured here, it is most of the CPU per delivery after the syscall.
    This is the only place that knows uvicorn's internals: the response cycle that `send`
    is bound to, with `transport`, `flow` (write paused), `disconnected` and
    `chunked_encoding`. `fits()` checks all of them, so a uvicorn that changes them gets
    the plain `AsgiSink` (tests/integration/test_fast_path.py notices that). Everything but
    live chunks (headers, replay, the end of the response) still goes through `send`, and
    whenever uvicorn would wait (writing paused by flow control) so does this sink.
    """

    __slots__ = ("_cycle", "_send", "_subscriber", "_transport")

    def __init__(self, cycle: Any, send: Send, subscriber: Subscriber) -> None:
        self._cycle = cycle
        self._transport = cycle.transport
        self._send = send
        self._subscriber = subscriber

    @staticmethod
    def fits(cycle: object) -> bool:
        return (
            type(cycle).__module__ == "uvicorn.protocols.http.httptools_impl"
            and type(cycle).__name__ == "RequestResponseCycle"
            and getattr(cycle, "chunked_encoding", None) is True
            and getattr(cycle, "response_started", None) is True
            and getattr(cycle, "response_complete", None) is False
            and isinstance(getattr(getattr(cycle, "flow", None), "write_paused", None), bool)
            and callable(getattr(getattr(cycle, "transport", None), "write", None))
        )

    def write(self, chunk: bytes) -> bool:
        cycle = self._cycle
        if cycle.flow.write_paused or cycle.disconnected:
            # uvicorn's send() waits for the drain, or sees the client gone. Made here, not
            # kept: memory per idle subscriber counts.
            return AsgiSink(self._send, self._subscriber).write(chunk)
        try:
            self._transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        except Exception as exc:
            _failed(self._subscriber, exc)
        return True
