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
    async def start(self) -> None:
        """Connect (and create what storage needs). Called once, before anything else."""
        ...

    @property
    def last_seq(self) -> int:
        """The seq of the newest update this process knows is stored (0: empty history).

        Up to date after `start()` and after each `append()` by this process."""
        ...

    async def append(self, update: Update) -> Update:
        """Store durably and return the update with its seq (raises ServiceUnavailable
        when the storage cannot be reached: a publish is never dropped silently).

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
        """Every update committed after `after` by any process sharing this transport, in
        seq order, forever. Raises when the connection to the storage is lost; the caller
        calls it again with the last seq it saw."""
        ...

    async def close(self) -> None: ...
