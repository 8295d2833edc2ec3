"""What operators and their tools read: `/healthz` (liveness and a few numbers as JSON) and
`/metrics` (Prometheus text). Both only read counters the hub, the change feed and the chat
keep in memory: no lock, no await, so a busy hub still answers them at once."""

from __future__ import annotations

import dataclasses
import os
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from tidings.chat import ChatService
from tidings.feeds.base import ChangeFeed, StatusReporting
from tidings.hub.hub import Hub, Metrics
from tidings.hub.transport import StorageHealth
from tidings.version import __version__

__all__ = ["Ops"]


class Ops:
    def __init__(self, hub: Hub, feed: ChangeFeed | None = None,
                 chat: ChatService | None = None) -> None:
        self.hub = hub
        self.feed = feed
        self.chat = chat
        self.started = time.time()

    def routes(self) -> list[Route]:
        return [Route("/healthz", self.healthz), Route("/metrics", self.metrics)]

    async def healthz(self, request: Request) -> Response:
        """Liveness: 200 while the process serves, its storage up or not (`storage`
        says which: publishes answer 503 meanwhile, streams stay open)."""
        hub = self.hub
        storage = self._storage()
        return JSONResponse({
            "status": "ok",
            "storage": "down" if storage and not storage.storage_up else "up",
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
        lines += self._storage_lines()
        lines += self._feed_lines()
        lines += self._chat_lines()
        text = "".join(
            f"# HELP {name.split('{')[0]} {help_}\n# TYPE {name.split('{')[0]} {kind}\n"
            f"{name} {value}\n"
            for name, kind, help_, value in lines
        )
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    def _storage(self) -> StorageHealth | None:
        """The hub's transport, if it tells its storage's health (the built-in ones do)."""
        transport = self.hub.transport
        return transport if isinstance(transport, StorageHealth) else None

    def _storage_lines(self) -> list[tuple[str, str, str, object]]:
        """The hub's storage: a bus or database server that went away, a full disk."""
        transport = self._storage()
        if transport is None:
            return []
        return [
            ("tidings_storage_up", "gauge",
             "0 while the hub's storage is unavailable (publishes answer 503, or 507 "
             "for a full disk), else 1.",
             int(transport.storage_up)),
            ("tidings_storage_outages_total", "counter",
             "Outages of the hub's storage since this process started.",
             transport.storage_outages),
            ("tidings_history_lost_total", "counter",
             "Times the bus came back without updates this process had read (Redis "
             "restarted without persistence, or flushed).", transport.history_losses),
        ]

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
        if status.slot_streamed is not None:
            lines.append((
                "tidings_feed_slot_streamed", "gauge",
                "Logical decoding: 1 while the tailer streams the replication slot over a "
                "replication connection, 0 while it reads the slot with SQL functions.",
                int(status.slot_streamed)))
        if status.slot_steps is not None:
            lines.append((
                "tidings_feed_slot_steps_total", "counter",
                "Logical decoding: the tailer's steps, each a transaction that copies what "
                "the slot holds into the change log (idle, it steps when a captured "
                "table's transaction comes, and every 5 s).", status.slot_steps))
        return lines

    def _chat_lines(self) -> list[tuple[str, str, str, object]]:
        """The chat's: which process relays its outbox, how far, and how busy this one is."""
        if self.chat is None:
            return []
        status = self.chat.status()
        lines: list[tuple[str, str, str, object]] = [
            (f'tidings_chat_info{{store="{status.store}"}}', "gauge",
             "The chat: where it keeps its tables.", 1),
            ("tidings_chat_relay_leading", "gauge",
             "1 when this process relays the chat's outbox to the hub (one process does).",
             int(status.relay_leading)),
            ("tidings_chat_relay_published_position", "gauge",
             "The newest outbox row this process's relay published.",
             status.relay_published),
            ("tidings_chat_streams", "gauge",
             "Chat streams (signed-in windows) open on this process.", status.streams),
            ("tidings_chat_messages_posted_total", "counter",
             "Messages posted through this process.", status.messages_posted),
        ]
        if status.processes is not None:
            lines.append((
                "tidings_chat_cluster_processes", "gauge",
                "Chat processes on these tables alive at this process's last heartbeat.",
                status.processes))
        return lines
