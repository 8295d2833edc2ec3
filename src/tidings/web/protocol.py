"""uvicorn's httptools protocol with the limits on a request head that it lacks.

uvicorn (with httptools) takes a request head of any size, for as long as the client
cares to send it, and keeps a connection that never sends a byte: each costs a socket
and memory, and a few thousand of them (slowloris) use up `--max-subscribers`' worth of
file descriptors. Go's net/http (Mercure's server) and nginx bound both. So does this:

* a request head (request line and headers) larger than `MAX_HEAD_BYTES` is answered
  `431 Request Header Fields Too Large` and the connection closed;
* a head not complete within `--head-timeout` seconds of its first byte is answered
  `408 Request Timeout` and the connection closed;
* a new connection that sends nothing is closed after uvicorn's keep-alive timeout, as
  an idle connection between two requests already is.

Bodies are the application's to bound (`--max-body`); streams, once their head is in,
live as long as they like.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["HEAD_TIMEOUT_S", "MAX_HEAD_BYTES", "GuardedHttpToolsProtocol"]

# Go's http.DefaultMaxHeaderBytes, which Mercure's server keeps: a subscription may name
# a hundred selectors of 2 KiB each in its query, and a token rides along.
MAX_HEAD_BYTES = 1 << 20
HEAD_TIMEOUT_S = 10.0
_TOO_LARGE = b"431 Request Header Fields Too Large"
_LINGER_S = 2.0


def _reply(status: bytes) -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: " + str(len(status)).encode() + b"\r\n"
            b"connection: close\r\n\r\n" + status)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """See the module docstring. Only the head's size and time are watched here; the
    parsing, the response cycle and everything after the head are uvicorn's own.

    The guard costs (almost) nothing on the common path, a head that arrives whole in one
    read: no per-request timer and no per-header callback. One read is at most 256 KiB
    (uvloop's and asyncio's buffer), under `MAX_HEAD_BYTES`, so only a head still
    incomplete at the end of a read can grow past the limit or stall; that read arms the
    timer and starts counting. The count is whole reads (a bound: the read that ends a
    head may carry the start of its body), so a head within one read of the limit that
    also spans reads may be refused; a head of up to 512 KiB never is.
    """

    def __init__(self, *args: Any, head_timeout_s: float = HEAD_TIMEOUT_S,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timeout_s = head_timeout_s
        self._in_head = False
        self._head_bytes = 0
        self._refusal: bytes | None = None
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # What uvicorn arms after each response, armed before the first request too.
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:
            return  # refused: read and dropped until the client closes (see _refuse)
        continued = self._in_head
        if continued:  # more of a head: counted before the parser buffers it
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(_TOO_LARGE)
                return
        super().data_received(data)
        if not self._in_head or self.transport.is_closing():
            return
        # A head still incomplete after this read: the rest of it has `head_timeout_s`.
        if not continued:  # it began in this read: this read's bytes bound its size
            self._head_bytes += len(data)
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self._head_timeout_s, self._refuse,
                                                    b"408 Request Timeout")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._head_timer is not None:
            self._stop_head_timer()
        super().on_headers_complete()

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _refuse(self, status: bytes) -> None:
        """Answer `status` and close, lingering: the client may still be sending, and
        closing with its bytes unread would reset the connection and lose the answer. So
        the answer goes out with a FIN, and what arrives after it is dropped until the
        client closes, or for `_LINGER_S` at most."""
        self._in_head = False
        self._refusal = status
        self._stop_head_timer()
        if self.transport.is_closing():
            return
        self.logger.info("closing a connection: %s", status.decode())
        if self.cycle is not None and not self.cycle.response_complete:
            # A request pipelined behind a response still being sent (a stream): an
            # answer now would land inside that response.
            self.transport.close()
            return
        self.transport.write(_reply(status))
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(_LINGER_S, self.transport.close)
        else:
            self.transport.close()
