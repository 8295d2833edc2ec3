"""An update: what a publisher sends and every matching subscriber receives.

The SSE frame is encoded once, when the update is built, and the same bytes object is
handed to every subscriber and stored in history, so fan-out never re-encodes.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace

from tidings.errors import BadRequest, Forbidden
from tidings.sse import encode_event

__all__ = ["RESERVED_PREFIX", "Update"]

# Topics under the hub's own namespace are written only by the hub (subscription events).
RESERVED_PREFIX = "/.well-known/mercure"

_FORBIDDEN_IN_FIELDS = ("\r", "\n", "\0")


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
        elif any(c in id for c in _FORBIDDEN_IN_FIELDS):
            raise BadRequest("an update id must not contain CR, LF or NUL")
        if type is not None and any(c in type for c in _FORBIDDEN_IN_FIELDS):
            raise BadRequest("an update type must not contain CR, LF or NUL")
        if retry is not None and retry < 0:
            raise BadRequest("retry must be a non-negative number of milliseconds")
        frame = encode_event(data, id=id, event=type or None, retry=retry)
        return cls(topics, data, id, private, type or None, retry, frame=frame)

    def stored(self, seq: int, created_at: float) -> Update:
        """The same update with its history position."""
        return replace(self, seq=seq, created_at=created_at)
