"""The SQLite change feed: triggers write a change log, one tailer publishes it.

    schema.py     the change log, its state, and each collection's shape and triggers
    watch.py      `tidings watch` / `unwatch`: register a table of the user's own
    defined.py    collections defined at run time (`PUT /api/collections/NAME`,
                  `tidings collection`): the registry and each definition's table
    documents.py  reads and writes through the API, each with its resume token
    feed.py       SQLiteFeed: setup, the tailer (with its file lock), resuming, retention
"""

from tidings.feeds.sqlite.defined import (
    create_collection,
    defined_collections,
    drop_collection,
)
from tidings.feeds.sqlite.feed import CAPTURE, SQLiteFeed
from tidings.feeds.sqlite.watch import unwatch_table, watch_table, watched_tables

__all__ = [
    "CAPTURE",
    "SQLiteFeed",
    "create_collection",
    "defined_collections",
    "drop_collection",
    "unwatch_table",
    "watch_table",
    "watched_tables",
]
