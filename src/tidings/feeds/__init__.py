"""Change feeds: collections (tables Tidings watches) and their changes, published live.

    feed = open_feed("sqlite:///app.db", hub, config=load_config("tidings.toml"))
    await feed.start()           # after hub.start()
    ...
    await feed.stop()            # before hub.stop()

The URL scheme picks the implementation, imported only when used: `sqlite:///FILE`
(feeds/sqlite.py) or `postgresql://...` (feeds/postgres.py, needs asyncpg), both
implementing the `ChangeFeed` Protocol. See docs/feeds.md.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from tidings.feeds.base import ChangeFeed, Page, ResumePoint, Retention, Snapshot, WriteResult
from tidings.feeds.config import CollectionConfig, FeedConfig, load_config, parse_config
from tidings.feeds.errors import (
    ConfigError,
    Conflict,
    MethodNotAllowed,
    SchemaViolation,
    TokenTooOld,
    UnknownCollection,
    UnknownToken,
)
from tidings.feeds.events import ChangeRow, ResumeToken, change_event, change_update
from tidings.feeds.query import ChangeFilter, FieldFilter, ListQuery
from tidings.hub.hub import Hub

__all__ = [
    "ChangeFeed",
    "ChangeFilter",
    "ChangeRow",
    "CollectionConfig",
    "ConfigError",
    "Conflict",
    "FeedConfig",
    "FieldFilter",
    "ListQuery",
    "MethodNotAllowed",
    "Page",
    "ResumePoint",
    "ResumeToken",
    "Retention",
    "SchemaViolation",
    "Snapshot",
    "TokenTooOld",
    "UnknownCollection",
    "UnknownToken",
    "WriteResult",
    "change_event",
    "change_update",
    "load_config",
    "open_feed",
    "parse_config",
]


def open_feed(
    db_url: str,
    hub: Hub,
    *,
    config: FeedConfig | None = None,
    retention: Retention | None = None,
) -> ChangeFeed | None:
    """The feed of the database at `db_url`, or None when there is nothing to watch
    (memory:// with no collections configured, or no SQLite file yet)."""
    config = config or FeedConfig()
    scheme = urlsplit(db_url).scheme
    if scheme == "sqlite":
        from tidings.feeds.sqlite import SQLiteFeed

        path = db_url.split("sqlite:///", 1)[-1]
        if not config.collections and not os.path.exists(path):
            return None  # nothing configured, and no file that could have watched tables
        return SQLiteFeed(db_url, hub, config, retention=retention)
    if scheme in ("postgresql", "postgres"):
        from tidings.feeds.postgres import PostgresFeed

        # Whether there is anything to watch is known only once connected: an idle feed
        # creates nothing in the database (PostgresFeed.start).
        return PostgresFeed(db_url, hub, config, retention=retention)
    if config.collections:
        raise ConfigError(
            f"collections need a database the feed can watch (--db sqlite:///FILE or "
            f"postgresql://...), not {db_url!r}")
    return None
