"""Sans-I/O codec for Server-Sent Events (``text/event-stream``).

The encoder turns one update into the bytes of one SSE frame; the parser is fed raw bytes as
they arrive and returns the events completed so far, following the WHATWG HTML "Interpreting an
event stream" algorithm. Like h11, nothing here touches sockets or an event loop, so both halves
can be driven from any transport and tested byte by byte.
"""

from __future__ import annotations

from dataclasses import dataclass

from tidings.errors import BadRequest, SSEProtocolError

__all__ = ["HEARTBEAT", "Event", "EventParser", "encode_comment", "encode_event"]

_BOM = b"\xef\xbb\xbf"


def _check_field(name: str, value: str) -> None:
    # A line break would end the field early and let the value inject extra fields or a
    # premature dispatch; a NUL in an id is silently dropped by conforming parsers.
    if "\n" in value or "\r" in value or "\0" in value:
        raise BadRequest(f"SSE {name} must not contain CR, LF or NUL: {value!r}")


def encode_event(
    data: str,
    *,
    id: str | None = None,
    event: str | None = None,
    retry: int | None = None,
) -> bytes:
    """Encode one event as a complete UTF-8 frame, terminated by a blank line.

    ``data`` is split on CRLF, CR and LF (and nothing else) into one ``data:`` line each, so
    empty lines survive. Raises :class:`BadRequest` for an ``id``/``event`` containing CR, LF or
    NUL, a negative ``retry``, or text that cannot be encoded as UTF-8 (lone surrogates).
    """
    parts: list[str] = []
    if id:
        _check_field("id", id)
        parts.append(f"id: {id}\n")
    if event:
        _check_field("event", event)
        parts.append(f"event: {event}\n")
    if retry is not None:
        if retry < 0:
            raise BadRequest(f"SSE retry must be a non-negative integer: {retry!r}")
        # ``:d`` so that a bool slipping through is written as digits, never as "True".
        parts.append(f"retry: {retry:d}\n")
    # Skip the two scans of the common CR-free payload; str.splitlines() is not an option
    # because it also breaks on VT, FF, NEL, U+2028 and friends, which SSE treats as text.
    if "\r" in data:
        data = data.replace("\r\n", "\n").replace("\r", "\n")
    parts.append("data: ")
    parts.append(data.replace("\n", "\ndata: "))
    parts.append("\n\n")
    try:
        return "".join(parts).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadRequest(f"SSE event is not encodable as UTF-8: {exc.reason}") from None


def encode_comment(text: str = "") -> bytes:
    """Encode a comment frame (``:text`` plus a blank line); clients ignore it.

    Raises :class:`BadRequest` if ``text`` contains CR or LF, which would end the comment
    and turn the rest into fields.
    """
    if "\n" in text or "\r" in text:
        raise BadRequest(f"SSE comment must not contain CR or LF: {text!r}")
    try:
        return b":" + text.encode("utf-8") + b"\n\n"
    except UnicodeEncodeError as exc:
        raise BadRequest(f"SSE comment is not encodable as UTF-8: {exc.reason}") from None


HEARTBEAT: bytes = encode_comment()
"""The smallest frame that keeps proxies from timing out an idle stream."""


@dataclass(frozen=True, slots=True)
class Event:
    """One dispatched event.

    ``id`` is the stream's last-event-id buffer at dispatch time, which persists across events
    until the server changes it (``None`` while it is empty). ``retry`` is the valid ``retry``
    value seen in this event's block, if any.
    """

    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None


