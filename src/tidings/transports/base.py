"""The one interface between the hub and where updates travel and are kept.

A transport gives every update a position (`seq`) in one ordered history. `seq` follows
commit order and means the same on every process sharing the transport, so an id seen on
one process resumes on any other.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from tidings.hub.update import Update

__all__ = ["Transport"]


class Transport(Protocol):
    @property
    def last_seq(self) -> int:
        """The seq of the newest stored update (0 for an empty history)."""
        ...

    async def append(self, update: Update) -> Update:
        """Store durably and return the update with its seq.

        Idempotent: appending an update equal to the newest stored one with its id (same
        topics, data, privacy, type, retry) returns the stored one and publishes nothing
        new, so a retried publish is stored once. An id reused for a different update is
        a new update (Mercure allows it); ids then resolve to their newest use.
        """
        ...

    async def read_after(self, seq: int, limit: int) -> list[Update]:
        """Up to `limit` stored updates with a seq above `seq`, in order."""
        ...

    async def find(self, update_id: str) -> Update | None:
        """The newest stored update with this id, or None if unknown or pruned."""
        ...

    async def first_seq(self) -> int:
        """The seq of the oldest update still in history (0 when empty)."""
        ...

    def tail(self, after: int) -> AsyncIterator[Update]:
        """Every update committed after `after`, in seq order, forever."""
        ...

    async def close(self) -> None: ...
