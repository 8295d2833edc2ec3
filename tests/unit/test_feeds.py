"""The feeds' pure parts: tokens, diffs, merge patches, events, filters, configuration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tidings.errors import BadRequest
from tidings.feeds import (
    ChangeFilter,
    ChangeRow,
    ConfigError,
    FieldFilter,
    ListQuery,
    ResumeToken,
    SchemaViolation,
    UnknownToken,
    change_event,
    change_update,
    load_config,
    parse_config,
)
from tidings.feeds.events import diff, document_topic, merge_patch, same_json
from tidings.feeds.query import decode_cursor, encode_cursor

EPOCH = "0123abcd"


def row(op: str, old: object = None, new: object = None, key: object = None,
        seq: int = 7) -> ChangeRow:
    return ChangeRow.decode(
        seq, "messages", op, json.dumps(key or {"id": "m1"}),
        None if old is None else json.dumps(old), None if new is None else json.dumps(new),
        "2024-05-01T12:00:00.123Z",
    )


# -- tokens ------------------------------------------------------------------------------


@given(st.from_regex(r"[0-9a-f]{8,32}", fullmatch=True), st.integers(0, 2**62))
def test_token_round_trip(epoch: str, seq: int) -> None:
    token = ResumeToken(epoch, seq)
    assert ResumeToken.parse(str(token)) == token


@pytest.mark.parametrize("text", [
    "", "earliest", "abc", "0123abcd", "0123abcd.", "0123abcd.-1", "0123abcd.01",
    "0123ABCD.1", "0123abcd.1.2", "0123abcd.1x", "short.1", "0123abcd.99999999999999999999",
    "0123abcd:1", "x" * 500,
])
def test_malformed_tokens_are_unknown_tokens(text: str) -> None:
    with pytest.raises(UnknownToken) as info:
        ResumeToken.parse(text)
    assert info.value.status_hint == 400


def test_tokens_order_by_seq() -> None:
    assert ResumeToken(EPOCH, 2) < ResumeToken(EPOCH, 10)


# -- diff and merge patch ---------------------------------------------------------------


def test_diff_updated_and_removed_fields() -> None:
    old = {"id": "a", "n": 1, "flag": True, "gone": "x", "same": {"k": [1, 2]}}
    new = {"id": "a", "n": 2, "flag": 1, "same": {"k": [1, 2]}, "added": None}
    assert diff(old, new) == {
        "updatedFields": {"n": 2, "flag": 1, "added": None},
        "removedFields": ["gone"],
    }


def test_same_json_distinguishes_booleans_but_not_int_and_float() -> None:
    assert same_json(1, 1.0)
    assert not same_json(True, 1)
    assert not same_json("1", 1)
    assert same_json({"a": [1, {"b": None}]}, {"a": [1, {"b": None}]})
    assert not same_json([1], [1, 2])


@pytest.mark.parametrize(("target", "patch", "result"), [
    # RFC 7396, appendix A
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
])
def test_merge_patch_rfc7396(target: object, patch: object, result: object) -> None:
    before = json.dumps(target)
    assert merge_patch(target, patch) == result  # type: ignore[arg-type]
    assert json.dumps(target) == before  # the target is not changed


# -- events ------------------------------------------------------------------------------


def test_insert_event_shape() -> None:
    event = change_event(row("insert", new={"id": "m1", "text": "hi"}), db="app",
                         token=ResumeToken(EPOCH, 7))
    assert event == {
        "_id": {"_data": "0123abcd.7"},
        "operationType": "insert",
        "ns": {"db": "app", "coll": "messages"},
        "documentKey": {"id": "m1"},
        "fullDocument": {"id": "m1", "text": "hi"},
        "wallTime": "2024-05-01T12:00:00.123Z",
    }


def test_update_event_carries_the_diff() -> None:
    event = change_event(
        row("update", old={"id": "m1", "text": "hi", "x": 1}, new={"id": "m1", "text": "yo"}),
        db="app", token=ResumeToken(EPOCH, 7))
    assert event["operationType"] == "update"
    assert event["fullDocument"] == {"id": "m1", "text": "yo"}
    assert event["updateDescription"] == {"updatedFields": {"text": "yo"},
                                          "removedFields": ["x"]}


def test_replace_and_delete_event_shapes() -> None:
    replace = change_event(row("replace", old={"id": "m1", "a": 1}, new={"id": "m1", "b": 2}),
                           db="app", token=ResumeToken(EPOCH, 7))
    assert replace["fullDocument"] == {"id": "m1", "b": 2}
    assert "updateDescription" not in replace
    delete = change_event(row("delete", old={"id": "m1", "a": 1}), db="app",
                          token=ResumeToken(EPOCH, 7))
    assert delete["operationType"] == "delete"
    assert "fullDocument" not in delete and "updateDescription" not in delete
    assert delete["documentKey"] == {"id": "m1"}


def test_unknown_operation_is_refused() -> None:
    with pytest.raises(ValueError):
        row("upsert", new={"id": "m1"})


def test_the_update_is_a_function_of_the_row() -> None:
    change = row("update", old={"id": "m1", "a": 1}, new={"id": "m1", "a": 2})
    first = change_update(change, db="app", epoch=EPOCH, private=True)
    again = change_update(row("update", old={"id": "m1", "a": 1}, new={"id": "m1", "a": 2}),
                          db="app", epoch=EPOCH, private=True)
    assert first == again and first.frame == again.frame  # a republish is identical
    assert first.id == "0123abcd.7"
    assert first.private
    assert first.topics == ("/collections/messages", "/collections/messages/m1")
    assert json.loads(first.data)["_id"] == {"_data": first.id}


def test_document_topics_encode_the_key() -> None:
    assert document_topic("t", {"id": "a/b c"}) == "/collections/t/a%2Fb%20c"
    assert document_topic("t", {"id": 42}) == "/collections/t/42"


def test_a_changed_key_reaches_the_old_documents_topic_too() -> None:
    change = ChangeRow.decode(3, "orders", "update", '{"id": 5}', '{"id": 3, "q": 1}',
                              '{"id": 5, "q": 1}', "2024-05-01T12:00:00.000Z")
    update = change_update(change, db="app", epoch=EPOCH, private=False)
    assert update.topics == ("/collections/orders", "/collections/orders/5",
                             "/collections/orders/3")


# -- filters and list queries ------------------------------------------------------------


def test_field_filter_readings() -> None:
    number = FieldFilter.parse("n", "5")
    assert number.matches({"n": 5}) and number.matches({"n": "5"}) and number.matches({"n": 5.0})
    assert not number.matches({"n": 6}) and not number.matches({})
    flag = FieldFilter.parse("done", "true")
    assert flag.matches({"done": True}) and not flag.matches({"done": 1})
    null = FieldFilter.parse("tag", "null")
    assert null.matches({}) and null.matches({"tag": None}) and not null.matches({"tag": "x"})
    text = FieldFilter.parse("name", "alice")
    assert text.values == ("alice",)
    nested = FieldFilter.parse("address.city", "Paris")
    assert nested.matches({"address": {"city": "Paris"}})
    assert not nested.matches({"address": "Paris"})


@pytest.mark.parametrize("name", ["", "a..b", 'a"b', "a\nb", "x" * 200])
def test_bad_filter_field_names(name: str) -> None:
    with pytest.raises(BadRequest):
        FieldFilter.parse(name, "1")


def test_list_query_from_params() -> None:
    query = ListQuery.from_params([("username", "al"), ("limit", "20"), ("sort", "-updated_at"),
                                   ("authorization", "jwt")])
    assert query.limit == 20 and query.sort == "updated_at" and query.descending
    assert [f.field for f in query.filters] == ["username"]
    cursor = query.cursor_after("updated_at", "2024-01-01T00:00:00.000Z", "id9")
    following = ListQuery.from_params([("cursor", cursor), ("username", "al")])
    assert following.after == ("2024-01-01T00:00:00.000Z", "id9")
    assert following.sort == "updated_at" and following.descending


@pytest.mark.parametrize("params", [
    [("limit", "0")], [("limit", "1001")], [("limit", "ten")], [("cursor", "!!!")],
    [("cursor", encode_cursor("created_at", False, 1, 2)), ("sort", "updated_at")],
    [(f"f{i}", "1") for i in range(21)],
])
def test_bad_list_queries(params: list[tuple[str, str]]) -> None:
    with pytest.raises(BadRequest):
        ListQuery.from_params(params)


# What a page can end on: a database's values, whose whole numbers are 64-bit.
_INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@given(st.sampled_from(["created_at", "updated_at", "id"]), st.booleans(),
       st.one_of(st.text(), _INT64, st.none()), st.one_of(st.text(), _INT64))
def test_cursor_round_trip(sort: str, descending: bool, value: object, key: object) -> None:
    text = encode_cursor(sort, descending, value, key)  # type: ignore[arg-type]
    assert decode_cursor(text) == (sort, descending, value, key)


@given(st.one_of(st.integers(min_value=2**63), st.integers(max_value=-(2**63) - 1),
                 st.lists(st.integers()), st.dictionaries(st.text(), st.integers())))
def test_cursor_holding_what_no_database_binds_is_refused(value: object) -> None:
    with pytest.raises(BadRequest, match="malformed cursor"):
        decode_cursor(encode_cursor("id", False, None, value))  # type: ignore[arg-type]


def test_an_object_id_cursor_is_for_mongodb_only() -> None:
    oid = {"$oid": "6b14cdcf0cffaee7b4329e4c"}
    text = encode_cursor("_id", False, None, oid)
    assert decode_cursor(text) == ("_id", False, None, oid)
    with pytest.raises(BadRequest, match="malformed cursor"):  # what a SQL list binds
        ListQuery.from_params([("cursor", text)]).sql_after()
    for other in ({"$oid": "xyz"}, {"$oid": "6b14cdcf0cffaee7b4329e4c", "x": 1}):
        with pytest.raises(BadRequest, match="malformed cursor"):
            decode_cursor(encode_cursor("_id", False, None, other))


def test_change_filter() -> None:
    everything = ChangeFilter.from_params([("resume_after", "x")])
    assert everything.everything
    inserts = ChangeFilter.from_params([("operationType", "insert,delete"), ("room", "a")])
    assert not inserts.everything
    insert = {"operationType": "insert", "fullDocument": {"id": "1", "room": "a"},
              "documentKey": {"id": "1"}}
    assert inserts.accepts(insert)
    assert not inserts.accepts({**insert, "fullDocument": {"id": "1", "room": "b"}})
    assert not inserts.accepts({**insert, "operationType": "update"})
    by_key = ChangeFilter.from_params([("id", "1")])
    assert by_key.accepts({"operationType": "delete", "documentKey": {"id": "1"}})
    with pytest.raises(BadRequest):
        ChangeFilter.from_params([("operationType", "upsert")])


# -- configuration -----------------------------------------------------------------------

DOCS = Path(__file__).parents[2] / "docs" / "feeds.md"


def documented_configuration() -> str:
    """The TOML example under the Configuration heading of docs/feeds.md."""
    text = DOCS.read_text()
    start = text.index("```toml\n", text.index("## Configuration")) + len("```toml\n")
    return text[start:text.index("```", start)]


# The configuration users copy from the docs, and a collection left at every default.
TOML = documented_configuration() + "\n[collections.notes]\n"


def test_toml_and_json_configurations(tmp_path: Path) -> None:
    path = tmp_path / "tidings.toml"
    path.write_text(TOML)
    config = load_config(path)
    messages, notes, orders = (config.collections[n] for n in ("messages", "notes", "orders"))
    assert (messages.kind, messages.read, messages.write) == ("managed", "public", "publisher")
    assert (notes.read, notes.write, notes.schema) == ("private", "publisher", None)
    assert (orders.kind, orders.key, orders.read, orders.writable) == (
        "table", "id", "private", False)
    as_json = tmp_path / "tidings.json"
    as_json.write_text(json.dumps({"collections": {"notes": {"read": "public"}}}))
    assert load_config(as_json).collections["notes"].read == "public"


def test_schema_violations_name_the_failing_fields(tmp_path: Path) -> None:
    path = tmp_path / "tidings.toml"
    path.write_text(TOML)
    messages = load_config(path).collections["messages"]
    messages.validate({"username": "al", "content": "hi", "id": "x", "created_at": 1})
    with pytest.raises(SchemaViolation) as info:
        messages.validate({"username": "   ", "extra": 1})
    assert info.value.status_hint == 422
    assert sorted(e["field"] for e in info.value.errors) == ["content", "username"]


@pytest.mark.parametrize(("data", "message"), [
    ({"collection": {}}, "unknown configuration sections"),
    ({"collections": {"bad-name": {}}}, "must be letters"),
    ({"collections": {"updates": {}}}, "reserved"),
    ({"collections": {"tidings_x": {}}}, "reserved"),
    ({"collections": {"a": {"read": "everyone"}}}, "read must be one of"),
    ({"collections": {"a": {"write": "all"}}}, "write must be one of"),
    ({"collections": {"a": {"schema": {"type": 5}}}}, "invalid JSON Schema"),
    ({"collections": {"a": {"colour": "red"}}}, "unknown options"),
    ({"collections": {"a": {}}, "tables": {"A": {}}}, "configured twice"),
    ({"tables": {"a": {"schema": {}}}}, "unknown options"),
    ({"tables": {"a": {"key": 1}}}, "key must be a column name"),
])
def test_configuration_errors(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def test_unreadable_configuration(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[collections.a\n")
    with pytest.raises(ConfigError):
        load_config(bad)


def test_change_filter_as_a_hub_predicate() -> None:
    accept = ChangeFilter.from_params([("operationType", "insert"), ("room", "a")]).predicate()
    change = row("insert", new={"id": "m1", "room": "a"})
    assert accept(change_update(change, db="app", epoch=EPOCH, private=False))
    other = row("insert", new={"id": "m1", "room": "b"})
    assert not accept(change_update(other, db="app", epoch=EPOCH, private=False))
    from tidings.hub.update import Update

    for data in ("", "not json", "[1]", '{"operationType": 5}', "x" * 70_000):
        assert not accept(Update.create(["/collections/t"], data))  # never raises


def test_mongodb_configuration() -> None:
    from tidings.feeds import ConfigError, parse_config

    config = parse_config({"mongodb": {"url": "mongodb://h/app", "collections": {
        "messages": {"read": "public"}, "audit": {}}}})
    assert config.mongodb.url == "mongodb://h/app" and not config.collections
    messages = config.mongodb.collections["messages"]
    assert (messages.kind, messages.key, messages.read, messages.writable) == (
        "mongodb", "_id", "public", False)
    assert config.mongodb.collections["audit"].private
    # The command line adds collections (private) and its URL wins.
    merged = config.mongodb.with_watched("mongodb://other/db", ["messages", "rooms"])
    assert merged.url == "mongodb://other/db"
    assert merged.collections["messages"].read == "public"
    assert merged.collections["rooms"].private
    for bad in ({"mongodb": {"port": 1}},
                {"mongodb": {"collections": {"m": {"write": "anyone"}}}},
                {"tables": {"m": {}}, "mongodb": {"collections": {"m": {}}}}):
        with pytest.raises(ConfigError):
            parse_config(bad)


def test_the_log_functions_read_on_indexes_and_the_capture_trigger_sets_nothing() -> None:
    """The PostgreSQL log's functions run with `enable_seqscan = off` (their cached plans
    must not scan the whole log); the capture trigger, which runs in every writer's
    transaction and reads nothing, must not pay for the setting."""
    from tidings.feeds.postgres.capture import ChangeLog
    from tidings.feeds.postgres.capture_sql import functions

    created = {text.split("(", 1)[0].rsplit(".", 1)[-1]: text
               for text in functions(ChangeLog.of("s")._names)
               if text.startswith("CREATE OR REPLACE FUNCTION")}
    assert "enable_seqscan" not in created["tidings_capture"]
    for name in ("tidings_tick", "tidings_close", "tidings_read", "tidings_place"):
        assert "SET enable_seqscan = off" in created[name], name


def test_the_replication_connection_gets_only_what_libpq_knows_of_the_url() -> None:
    """asyncpg takes any URL parameter it does not know as a server setting
    (`?search_path=`); libpq refuses those, so the stream's URL leaves them out."""
    from tidings.feeds.postgres.stream import libpq_dsn

    assert libpq_dsn("postgresql://u:p@db:6432/app?search_path=s&sslmode=require"
                     "&application_name=x") == (
        "postgresql://u:p@db:6432/app?sslmode=require&application_name=x")
    assert libpq_dsn("postgresql://db/app") == "postgresql://db/app"
