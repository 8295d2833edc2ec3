"""The PostgreSQL change feed: triggers write a change log, one tailer publishes it.

    schema.py     each collection's table and how its rows become documents
    capture.py    the change log ordered by snapshots: its tables, the trigger, ticks,
                  positions, the tailer's queries, retention (with capture_sql.py, its
                  SQL: all of capture, replaceable as one)
    decoding.py   capture by logical decoding instead of the trigger: the slot, the
                  publication, the tailer's step (pgoutput.py parses the protocol)
    watch.py      which tables are captured; `tidings watch` / `unwatch`
    registry.py   the registries' channel (every process LISTENs) and defined collections
    defined.py    collections defined at run time (`PUT /api/collections/NAME`,
                  `tidings collection`)
    documents.py  reads and writes through the API, each with its resume token
    feed.py       PostgresFeed: setup, the one tailer among processes, resuming, retention
"""

from tidings.feeds.postgres.capture import CAPTURE
from tidings.feeds.postgres.defined import (
    create_collection,
    defined_collections,
    drop_collection,
)
from tidings.feeds.postgres.feed import PostgresFeed
from tidings.feeds.postgres.watch import capture_of, unwatch_table, watch_table

__all__ = [
    "CAPTURE",
    "PostgresFeed",
    "capture_of",
    "create_collection",
    "defined_collections",
    "drop_collection",
    "unwatch_table",
    "watch_table",
]
