"""MongoDB change events as the hub's updates: the same shape and topics as the SQL feeds'.

A document change (insert, update, replace, delete) is published on `/collections/COLL`
and `/collections/COLL/ID` with the server's resume token as the update id and as the
event's `_id._data`, so a client resumes with either. The event keeps MongoDB's fields
in JSON (`driver.to_json`): `operationType`, `ns`, `documentKey` (`{"_id": ...}`),
`fullDocument` (updateLookup; never on a delete, as MongoDB without pre-images),
`updateDescription` when the server sends one, `wallTime`. `drop`, `rename`,
`dropDatabase` and `invalidate` go on the collection's topic only; other events
(`create`, index changes: shown only on request) are not published.

Every update here is a function of the server's change alone, with one exception the
stream source handles: a change the server does not describe the same way twice (see
`stream.py`, which checks the hub's history before republishing after a reopen).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from tidings.feeds.config import CollectionConfig
from tidings.feeds.events import JSONObject, collection_topic, document_topic
from tidings.feeds.mongodb.driver import to_json
from tidings.hub.update import Update

__all__ = ["DOCUMENT_OPERATIONS", "ENDING_OPERATIONS", "change_update", "stream_event"]

DOCUMENT_OPERATIONS = frozenset({"insert", "update", "replace", "delete"})
ENDING_OPERATIONS = frozenset({"drop", "rename", "dropDatabase", "invalidate"})


def _update(config: CollectionConfig, event: JSONObject, topics: list[str], update_id: str,
            type_: str | None = None) -> Update:
    data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return Update.create(topics, data, id=update_id, private=config.private, type=type_)


def change_update(change: Mapping[str, Any], *, config: CollectionConfig, db: str,
                  token: str) -> Update | None:
    """The update of one change of `config`'s collection (None: not published)."""
    operation = str(change.get("operationType", ""))
    if operation not in DOCUMENT_OPERATIONS | ENDING_OPERATIONS:
        return None
    event: JSONObject = {"_id": {"_data": token}, "operationType": operation,
                         "ns": {"db": db, "coll": config.name}}
    topics = [collection_topic(config.name)]
    if operation in DOCUMENT_OPERATIONS:
        key = to_json(change.get("documentKey") or {})
        if not isinstance(key, dict) or "_id" not in key:
            return None
        document = change.get("fullDocument")
        if isinstance(document, Mapping) and "_id" in document:
            # The same document: its own `_id` keeps its type (nx-27017's documentKey
            # turns an integer `_id` into text).
            key["_id"] = to_json(document["_id"])
        event["documentKey"] = key
        topics.append(document_topic(config.name, {"_id": key["_id"]}))
        if operation != "delete" and isinstance(document, Mapping):
            event["fullDocument"] = to_json(document)
        description = change.get("updateDescription")
        if operation == "update" and isinstance(description, Mapping):
            event["updateDescription"] = to_json(description)
    if operation == "rename" and isinstance(change.get("to"), Mapping):
        event["to"] = to_json(change["to"])
    if change.get("wallTime") is not None:
        event["wallTime"] = to_json(change["wallTime"])
    return _update(config, event, topics, token)


def stream_event(config: CollectionConfig, *, db: str, update_id: str,
                 operation: str = "invalidate", error: str = "") -> Update:
    """An event Tidings says about the stream itself: an `invalidate` the server did not
    send (the collection is gone), or, with `error`, that changes were lost (an `event:
    error` as a watch with a token too old gets, so a client loads a new snapshot)."""
    topics = [collection_topic(config.name)]
    if error:
        return _update(config, {"error": error, "status": 410,
                                "code": "resume_token_too_old",
                                "ns": {"db": db, "coll": config.name}},
                       topics, update_id, "error")
    return _update(config, {"_id": {"_data": update_id}, "operationType": operation,
                            "ns": {"db": db, "coll": config.name}}, topics, update_id)