class EventParser:
    """Incremental ``text/event-stream`` parser.

    Call :meth:`feed` with each chunk as it arrives; it returns the events completed by that
    chunk. Partial lines (including a UTF-8 sequence cut in half) are buffered until their line
    end arrives, and an event that is never terminated by a blank line is never emitted.

    Memory is bounded: if the bytes of the current event's data lines plus the line being
    assembled exceed ``max_event_bytes``, :class:`SSEProtocolError` is raised and the parser
    refuses any further input.
    """

    __slots__ = (
        "_at_start",
        "_broken",
        "_comments",
        "_data",
        "_data_size",
        "_event_retry",
        "_event_type",
        "_last_event_id",
        "_max",
        "_pending",
        "_retry",
        "_skip_lf",
    )

    def __init__(self, max_event_bytes: int = 1 << 20) -> None:
        if max_event_bytes <= 0:
            raise ValueError(f"max_event_bytes must be positive: {max_event_bytes!r}")
        self._max = max_event_bytes
        # Bytes of the line not yet terminated; never contains CR or LF.
        self._pending = bytearray()
        # Until the first three bytes are known, a BOM may still be arriving piecewise.
        self._at_start = True
        # A CR ended the previous chunk: an LF opening the next one belongs to the same CRLF.
        self._skip_lf = False
        self._broken = False
        self._data: list[str] = []
        self._data_size = 0
        self._event_type = ""
        self._event_retry: int | None = None
        self._last_event_id = ""
        self._retry: int | None = None
        self._comments = 0

    @property
    def last_event_id(self) -> str:
        """The last-event-id buffer; what a reconnecting client sends as ``Last-Event-ID``."""
        return self._last_event_id

    @property
    def retry(self) -> int | None:
        """The last valid ``retry`` value seen anywhere in the stream, in milliseconds."""
        return self._retry

    @property
    def comments(self) -> int:
        """How many comment lines (typically heartbeats) have been seen."""
        return self._comments

    def feed(self, data: bytes) -> list[Event]:
        """Consume the next chunk of the stream and return the events it completes."""
        if self._broken:
            raise SSEProtocolError("SSE parser already failed; start a new stream")
        chunk = bytes(data)
        if self._at_start:
            self._pending += chunk
            if len(self._pending) < len(_BOM) and _BOM.startswith(self._pending):
                return []
            self._at_start = False
            if self._pending.startswith(_BOM):
                del self._pending[: len(_BOM)]
            chunk = bytes(self._pending)
            self._pending.clear()
        if self._skip_lf and chunk:
            self._skip_lf = False
            if chunk[0] == 0x0A:
                chunk = chunk[1:]
        # A chunk without any line end only grows the pending line; handling it apart keeps
        # byte-at-a-time feeding linear instead of rescanning the pending line on every call.
        if b"\n" not in chunk and b"\r" not in chunk:
            self._pending += chunk
            self._check_size(len(self._pending))
            return []
        if self._pending:
            buf = bytes(self._pending) + chunk
            self._pending.clear()
        else:
            buf = chunk
        if b"\r" in buf:
            self._skip_lf = buf.endswith(b"\r")
            # Splitting bytes before decoding is safe: CR and LF never occur inside a
            # multi-byte UTF-8 sequence.
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = buf.split(b"\n")
        tail = lines.pop()
        events: list[Event] = []
        for line in lines:
            self._check_size(len(line))
            event = self._process_line(line)
            if event is not None:
                events.append(event)
        self._pending += tail
        self._check_size(len(tail))
        return events

    def _check_size(self, line_size: int) -> None:
        # Counted in raw line bytes so the verdict does not depend on how the stream is chunked.
        if line_size + self._data_size > self._max:
            self._broken = True
            raise SSEProtocolError(f"SSE event exceeds {self._max} bytes")

    def _process_line(self, line: bytes) -> Event | None:
        if not line:
            return self._dispatch()
        if line.startswith(b":"):
            self._comments += 1
            return None
        name, _, raw = line.partition(b":")
        if raw.startswith(b" "):
            raw = raw[1:]
        # Field names are ASCII, so compare bytes and only decode values that are kept.
        if name == b"data":
            self._data.append(raw.decode("utf-8", "replace"))
            self._data_size += len(line)
        elif name == b"event":
            self._event_type = raw.decode("utf-8", "replace")
        elif name == b"id":
            if b"\0" not in raw:
                self._last_event_id = raw.decode("utf-8", "replace")
        elif name == b"retry" and raw.isdigit():
            # bytes.isdigit() is ASCII-only, as the spec requires. int() refuses absurdly long
            # digit strings (CPython's int_max_str_digits); such a value is ignored as invalid.
            try:
                value = int(raw)
            except ValueError:
                return None
            self._retry = value
            self._event_retry = value
        return None

    def _dispatch(self) -> Event | None:
        data, self._data = self._data, []
        event_type, self._event_type = self._event_type, ""
        retry, self._event_retry = self._event_retry, None
        self._data_size = 0
        if not data:
            return None
        # Joining is the spec's "append value + LF, then drop one trailing LF".
        return Event(
            data="\n".join(data),
            event=event_type or "message",
            id=self._last_event_id or None,
            retry=retry,
        )
