"""Collections defined at run time, kept in the database rather than a configuration file.

`PUT /api/collections/NAME` and `tidings collection create NAME` write a row of the
registry `tidings_collections` (name, read, write, schema), beside `tidings_watched`, the
registry of `tidings watch`. What every backend keeps:

* Every process serves the same collections. A process learns a change of either registry
  within a second: SQLite by `PRAGMA data_version` (looked at when a request names a
  collection; it changes when any other connection commits) and a version number the
  registries' writers bump; PostgreSQL by a NOTIFY that every process LISTENs for.
* The registry is itself captured, like a watched table: each definition change is a row
  of the change log, in commit order with the documents' changes, which the tailer
  publishes on `/collections/NAME` as a MongoDB-shaped `create`, `modify` or `drop` event.
  So a watcher sees a collection's last change and then its `drop`; every position of the
  log is an update of the hub's history, so a token read right after a definition
  resumes; and the tailer rereads the registries when it meets such a row, before it
  publishes the new collection's first change with its read rule.
* The configuration file wins: a name it declares cannot be defined or dropped (409,
  `NameTaken`), and one defined before the file declared it is served as the file says.

Dropping a collection drops its table, documents included (MongoDB's `drop`); its changes
stay in the change log and the hub's history until retention removes them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from tidings.errors import TidingsError
from tidings.feeds.config import CollectionConfig, FeedConfig, parse_definition
from tidings.feeds.errors import NameTaken
from tidings.feeds.events import ChangeRow, JSONObject, ResumeToken, collection_topic
from tidings.hub.update import Update

__all__ = [
    "REGISTRY",
    "REGISTRY_CAPTURE",
    "DefinesCollections",
    "check_definable",
    "definition_json",
    "definition_update",
    "from_stored",
    "stored",
]

log = logging.getLogger(__name__)

REGISTRY = "tidings_collections"
# The registry, captured as a watched table keyed by name (module doc).
REGISTRY_CAPTURE = CollectionConfig(REGISTRY, "table", "name", "private", "none")
_EVENTS = {"insert": "create", "update": "modify", "replace": "modify", "delete": "drop"}


@runtime_checkable
class DefinesCollections(Protocol):
    """A feed whose managed collections can be defined and dropped while it runs (an
    optional interface: a feed without it answers 405 to `PUT /api/collections/NAME`)."""

    async def define(self, config: CollectionConfig) -> bool:
        """Create the collection, or replace its settings; True when it is new.
        NameTaken (409) for a name the file declares or a table of another kind."""
        ...

    async def undefine(self, name: str) -> None:
        """Drop the collection and its table. UnknownCollection (404) when it is not
        defined; NameTaken (409) for the file's collections and watched tables."""
        ...


def check_definable(file_config: FeedConfig, name: str) -> None:
    """NameTaken when the configuration file declares `name`: the file wins."""
    if file_config.declares(name):
        raise NameTaken(f"{name} is declared in the configuration file (--config), which "
                        f"wins: change it there")


def definition_json(config: CollectionConfig) -> JSONObject:
    """A collection as the API and the CLI show it."""
    return {"name": config.name, "kind": config.kind, "key": config.key, "read": config.read,
            "write": config.write, "topic": config.topic,
            "schema": None if config.schema is None else dict(config.schema)}


def stored(config: CollectionConfig) -> tuple[str, str, str, str | None]:
    """A definition as a registry row: (name, read, write, schema as JSON text)."""
    schema = None if config.schema is None else json.dumps(config.schema)
    return config.name, config.read, config.write, schema


def from_stored(row: Sequence[object]) -> CollectionConfig | None:
    """A registry row read back (the schema as JSON text); None, logged, when it is not a
    valid definition (written by hand, say): that collection is not served."""
    name, read, write, schema = row
    try:
        return parse_definition(str(name), {
            "read": read, "write": write,
            "schema": None if schema is None else json.loads(str(schema))})
    except (ValueError, TidingsError) as exc:
        log.error("the definition of collection %s cannot be used: %s", name, exc)
        return None


def definition_update(change: ChangeRow, *, db: str, epoch: str) -> Update:
    """The update of a registry change: a `create`, `modify` or `drop` event on the
    collection's topic, private unless the collection is (was, for a drop) public. A
    function of the row only, as every change's update is (`events.change_update`)."""
    operation = _EVENTS[change.operation]
    definition = (change.old if operation == "drop" else change.new) or {}
    name = str(change.key.get("name"))
    token = ResumeToken(epoch, change.seq)
    event: JSONObject = {"_id": {"_data": str(token)}, "operationType": operation,
                         "ns": {"db": db, "coll": name}}
    if operation != "drop":
        event["operationDescription"] = {"read": definition.get("read"),
                                         "write": definition.get("write")}
    event["wallTime"] = change.wall_time
    data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return Update.create([collection_topic(name)], data, id=str(token),
                         private=definition.get("read") != "public")
