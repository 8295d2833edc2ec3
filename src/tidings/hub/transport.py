"""The hub's port to where updates travel and are kept: what the hub calls, nothing more.

The hub defines this interface and transports (`tidings.transports`) implement it, so the
dependency points from the implementations to the hub, never up. A transport gives every
update a position (`seq`) in one ordered history. `seq` follows commit order and means the
same on every process sharing the transport, so an id seen on one process resumes on any
other.

What only some callers need (history housekeeping, which the hub never calls) is a separate
small protocol, `HistoryBounds`, as Mercure keeps listing and health apart from its
four-method transport; so are `BatchAppend`, storing many updates in one go, and
`StorageHealth`, what operators are told of storage that can go away.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol, runtime_checkable

from tidings.hub.update import Update

__all__ = ["BatchAppend", "HistoryBounds", "StorageHealth", "Transport"]


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

    def tail(self, after: int) -> AsyncIterator[Update]:
        """Every update committed after `after` by any process sharing this transport, in
        seq order, forever. Raises when the connection to the storage is lost; the caller
        calls it again with the last seq it saw."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class HistoryBounds(Protocol):
    """A history kept within bounds (size, age): every built-in transport has it. The
    transports prune on their own as they append; this is for tools and tests."""

    async def first_seq(self) -> int:
        """The seq of the oldest update still in history (0 when empty)."""
        ...

    async def prune(self) -> int:
        """Apply retention (count, then age) now; returns how many updates were removed."""
        ...


@runtime_checkable
class BatchAppend(Protocol):
    """A transport that stores many updates together (one transaction for many), as the
    feeds' tailers publish them: optional; `Hub.publish_many` appends one by one without."""

    async def append_many(self, updates: Sequence[Update]) -> list[Update]:
        """`append` each, in this order. What is stored when it raises is a prefix of
        `updates` (so appending them all again stores each once, in order)."""
        ...


@runtime_checkable
class StorageHealth(Protocol):
    """A transport on storage that can go away (a bus, a database server): what `/metrics`
    tells operators, from memory (no I/O)."""

    @property
    def storage_up(self) -> bool:
        """False from an operation's failure to the next one that works (an outage)."""
        ...

    @property
    def storage_outages(self) -> int:
        """Outages begun since this process started."""
        ...

    @property
    def history_losses(self) -> int:
        """Times the storage came back without updates this process had read (a Redis
        restarted without persistence, or flushed); 0 where storage keeps what it took."""
        ...
