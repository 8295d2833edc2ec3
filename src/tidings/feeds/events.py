"""Change events: pure functions from a change-log row to the update the hub publishes.

Events are shaped like MongoDB change events (as JSON):

    {"_id": {"_data": TOKEN}, "operationType": "insert" | "update" | "replace" | "delete",
     "ns": {"db": DB, "coll": NAME}, "documentKey": {"id": ...},
     "fullDocument": {...},                                   # absent on delete
     "updateDescription": {"updatedFields": {...}, "removedFields": [...]},  # update only
     "wallTime": "2024-05-01T12:00:00.123Z"}

and, when the whole table was emptied at once (PostgreSQL's TRUNCATE; MongoDB's nearest
are `drop` and `invalidate`), one event with no documentKey, on the collection's topic:

    {"_id": {"_data": TOKEN}, "operationType": "truncate", "ns": {...}, "wallTime": "..."}

Everything here is a function of the stored row, so republishing a row after a crash
builds the very same update (same id, same data), which the transport stores once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, TypeAlias, cast
from urllib.parse import quote

from tidings.feeds.errors import UnknownToken
from tidings.hub.update import Update

__all__ = [
    "OPERATIONS",
    "ChangeRow",
    "JSONObject",
    "JSONValue",
    "Operation",
    "ResumeToken",
    "StreamToken",
    "change_event",
    "change_update",
    "collection_topic",
    "diff",
    "document_topic",
    "merge_patch",
    "same_json",
]

JSONValue: TypeAlias = (
    "bool | int | float | str | list[JSONValue] | dict[str, JSONValue] | None"
)
JSONObject: TypeAlias = "dict[str, JSONValue]"
Operation = Literal["insert", "update", "replace", "delete", "truncate"]
OPERATIONS: tuple[Operation, ...] = ("insert", "update", "replace", "delete", "truncate")

_TOKEN = re.compile(r"([0-9a-f]{8,32})\.(0|[1-9][0-9]{0,18})")


@dataclass(frozen=True, slots=True, order=True)
class ResumeToken:
    """A position in one database's change log: `EPOCH.SEQ` (opaque to clients).

    `epoch` is made once per change log (when it is created), so that a token from another
    database, or from one recreated since, is recognised as unknown rather than resuming
    at a wrong place. `seq` 0 is the empty log's position ("before any change")."""

    epoch: str
    seq: int

    def __str__(self) -> str:
        return f"{self.epoch}.{self.seq}"

    @classmethod
    def parse(cls, text: str) -> ResumeToken:
        """Raises UnknownToken (400) for anything that is not a token."""
        match = _TOKEN.fullmatch(text.strip())
        if match is None:
            raise UnknownToken(f"malformed resume token {text[:80]!r}")
        return cls(match.group(1), int(match.group(2)))


# A change stream's resume token as Tidings passes it on: MongoDB's `_data` (hex), or
# another server's opaque text; never whitespace, quotes or control characters.
_STREAM_TOKEN = re.compile(r"[A-Za-z0-9:._~+/=-]{1,1024}")


@dataclass(frozen=True, slots=True)
class StreamToken:
    """A position in a database's own change stream (MongoDB's resume token `_data`),
    used as is: the update id of the change, and what a watch resumes after."""

    data: str

    def __str__(self) -> str:
        return self.data

    @classmethod
    def parse(cls, text: str) -> StreamToken:
        """Raises UnknownToken (400) for anything that cannot be a resume token."""
        if not _STREAM_TOKEN.fullmatch(text):
            raise UnknownToken(f"malformed resume token {text[:80]!r}")
        return cls(text)


@dataclass(frozen=True, slots=True)
class ChangeRow:
    """One change-log row, decoded: what the triggers (or the API) stored."""

    seq: int
    collection: str
    operation: Operation
    key: JSONObject  # the documentKey, e.g. {"id": "abc"}
    old: JSONObject | None  # the row before (update, replace, delete)
    new: JSONObject | None  # the row after (insert, update, replace)
    wall_time: str  # ISO 8601 UTC, written by the database in the change's transaction

    @classmethod
    def decode(
        cls, seq: int, collection: str, operation: str, key: str, old: str | None,
        new: str | None, wall_time: str,
    ) -> ChangeRow:
        if operation not in OPERATIONS:
            raise ValueError(f"unknown operation {operation!r} in change {seq}")
        return cls(
            seq=seq,
            collection=collection,
            operation=operation,
            key=_object(json.loads(key)),
            old=None if old is None else _object(json.loads(old)),
            new=None if new is None else _object(json.loads(new)),
            wall_time=wall_time,
        )


def _object(value: object) -> JSONObject:
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {type(value).__name__}")
    return cast(JSONObject, value)


def same_json(a: JSONValue, b: JSONValue) -> bool:
    """Equal as JSON values: `true` is not `1`, `1` is `1.0`, key order does not matter."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def diff(old: Mapping[str, JSONValue], new: Mapping[str, JSONValue]) -> JSONObject:
    """MongoDB's updateDescription for a change from `old` to `new` (top-level fields)."""
    updated: JSONObject = {
        k: v for k, v in new.items() if k not in old or not same_json(old[k], v)
    }
    removed: list[JSONValue] = [k for k in old if k not in new]
    return {"updatedFields": updated, "removedFields": removed}


def merge_patch(target: JSONValue, patch: JSONValue) -> JSONValue:
    """RFC 7396 JSON Merge Patch: objects merge recursively, null removes a field, anything
    else replaces. Returns a new value; neither argument is changed."""
    if not isinstance(patch, dict):
        return patch
    result: JSONObject = dict(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = merge_patch(result.get(name), value)
    return result


def collection_topic(collection: str) -> str:
    return f"/collections/{collection}"


def document_topic(collection: str, key: Mapping[str, JSONValue]) -> str:
    """`/collections/NAME/ID`, the id percent-encoded (one path segment)."""
    if len(key) == 1:
        (value,) = key.values()
        text = value if isinstance(value, str) else json.dumps(value)
    else:
        text = json.dumps(key, sort_keys=True)
    return f"/collections/{collection}/{quote(text, safe='')}"


def change_event(row: ChangeRow, *, db: str, token: ResumeToken) -> JSONObject:
    """The MongoDB-shaped change event of one change-log row."""
    event: JSONObject = {
        "_id": {"_data": str(token)},
        "operationType": row.operation,
        "ns": {"db": db, "coll": row.collection},
    }
    if row.operation != "truncate":  # every document went: there is no one key
        event["documentKey"] = dict(row.key)
    if row.operation != "delete" and row.new is not None:
        event["fullDocument"] = dict(row.new)
    if row.operation == "update":
        event["updateDescription"] = diff(row.old or {}, row.new or {})
    event["wallTime"] = row.wall_time
    return event


def change_update(row: ChangeRow, *, db: str, epoch: str, private: bool) -> Update:
    """The hub update of one change: on `/collections/NAME` and `/collections/NAME/ID`, with
    the change's resume token as its id. A function of the row only (see module doc)."""
    token = ResumeToken(epoch, row.seq)
    event = change_event(row, db=db, token=token)
    topics = [collection_topic(row.collection)]
    if row.operation != "truncate":
        topics.append(document_topic(row.collection, row.key))
    if row.operation in ("update", "replace") and row.old is not None:
        # A key changed by an UPDATE: readers of the old document's topic see it go.
        old_key = {name: row.old.get(name) for name in row.key}
        if not same_json(old_key, row.key):
            topics.append(document_topic(row.collection, old_key))
    data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return Update.create(topics, data, id=str(token), private=private)
