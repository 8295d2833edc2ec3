"""What operators and their tools read: `/healthz` (liveness and a few numbers as JSON) and
`/metrics` (Prometheus text). Both only read counters the hub and the change feed keep in
memory: no lock, no await, so a busy hub still answers them at once."""

from __future__ import annotations

import dataclasses
import os
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from tidings.feeds.base import ChangeFeed, StatusReporting
from tidings.hub.hub import Hub, Metrics
from tidings.version import __version__

__all__ = ["Ops"]


class Ops:
    def __init__(self, hub: Hub, feed: ChangeFeed | None = None) -> None:
        self.hub = hub
        self.feed = feed
        self.started = time.time()

    def routes(self) -> list[Route]:
        return [Route("/healthz", self.healthz), Route("/metrics", self.metrics)]

    async def healthz(self, request: Request) -> Response:
        hub = self.hub
        return JSONResponse({
            "status": "ok",
            "version": __version__,
            "subscribers": hub.subscriber_count,
            "last_seq": hub.transport.last_seq,
            "uptime_s": round(time.time() - self.started, 1),
            "pid": os.getpid(),
        })

    async def metrics(self, request: Request) -> Response:
        hub = self.hub
        lines: list[tuple[str, str, str, object]] = [
            ("tidings_subscribers", "gauge", "Subscribers connected now.", hub.subscriber_count),
            *((counter.metadata["name"], "counter", counter.metadata["help"],
               getattr(hub.metrics, counter.name)) for counter in dataclasses.fields(Metrics)),
        ]
        lines += self._feed_lines()
        text = "".join(
            f"# HELP {name.split('{')[0]} {help_}\n# TYPE {name.split('{')[0]} {kind}\n"
            f"{name} {value}\n"
            for name, kind, help_, value in lines
        )
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    def _feed_lines(self) -> list[tuple[str, str, str, object]]:
        """The change feed's: how it captures, whether this process tails, how far."""
        if not isinstance(self.feed, StatusReporting):
            return []
        status = self.feed.status()
        info = f'tidings_feed_info{{backend="{status.backend}",capture="{status.capture}"}}'
        lines: list[tuple[str, str, str, object]] = [
            (info, "gauge", "The change feed: its database and how it captures changes.", 1),
            ("tidings_feed_leading", "gauge",
             "1 when this process tails the change log (one process does).",
             int(status.leading)),
            ("tidings_feed_published_position", "gauge",
             "The newest change-log position this process's tailer published.",
             status.published),
        ]
        if status.lag_s is not None:
            lines.append((
                "tidings_feed_lag_seconds", "gauge",
                "How long the oldest change the tailer read but has not yet published has "
                "waited since its batch was closed (0: caught up).", round(status.lag_s, 6)))
        if status.slot_lag_bytes is not None:
            lines.append((
                "tidings_feed_slot_lag_bytes", "gauge",
                "Logical decoding: bytes of WAL the replication slot keeps behind the "
                "server's current position (bounded by max_slot_wal_keep_size).",
                status.slot_lag_bytes))
        return lines
