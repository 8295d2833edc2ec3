"""Collection definitions without a database: parsing, the registry's rows, their events."""

from __future__ import annotations

import json

import pytest

from tidings.feeds.config import FeedConfig, parse_config, parse_definition
from tidings.feeds.definitions import (
    check_definable,
    definition_json,
    definition_update,
    from_stored,
    stored,
)
from tidings.feeds.errors import ConfigError, InvalidDefinition, NameTaken, SchemaViolation
from tidings.feeds.events import ChangeRow
from tidings.feeds.query import ChangeFilter

SCHEMA = {"type": "object", "required": ["text"]}


def test_a_definition_takes_the_options_of_a_configured_collection() -> None:
    config = parse_definition("notes", {"read": "public", "schema": SCHEMA})
    assert (config.kind, config.key, config.read, config.write) == (
        "managed", "id", "public", "publisher")
    assert config.schema == SCHEMA
    defaults = parse_definition("notes", {"read": None, "write": None, "schema": None})
    assert (defaults.read, defaults.write, defaults.schema) == ("private", "publisher", None)
    assert definition_json(config) == {
        "name": "notes", "kind": "managed", "key": "id", "read": "public",
        "write": "publisher", "topic": "/collections/notes", "schema": SCHEMA}


@pytest.mark.parametrize("name", ["bad-name", "tidings_x", "sqlite_x", "updates", "1a", ""])
def test_a_bad_name_is_a_400(name: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_definition(name, {})
    assert caught.value.status_hint == 400


def _nested(depth: int) -> dict[str, object]:
    schema: dict[str, object] = {}
    for _ in range(depth):
        schema = {"not": schema}
    return schema


@pytest.mark.parametrize(("options", "fields"), [
    ({"read": "everyone"}, ["read"]),
    ({"write": "admin", "read": False}, ["read", "write"]),
    ({"color": "red"}, ["color"]),
    ({"schema": [1]}, ["schema"]),
    ({"schema": {"type": "nonsense"}}, ["schema"]),
    ({"schema": {"required": "text"}}, ["schema"]),
    ({"schema": {"properties": {"a": {"$ref": "https://example.com/s.json"}}}}, ["schema"]),
    ({"schema": _nested(100)}, ["schema"]),
])
def test_bad_options_are_a_422_naming_each_field(options: dict[str, object],
                                                 fields: list[str]) -> None:
    with pytest.raises(InvalidDefinition) as caught:
        parse_definition("notes", options)
    assert caught.value.status_hint == 422
    assert [e["field"] for e in caught.value.errors] == fields


def test_the_reason_of_an_invalid_schema_is_told() -> None:
    with pytest.raises(InvalidDefinition) as caught:
        parse_definition("notes", {"schema": {"type": "nonsense"}})
    assert "not a valid JSON Schema" in caught.value.message
    assert "nonsense" in caught.value.errors[0]["message"]


def test_stored_rows_round_trip_and_a_bad_row_is_skipped() -> None:
    config = parse_definition("notes", {"write": "anyone", "schema": SCHEMA})
    again = from_stored(stored(config))
    assert again is not None and again.same_as(config)
    assert not again.same_as(parse_definition("notes", {"write": "anyone"}))
    assert from_stored(("notes", "everyone", "publisher", None)) is None
    assert from_stored(("notes", "public", "publisher", "{not json")) is None


def test_the_file_wins() -> None:
    file = parse_config({"collections": {"Messages": {}}, "tables": {"orders": {}}})
    with pytest.raises(NameTaken) as caught:
        check_definable(file, "messages")  # however capitalized
    assert caught.value.status_hint == 409
    check_definable(file, "notes")
    merged = file.merged([parse_definition("orders", {})],
                         [parse_definition("messages", {"read": "public"}),
                          parse_definition("notes", {})])
    assert merged.collections["Messages"].read == "private"
    assert merged.collections["orders"].kind == "table"
    assert sorted(merged.collections) == ["Messages", "notes", "orders"]
    assert FeedConfig().merged([], None).collections == {}


def _registry_change(op: str, old: dict[str, object] | None,
                     new: dict[str, object] | None) -> ChangeRow:
    return ChangeRow(7, "tidings_collections", op, {"name": "notes"},  # type: ignore[arg-type]
                     old, new, "2026-01-01T00:00:00.000Z")


def test_registry_changes_are_create_modify_drop_events() -> None:
    public = {"name": "notes", "read": "public", "write": "anyone", "schema": None}
    private = {**public, "read": "private"}
    create = definition_update(_registry_change("insert", None, public), db="app", epoch="ab12cd34")
    event = json.loads(create.data)
    assert event == {"_id": {"_data": "ab12cd34.7"}, "operationType": "create",
                     "ns": {"db": "app", "coll": "notes"},
                     "operationDescription": {"read": "public", "write": "anyone"},
                     "wallTime": "2026-01-01T00:00:00.000Z"}
    assert (create.id, create.topics, create.private) == (
        "ab12cd34.7", ("/collections/notes",), False)
    modify = definition_update(_registry_change("update", public, private), db="app",
                               epoch="ab12cd34")
    assert json.loads(modify.data)["operationType"] == "modify" and modify.private
    drop = definition_update(_registry_change("delete", public, None), db="app",
                             epoch="ab12cd34")
    assert json.loads(drop.data)["operationType"] == "drop" and not drop.private
    assert "operationDescription" not in json.loads(drop.data)


def test_events_about_the_collection_pass_every_filter() -> None:
    filtered = ChangeFilter.from_params([("operationType", "insert"), ("status", "open")])
    assert filtered.accepts({"operationType": "drop", "ns": {"coll": "notes"}})
    assert filtered.accepts({"operationType": "modify"})
    assert not filtered.accepts({"operationType": "delete", "documentKey": {"id": "1"}})


def test_a_reference_to_nowhere_refuses_the_document_rather_than_failing() -> None:
    config = parse_definition("notes", {"schema": {
        "properties": {"a": {"$ref": "#/$defs/missing"}}}})
    config.validate({"b": 1})  # the reference is not reached
    with pytest.raises(SchemaViolation) as caught:
        config.validate({"a": 1})
    assert caught.value.status_hint == 422 and "cannot be applied" in caught.value.message
