"""The MongoDB change feed: collections of a MongoDB database, streamed with Tidings'
guarantees (one change stream per collection for every subscriber, resumable across
restarts, exactly once). Needs pymongo: `pip install 'tidings[mongodb]'`.

    driver.py     pymongo behind a typed edge: the client, BSON as JSON, errors
    events.py     a change as the hub's update (the SQL feeds' shape and topics)
    state.py      each stream's saved token and lease, in the hub's database (pgstate.py)
    stream.py     one collection's change stream as the tailer reads it
    feed.py       MongoFeed: the streams, snapshots (get, list) and resuming
"""

from tidings.feeds.mongodb.feed import MongoFeed

__all__ = ["MongoFeed"]
