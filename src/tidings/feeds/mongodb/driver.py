"""How Tidings uses MongoDB: pymongo's asyncio API behind a small typed edge.

* pymongo is an optional extra: importing this module without it raises an ImportError
  that says what to install, which `tidings serve --mongo` prints as its one line.
* Documents leave as JSON: an ObjectId becomes its hex string, a datetime ISO 8601 UTC,
  other BSON types their text. nx-27017 (a wire-compatible server the tests use) hands
  ObjectIds nested in a change's `fullDocument` as `{"__neosqlite_objectid__": true,
  "id": HEX}`; that reads as the hex string too, so events look the same from any server.
* Everything the driver raises about a server it cannot reach or use is `UNAVAILABLE`
  (503 for a read, a retry with backoff for a change stream).
"""

from __future__ import annotations

import base64
import datetime
from collections.abc import Mapping
from typing import Any, cast
from urllib.parse import urlsplit

from tidings.feeds.errors import ConfigError
from tidings.feeds.events import JSONObject, JSONValue

try:
    import bson
    import pymongo
    import pymongo.errors
    from pymongo import AsyncMongoClient
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "MongoDB support (--mongo) needs pymongo: pip install 'tidings[mongodb]'"
    ) from exc

__all__ = [
    "HISTORY_LOST",
    "UNAVAILABLE",
    "AsyncMongoClient",
    "OperationFailure",
    "database_name",
    "from_key",
    "id_candidates",
    "open_client",
    "to_document",
    "to_json",
    "to_key",
]

UNAVAILABLE: tuple[type[BaseException], ...] = (pymongo.errors.PyMongoError, OSError)
OperationFailure = pymongo.errors.OperationFailure
# A resume token the server can no longer resume after: ChangeStreamHistoryLost (286),
# ChangeStreamFatalError (280, "the resume token was not found"), CappedPositionLost (136).
HISTORY_LOST = frozenset({136, 280, 286})
SERVER_SELECTION_TIMEOUT_MS = 5000
_NX_OBJECT_ID = "__neosqlite_objectid__"


def database_name(url: str) -> str:
    """The database of `mongodb://HOST:PORT/DB`; ConfigError without one."""
    parts = urlsplit(url)
    if parts.scheme not in ("mongodb", "mongodb+srv"):
        raise ConfigError(f"--mongo takes a mongodb:// URL, not {url[:60]!r}")
    name = parts.path.lstrip("/")
    if not name:
        raise ConfigError("--mongo needs the database in the URL: mongodb://HOST:PORT/DB")
    return name


def open_client(url: str) -> AsyncMongoClient[dict[str, Any]]:
    """A client for `url` (it connects on first use, in the background)."""
    return AsyncMongoClient(url, serverSelectionTimeoutMS=SERVER_SELECTION_TIMEOUT_MS,
                            tz_aware=True)


def to_json(value: object) -> JSONValue:
    """A BSON value as JSON (see the module doc)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Mapping):
        if value.get(_NX_OBJECT_ID) is True and isinstance(value.get("id"), str):
            return str(value["id"])
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.UTC)
        return value.astimezone(datetime.UTC).isoformat(timespec="milliseconds").replace(
            "+00:00", "Z")
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return str(value)  # ObjectId (its hex), Decimal128, UUID, Timestamp...


def to_document(value: Mapping[str, Any]) -> JSONObject:
    return cast(JSONObject, to_json(value))


def id_candidates(text: str) -> list[object]:
    """What an `_id` written as `text` (in a URL or a filter) may be stored as: the string,
    an ObjectId of that hex, an integer of those digits."""
    out: list[object] = [text]
    if bson.ObjectId.is_valid(text):
        out.append(bson.ObjectId(text))
    if text.lstrip("-").isdigit() and len(text) < 19:
        out.append(int(text))
    return out


def to_key(value: JSONValue) -> object:
    """A cursor's `_id` back as stored: `{"$oid": HEX}` is an ObjectId."""
    if isinstance(value, dict) and isinstance(value.get("$oid"), str):
        return bson.ObjectId(str(value["$oid"]))
    return value


def from_key(value: object) -> JSONValue:
    """An `_id` for a cursor, keeping its type: an ObjectId becomes `{"$oid": HEX}`."""
    if isinstance(value, bson.ObjectId):
        return {"$oid": str(value)}
    return to_json(value)
