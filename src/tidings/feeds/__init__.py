"""Change feeds: collections (tables Tidings watches) and their changes, published live.

    feed = open_feed("sqlite:///app.db", hub, config=load_config("tidings.toml"))
    await feed.start()           # after hub.start()
    ...
    await feed.stop()            # before hub.stop()

The URL scheme picks the implementation, imported only when used: `sqlite:///FILE`
(feeds/sqlite/) or `postgresql://...` (feeds/postgres/, needs asyncpg), both
implementing the `ChangeFeed` Protocol. Collections of a MongoDB database (`--mongo`,
feeds/mongodb/, needs pymongo) are one more feed, served beside the database's
(`open_feeds`). See docs/feeds.md.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from tidings.feeds.base import ChangeFeed, Page, ResumePoint, Retention, Snapshot, WriteResult
from tidings.feeds.config import (
    CollectionConfig,
    FeedConfig,
    MongoConfig,
    load_config,
    parse_config,
)
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
    "MongoConfig",
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
    "open_feeds",
    "parse_config",
]


def open_feed(
    db_url: str,
    hub: Hub,
    *,
    config: FeedConfig | None = None,
    retention: Retention | None = None,
    pg_capture: str = "auto",
    pg_slot_read: str = "auto",
) -> ChangeFeed | None:
    """The feed of the database at `db_url`, or None for a database no feed can watch
    (memory:// with no collections configured). A feed with nothing to watch stays idle
    until a collection is defined or a table watched (`feeds/definitions.py`)."""
    config = config or FeedConfig()
    scheme = urlsplit(db_url).scheme
    if scheme == "sqlite":
        from tidings.feeds.sqlite import SQLiteFeed

        path = db_url.split("sqlite:///", 1)[-1]
        if not config.collections and path in ("", ":memory:"):
            return None  # no file another process could share: nothing to watch
        return SQLiteFeed(db_url, hub, config, retention=retention)
    if scheme in ("postgresql", "postgres"):
        from tidings.feeds.postgres import PostgresFeed

        # Whether there is anything to watch is known only once connected: an idle feed
        # creates nothing in the database (PostgresFeed.start).
        return PostgresFeed(db_url, hub, config, retention=retention, capture=pg_capture,
                            slot_read=pg_slot_read)
    if config.collections:
        raise ConfigError(
            f"collections need a database the feed can watch (--db sqlite:///FILE or "
            f"postgresql://...), not {db_url!r}")
    return None


def open_feeds(
    db_url: str,
    hub: Hub,
    *,
    config: FeedConfig | None = None,
    retention: Retention | None = None,
    pg_capture: str = "auto",
    pg_slot_read: str = "auto",
) -> ChangeFeed | None:
    """The database's feed (`open_feed`) and, when `config.mongodb` has a URL, the
    MongoDB feed of its collections (tokens kept in `db_url`), served as one."""
    config = config or FeedConfig()
    feed = open_feed(db_url, hub, config=config, retention=retention, pg_capture=pg_capture,
                     pg_slot_read=pg_slot_read)
    mongodb = config.mongodb
    if not mongodb.url:
        if mongodb.collections:
            raise ConfigError("MongoDB collections need a database: --mongo mongodb://HOST/DB")
        return feed
    if not mongodb.collections:
        raise ConfigError("--mongo needs the collections to watch: --mongo-watch COLL[,COLL]")
    from tidings.feeds.mongodb import MongoFeed

    mongo = MongoFeed(mongodb, hub, state_url=db_url)
    if feed is None:
        return mongo
    from tidings.feeds.several import Feeds

    return Feeds([feed, mongo])
