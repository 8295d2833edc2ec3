"""Rate limits as the chat service charges them: in this process (`SlidingWindow`), or
shared by every process on the chat's PostgreSQL database (`cluster.Cluster.hit`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from tidings.chat.ratelimit import SlidingWindow

if TYPE_CHECKING:
    from tidings.chat.cluster import Cluster

__all__ = ["LocalLimit", "RateLimit", "SharedLimit"]


class RateLimit(Protocol):
    limit: int
    window_s: float

    async def hit(self, key: str) -> int:
        """0, or (refused, not counted) the whole seconds to wait."""

    def charge(self, key: str) -> tuple[str, int, float] | None:
        """`chat_cluster_hit`'s arguments for a hit to `key`, for a write that charges the
        limit in its own transaction (`ChatStore.post`); None: `hit` it instead."""


class LocalLimit:
    def __init__(self, limit: int, window_s: float) -> None:
        self._window = SlidingWindow(limit, window_s)
        self.limit = limit
        self.window_s = window_s

    async def hit(self, key: str) -> int:
        return self._window.hit(key)

    def charge(self, key: str) -> None:
        return None  # in this process's memory: no transaction to join


class SharedLimit:
    """A sliding window kept in the database: the limit holds across processes."""

    def __init__(self, cluster: Cluster, name: str, limit: int, window_s: float) -> None:
        if limit < 1 or window_s <= 0:
            raise ValueError("a rate limit needs limit >= 1 and a positive window")
        self._cluster = cluster
        self._name = name
        self.limit = limit
        self.window_s = window_s

    async def hit(self, key: str) -> int:
        return await self._cluster.hit(*self.charge(key))

    def charge(self, key: str) -> tuple[str, int, float]:
        return f"{self._name}:{key}", self.limit, self.window_s
