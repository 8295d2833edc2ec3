"""The sinks (web/sinks.py) on fake connections: a client gone closes the subscriber
quietly; any other failure is a bug, logged as a warning, and closes it too."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest

from tidings.hub.subscriber import CloseReason, Subscriber, SubscriberLimits
from tidings.hub.topics import compile_selector
from tidings.web.sinks import AsgiSink, UvicornSink

GONE = [ConnectionResetError("reset"), OSError("gone"),
        RuntimeError("unable to perform operation on <TCPTransport closed=True>")]
BUGS = [TypeError("a bug"), KeyError("body")]


def subscriber() -> Subscriber:
    return Subscriber((compile_selector("/t"),), None, limits=SubscriberLimits(),
                      on_ready=lambda _: None)


def failing_send(exc: Exception) -> Any:
    async def send(message: object) -> None:
        raise exc

    return send


class FailingTransport:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def write(self, data: bytes) -> None:
        raise self.exc


def uvicorn_sink(exc: Exception, sub: Subscriber) -> UvicornSink:
    cycle = SimpleNamespace(transport=FailingTransport(exc), disconnected=False,
                            flow=SimpleNamespace(write_paused=False))
    return UvicornSink(cycle, failing_send(AssertionError("not called")), sub)


def asgi_sink(exc: Exception, sub: Subscriber) -> AsgiSink:
    return AsgiSink(failing_send(exc), sub)


@pytest.mark.parametrize("make", [asgi_sink, uvicorn_sink])
@pytest.mark.parametrize(("exc", "bug"), [(e, False) for e in GONE] + [(e, True) for e in BUGS],
                         ids=repr)
def test_a_failed_write_closes_the_subscriber_and_only_a_bug_is_a_warning(
    make: Any, exc: Exception, bug: bool, caplog: pytest.LogCaptureFixture,
) -> None:
    sub = subscriber()
    with caplog.at_level(logging.DEBUG, logger="tidings.web.sinks"):
        assert make(exc, sub).write(b"data: x\n\n")
    assert sub.close_reason is CloseReason.CLIENT_GONE
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    if bug:
        [warning] = warnings
        assert warning.exc_info is not None and warning.exc_info[1] is exc
    else:
        assert warnings == []
