"""An update: what a publisher sends and every matching subscriber receives.

The SSE frame is encoded once, when the update is built, and the same bytes object is
handed to every subscriber and stored in history, so fan-out never re-encodes.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace

from tidings.errors import BadRequest, Forbidden
from tidings.sse import encode_event

__all__ = ["MAX_ID_LENGTH", "MAX_RETRY_MS", "RESERVED_PREFIX", "RETRY_RANGE", "Update", "check_id"]

# Topics under the hub's own namespace are written only by the hub (subscription events).
RESERVED_PREFIX = "/.well-known/mercure"

_FORBIDDEN_IN_FIELDS = ("\r", "\n", "\0")
# The largest `retry` stored and sent: a signed 32-bit integer of milliseconds (24.8 days).
# It fits every transport's column (PostgreSQL `integer`), and a browser's setTimeout,
# which fires at once for any larger delay.
MAX_RETRY_MS = 2**31 - 1
RETRY_RANGE = f"retry must be a whole number of milliseconds from 0 to {MAX_RETRY_MS}"
# Ids are looked up on every resume and sent in every event: an id longer than this is
# refused, and so is a Last-Event-ID longer than any id can be.
MAX_ID_LENGTH = 1024


def check_id(value: str, what: str) -> str:
    """An update id, or an id a subscriber resumes from: BadRequest for one no update can
    have (too long, or holding CR, LF or NUL, which would break the event's framing)."""
    if len(value) > MAX_ID_LENGTH:
        raise BadRequest(f"{what} is longer than {MAX_ID_LENGTH} characters")
    if any(c in value for c in _FORBIDDEN_IN_FIELDS):
        raise BadRequest(f"{what} must not contain CR, LF or NUL")
    return value


def _is_reserved(topic: str) -> bool:
    # Resolve absolute URLs to their path so "https://hub/.well-known/mercure/..." is caught too.
    path = topic
    if "://" in topic:
        rest = topic.split("://", 1)[1]
        slash = rest.find("/")
        path = rest[slash:] if slash >= 0 else "/"
    path = path.split("?", 1)[0].split("#", 1)[0]
    return path == RESERVED_PREFIX or path.startswith(RESERVED_PREFIX + "/")


@dataclass(frozen=True, slots=True)
class Update:
    topics: tuple[str, ...]
    data: str
    id: str
    private: bool = False
    type: str | None = None
    retry: int | None = None
    # Position in the one ordered history; 0 until the transport has stored it.
    seq: int = 0
    created_at: float = 0.0
    frame: bytes = field(default=b"", compare=False, repr=False)

    @classmethod
    def create(
        cls,
        topics: tuple[str, ...] | list[str],
        data: str = "",
        *,
        id: str | None = None,
        private: bool = False,
        type: str | None = None,
        retry: int | None = None,
        allow_reserved: bool = False,
    ) -> Update:
        """Validate the fields of a new update and encode its frame."""
        topics = tuple(topics)
        if not topics:
            raise BadRequest("an update needs at least one topic")
        for topic in topics:
            if not topic:
                raise BadRequest("a topic must not be empty")
            if any(c in topic for c in _FORBIDDEN_IN_FIELDS):
                raise BadRequest("a topic must not contain CR, LF or NUL")
            if not allow_reserved and _is_reserved(topic):
                raise Forbidden(f"topics under {RESERVED_PREFIX} are reserved for the hub")
        if id is None:
            id = f"urn:uuid:{uuid.uuid4()}"
        elif not id or id.startswith("#") or id == "earliest":
            raise BadRequest("an update id must not be empty, start with '#' or be 'earliest'")
        else:
            check_id(id, "an update id")
        if "\0" in data:
            # Every transport must take what one takes, and PostgreSQL's text cannot hold
            # NUL: refused as input (400) rather than failing to store it (503) there.
            raise BadRequest("data must not contain NUL (U+0000); escape it, as JSON "
                             "does (\\u0000)")
        if type is not None and any(c in type for c in _FORBIDDEN_IN_FIELDS):
            raise BadRequest("an update type must not contain CR, LF or NUL")
        if retry is not None and not 0 <= retry <= MAX_RETRY_MS:
            raise BadRequest(RETRY_RANGE)
        frame = encode_event(data, id=id, event=type or None, retry=retry)
        return cls(topics, data, id, private, type or None, retry, frame=frame)

    def stored(self, seq: int, created_at: float) -> Update:
        """The same update with its history position."""
        return replace(self, seq=seq, created_at=created_at)
