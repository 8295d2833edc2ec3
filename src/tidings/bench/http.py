"""The subscribers' side of HTTP/1.1, sans I/O where it can be: the response head, and an
incremental decoder of a chunked body (fed whatever each read returns)."""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["ChunkedDecoder", "ChunkedError", "close", "parse_head"]


class ChunkedError(ValueError):
    """The response body is not valid HTTP/1.1 chunked encoding."""


_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class ChunkedDecoder:
    """Incremental decoder of an HTTP/1.1 ``Transfer-Encoding: chunked`` body (sans I/O).

    :meth:`feed` takes whatever bytes arrived and returns the body bytes they complete; a
    chunk-size line or CRLF cut anywhere stays buffered until the rest arrives. ``done`` turns
    true after the last (zero-size) chunk and its trailer.
    """

    __slots__ = ("_buf", "_remaining", "_state")

    MAX_LINE = 4096

    def __init__(self) -> None:
        self._buf = bytearray()
        self._remaining = 0
        self._state = _SIZE

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def feed(self, data: bytes) -> bytes:
        if self._state == _DONE:
            return b""
        if self._state == _SIZE and not self._buf:
            # Fast path: a read holding exactly one whole chunk, as each SSE frame usually is.
            eol = data.find(b"\r\n")
            if 0 < eol <= 8 and data.endswith(b"\r\n"):
                with contextlib.suppress(ValueError):
                    size = int(data[:eol], 16)
                    if size > 0 and len(data) == eol + size + 4 and data[:eol].isalnum():
                        return data[eol + 2:-2]
        buf = self._buf
        buf += data
        out = bytearray()
        pos = 0
        end_of_buf = len(buf)
        while pos < end_of_buf or self._state == _DATA_END:
            state = self._state
            if state == _DATA:
                take = min(self._remaining, end_of_buf - pos)
                out += buf[pos:pos + take]
                pos += take
                self._remaining -= take
                if self._remaining:
                    break
                self._state = _DATA_END
            elif state == _DATA_END:
                if end_of_buf - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise ChunkedError("a chunk is not followed by CRLF")
                pos += 2
                self._state = _SIZE
            else:  # _SIZE or _TRAILER: one line
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if end_of_buf - pos > self.MAX_LINE:
                        raise ChunkedError("chunk-size or trailer line too long")
                    break
                line = bytes(buf[pos:eol])
                pos = eol + 2
                if state == _TRAILER:
                    if not line:
                        self._state = _DONE
                        break
                    continue
                digits = line.split(b";", 1)[0].strip()
                try:
                    size = int(digits, 16)
                except ValueError:
                    raise ChunkedError(f"bad chunk size {digits!r}") from None
                if size < 0 or not digits.isalnum():
                    raise ChunkedError(f"bad chunk size {digits!r}")
                if size == 0:
                    self._state = _TRAILER
                else:
                    self._remaining = size
                    self._state = _DATA
        del buf[:pos]
        return bytes(out)


def parse_head(head: bytes) -> tuple[int, bool]:
    """(status, chunked) of a response head; status 0 if not a text/event-stream 200."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip().lower()
    if status == 200 and not headers.get("content-type", "").startswith("text/event-stream"):
        status = 0
    return status, "chunked" in headers.get("transfer-encoding", "")


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
