"""A sliding-window rate limit per key (a user): at most `limit` hits in `window_s`.

Pure: the clock is passed in, so tests move time without sleeping. Memory is bounded by
the keys active within one window (idle keys are swept as new ones arrive).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

__all__ = ["SlidingWindow"]


class SlidingWindow:
    def __init__(self, limit: int, window_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if limit < 1 or window_s <= 0:
            raise ValueError("a rate limit needs limit >= 1 and a positive window")
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._hits: dict[str, deque[float]] = {}
        self._next_sweep = 0.0

    def hit(self, key: str) -> int:
        """Count a hit and return 0, or refuse it (not counted) and return the whole
        seconds to wait before the next one is allowed."""
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        hits = self._hits.get(key)
        if hits is None:
            hits = self._hits[key] = deque()
        while hits and hits[0] <= now - self.window_s:
            hits.popleft()
        if len(hits) >= self.limit:
            return max(1, math.ceil(hits[0] + self.window_s - now))
        hits.append(now)
        return 0

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + self.window_s
        for key in [k for k, hits in self._hits.items()
                    if not hits or hits[-1] <= now - self.window_s]:
            del self._hits[key]
