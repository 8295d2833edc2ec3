"""An outage of something Tidings stores in, told once: when it starts and when it ends.

While a bus or a database is down, every publish fails and answers 503 (507 for a full
disk). A log line per refused request would bury the one line that matters under
thousands, so each transport keeps an `Outage`: the first failure logs a WARNING that says
what is down and what clients get meanwhile; the first success after it logs how long it
lasted and how many operations were refused. What fails in between is only counted.

Recovery is the next operation that works, whoever makes it (a publish, a replay, the
fan-out's tail): nothing restarts, and nothing polls to find out. An operation counts
only if it began after the outage did: one that was under way when the storage went and
still got through says nothing about now, and would otherwise end the outage in the log
a moment before the next failure opens another.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["Outage", "OutageHealth"]

log = logging.getLogger(__name__)

# What the log says clients get while the storage is down (unless `failed` says otherwise).
_CONSEQUENCE = "publishes answer 503 until it is back"


class Outage:
    """The state of one storage: up, or down since when and how many operations failed."""

    __slots__ = ("_clock", "_failures", "_since", "outages", "what")

    def __init__(self, what: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what
        self._clock = clock
        self._since: float | None = None
        self._failures = 0
        self.outages = 0  # how many began (what `/metrics` counts)

    @property
    def down(self) -> bool:
        return self._since is not None

    def failed(self, reason: object, *, consequence: str | None = None) -> bool:
        """One operation failed because of `reason`; True when this began the outage (and
        logged it). `consequence` overrides what the log says clients get meanwhile."""
        self._failures += 1
        if self._since is not None:
            return False
        self._since = self._clock()
        self.outages += 1
        log.warning("%s is unavailable (%s): %s", self.what, reason,
                    consequence or _CONSEQUENCE)
        return True

    def now(self) -> float:
        """When an operation begins, for `ok(began=...)`."""
        return self._clock()

    def ok(self, began: float | None = None) -> None:
        """An operation that began at `began` (`now()`; None: just now) worked: ends the
        outage (and logs it) if there was one and the operation began after it."""
        if self._since is None or (began is not None and began < self._since):
            return
        lasted_s, failures = self._clock() - self._since, self._failures
        self._since, self._failures = None, 0
        # A WARNING, like the line that opened the outage: whoever sees one sees both.
        log.warning("%s is back after %.1f s (%d operations failed meanwhile)",
                    self.what, lasted_s, failures)


class OutageHealth:
    """`hub.transport.StorageHealth` for a transport that keeps its `Outage` as `_outage`
    and loses nothing it stored (the Redis transport counts its lost histories)."""

    _outage: Outage

    @property
    def storage_up(self) -> bool:
        return not self._outage.down

    @property
    def storage_outages(self) -> int:
        return self._outage.outages

    @property
    def history_losses(self) -> int:
        return 0
