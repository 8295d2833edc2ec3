"""The filter index (hub/filters.py) and the watch filters' probes (feeds/query.py).

The index may only skip subscribers whose filter would refuse the update: the property
tests compare it with asking every filter, on events of every kind (inserts, updates,
deletes that carry only the key, truncates, events about the collection, errors, junk).
The hub tests run fan-out on the memory transport: no sockets, no sleeps.
"""

from __future__ import annotations

import json
from collections.abc import Hashable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.test_hub import KEY, collect, live, make_hub, sel, settle
from tidings.feeds.events import OPERATIONS, JSONValue, same_json
from tidings.feeds.query import ChangeFilter, FieldProbe, json_key
from tidings.hub.auth import decode_token
from tidings.hub.filters import EVERYONE, FilterIndex, IndexKey
from tidings.hub.subscriber import CloseReason
from tidings.hub.tokens import encode_token
from tidings.hub.update import Update

TOPIC = "/collections/notes"


def by_first_letter(update: Update) -> Hashable:
    return EVERYONE if update.data == "*" else update.data[:1]


FIRST = IndexKey(by_first_letter, frozenset("ab"))
ONLY_B = IndexKey(by_first_letter, frozenset("b"))


def change(operation: str, document: dict[str, JSONValue] | None = None,
           key: dict[str, JSONValue] | None = None, **extra: JSONValue) -> Update:
    event: dict[str, JSONValue] = {"operationType": operation, **extra}
    if document is not None:
        event["fullDocument"] = document
    if key is not None:
        event["documentKey"] = key
    return Update.create([TOPIC], json.dumps(event))


# -- FilterIndex -------------------------------------------------------------------------


def test_index_files_members_by_the_keys_their_probe_answers() -> None:
    index: FilterIndex[str] = FilterIndex()
    index.add("ab", FIRST)
    index.add("b", ONLY_B)
    index.add("any", None)  # no index key: asked about every update
    assert index.candidates(Update.create([TOPIC], "apple")) == ["any", "ab"]
    assert index.candidates(Update.create([TOPIC], "banana")) == ["any", "ab", "b"]
    assert index.candidates(Update.create([TOPIC], "cherry")) == ["any"]
    assert index.candidates(Update.create([TOPIC], "*")) == ["any", "ab", "b"]
    assert len(index) == 3 and "b" in index


def test_index_remove_and_refile() -> None:
    index: FilterIndex[str] = FilterIndex()
    index.add("x", FIRST)
    index.add("x", ONLY_B)  # filed again: the old filing goes
    assert index.candidates(Update.create([TOPIC], "apple")) == []
    index.remove("x")
    index.remove("x")  # not there: nothing
    index.remove("never")
    assert len(index) == 0 and not index
    assert index.candidates(Update.create([TOPIC], "*")) == []
    index.add("x", None)
    index.add("x", FIRST)
    assert index.candidates(Update.create([TOPIC], "cherry")) == []


def test_candidates_is_a_snapshot_members_may_leave_while_it_is_walked() -> None:
    index: FilterIndex[str] = FilterIndex()
    for name in ("a1", "a2", "a3"):
        index.add(name, FIRST)
    walked = []
    for member in index.candidates(Update.create([TOPIC], "a")):
        walked.append(member)
        index.remove("a2")  # leaves mid-dispatch
        index.add("a4", FIRST)  # joins mid-dispatch
    assert walked == ["a1", "a2", "a3"]
    assert index.candidates(Update.create([TOPIC], "a")) == ["a1", "a3", "a4"]


# -- the watch filters' probes -----------------------------------------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 3),
                    st.sampled_from([0.0, 1.0, 2.5, -1.0]), st.sampled_from(["", "0", "1", "a",
                                                                             "true", "null"]))


@given(scalars, scalars)
def test_json_key_is_equal_exactly_when_values_are_the_same_json(a: JSONValue,
                                                                  b: JSONValue) -> None:
    assert (json_key(a) == json_key(b)) == same_json(a, b)
    if json_key(a) == json_key(b):
        assert hash(json_key(a)) == hash(json_key(b))


def test_objects_and_arrays_match_no_filter_value() -> None:
    assert json_key([1]) == json_key({"a": 1})
    assert all(json_key([1]) not in ChangeFilter.from_params([("f", v)]).filters[0].index_keys()
               for v in ("1", "[1]", "null", "{}"))


values = st.one_of(scalars, st.lists(st.integers(0, 1), max_size=2),
                   st.dictionaries(st.sampled_from(["c"]), st.integers(0, 1), max_size=1))
documents = st.dictionaries(st.sampled_from(["a", "b", "id"]), values, max_size=3).map(
    lambda d: {**d, "n": {"c": d.get("a")}} if "a" in d else d)
params_values = st.sampled_from(["0", "1", "a", "true", "false", "null", "1.0", "[1]", ""])
params = st.lists(st.tuples(st.sampled_from(["a", "b", "id", "n.c", "a.c"]), params_values),
                  max_size=3)
operation_params = st.lists(st.sampled_from(OPERATIONS), max_size=3, unique=True)


@st.composite
def updates(draw: st.DrawFn) -> Update:
    kind = draw(st.sampled_from(["change", "delete", "truncate", "collection", "error",
                                 "junk"]))
    if kind == "change":
        operation = draw(st.sampled_from(["insert", "update", "replace"]))
        return change(operation, draw(documents), {"id": 1})
    if kind == "delete":  # a delete carries only the key
        return change("delete", key=draw(st.dictionaries(st.sampled_from(["id", "a"]),
                                                         scalars, max_size=2)))
    if kind == "truncate":
        return change("truncate")
    if kind == "collection":
        return change(draw(st.sampled_from(["drop", "create", "modify", "invalidate"])))
    if kind == "error":
        return Update.create([TOPIC], json.dumps({"error": "too old"}), type="error")
    data = draw(st.sampled_from(["", "[1]", "not json", '{"operationType": 5}',
                                 '{"operationType": [1]}', '{"operationType": null}',
                                 '{"operationType": "insert", "fullDocument": 3}']))
    return Update.create([TOPIC], data)


def watch_filter(fields: list[tuple[str, str]], operations: list[str]) -> ChangeFilter:
    return ChangeFilter.from_params(
        fields + ([("operationType", ",".join(operations))] if operations else []))


@given(st.lists(st.tuples(params, operation_params), min_size=1, max_size=6),
       st.lists(updates(), min_size=1, max_size=5))
def test_the_index_finds_every_watcher_that_accepts(
        watchers: list[tuple[list[tuple[str, str]], list[str]]], batch: list[Update]) -> None:
    filters = [watch_filter(fields, operations) for fields, operations in watchers]
    index: FilterIndex[int] = FilterIndex()
    for i, flt in enumerate(filters):
        index.add(i, flt.index())
    for update in batch:
        accepted = [i for i, flt in enumerate(filters) if flt.predicate()(update)]
        candidates = index.candidates(update)
        assert len(set(candidates)) == len(candidates)  # each once
        assert set(accepted) <= set(candidates)
        assert [i for i in candidates if filters[i].predicate()(update)] == sorted(
            accepted, key=candidates.index)


def test_a_watcher_with_several_field_filters_is_filed_by_the_first() -> None:
    both = ChangeFilter.from_params([("room", "a"), ("author", "ann")])
    key = both.index()
    assert key is not None and key.probe == FieldProbe(("room",))
    assert key.keys == frozenset({"a"})
    numbers = ChangeFilter.from_params([("n", "5")]).index()
    assert numbers is not None and numbers.keys == frozenset({"5", 5})
    assert ChangeFilter.from_params([("resume_after", "x")]).index() is None
    deletes = ChangeFilter.from_params([("operationType", "delete")]).index()
    assert deletes is not None and deletes.keys == frozenset({"delete"})


def test_probes_answer_everyone_for_truncates_errors_and_collection_events() -> None:
    probe = FieldProbe(("room",))
    assert probe(change("truncate")) is EVERYONE
    assert probe(change("drop")) is EVERYONE
    assert probe(Update.create([TOPIC], "{}", type="error")) is EVERYONE
    assert probe(change("delete", key={"id": 1})) == json_key(None)  # no room: null
    assert probe(change("insert", {"room": "a"})) == "a"
    assert probe(change("insert", {"room": 1.0})) == 1
    assert probe(Update.create([TOPIC], "junk")) not in {None, EVERYONE}


# -- the hub's fan-out through the index -------------------------------------------------


def watch(params: list[tuple[str, str]]) -> dict[str, object]:
    flt = ChangeFilter.from_params(params)
    return {"accept": flt.predicate(), "index": flt.index()}


def datas(events: list[str]) -> list[str]:
    return [json.loads(e).get("fullDocument", json.loads(e)).get("n", "?") for e in events]


@pytest.mark.anyio
async def test_fan_out_delivers_each_watcher_its_changes_in_order() -> None:
    hub = await make_hub()
    async with (hub.connect(sel(TOPIC), None, **watch([("room", "a")])) as room_a,
                hub.connect(sel(TOPIC), None, **watch([("room", "a"), ("n", "2")])) as two,
                hub.connect(sel(TOPIC), None, **watch([("operationType", "delete")])) as dels,
                hub.connect(sel(TOPIC), None, **watch([("id", "9")])) as nine,
                hub.connect(sel(TOPIC), None) as everything):
        sinks = [await live(s) for s in (room_a, two, dels, nine, everything)]
        await hub.publish(change("insert", {"id": 1, "room": "a", "n": 1}))
        await hub.publish(change("insert", {"id": 2, "room": "b", "n": 2}))
        await hub.publish(change("update", {"id": 3, "room": "a", "n": 2}))
        await hub.publish(change("delete", key={"id": 9}, n="deleted 9"))
        await hub.publish(change("truncate", n="truncated"))
        await hub.publish(change("insert", {"id": 4, "room": "a", "n": 4}))
        all_six = await collect(sinks[4], 6)
        assert len(all_six) == 6
        assert datas(await collect(sinks[0], 4)) == [1, 2, "truncated", 4]
        assert datas(await collect(sinks[1], 2)) == [2, "truncated"]
        assert datas(await collect(sinks[2], 1)) == ["deleted 9"]
        assert datas(await collect(sinks[3], 2)) == ["deleted 9", "truncated"]
        await settle()
        assert [len(s.events) for s in sinks] == [4, 2, 1, 2, 6]
    assert not hub._filtered  # unfiled when they left
    await hub.stop()


@pytest.mark.anyio
async def test_a_filtered_watcher_of_two_topics_gets_an_update_once() -> None:
    hub = await make_hub()
    doc_topic = TOPIC + "/1"
    async with hub.connect(sel(TOPIC, doc_topic), None, **watch([("room", "a")])) as sub:
        sink = await live(sub)
        update = change("insert", {"id": 1, "room": "a", "n": 1})
        await hub.publish(Update.create([TOPIC, doc_topic], update.data))
        await hub.publish(change("insert", {"id": 2, "room": "a", "n": 2}))
        assert datas(await collect(sink, 2)) == [1, 2]
    await hub.stop()


@pytest.mark.anyio
async def test_private_changes_reach_only_filtered_watchers_that_may_read_them() -> None:
    hub = await make_hub()
    claims = decode_token(encode_token(KEY.key, subscribe=[TOPIC]), KEY)
    async with (hub.connect(sel(TOPIC), claims, **watch([("room", "a")])) as allowed,
                hub.connect(sel(TOPIC), None, **watch([("room", "a")])) as anonymous):
        allowed_sink, anonymous_sink = await live(allowed), await live(anonymous)
        secret = change("insert", {"id": 1, "room": "a", "n": "secret"})
        await hub.publish(Update.create([TOPIC], secret.data, private=True))
        await hub.publish(change("insert", {"id": 2, "room": "a", "n": "public"}))
        assert datas(await collect(allowed_sink, 2)) == ["secret", "public"]
        assert datas(await collect(anonymous_sink, 1)) == ["public"]
    await hub.stop()


@pytest.mark.anyio
async def test_a_watcher_closed_while_a_change_is_dispatched_gets_nothing_more() -> None:
    hub = await make_hub()
    leaving: list[object] = []

    def closes_the_other(update: Update) -> bool:
        for sub in leaving:
            sub.close(CloseReason.CLIENT_GONE)  # type: ignore[attr-defined]
        return True

    flt = ChangeFilter.from_params([("room", "a")])
    async with (hub.connect(sel(TOPIC), None, accept=closes_the_other,
                            index=flt.index()) as first,
                hub.connect(sel(TOPIC), None, **watch([("room", "a")])) as second,
                hub.connect(sel(TOPIC), None, **watch([("room", "a")])) as third):
        first_sink, second_sink, third_sink = [await live(s) for s in (first, second, third)]
        leaving.append(second)
        await hub.publish(change("insert", {"id": 1, "room": "a", "n": 1}))
        await hub.publish(change("insert", {"id": 2, "room": "a", "n": 2}))
        assert datas(await collect(first_sink, 2)) == [1, 2]
        assert datas(await collect(third_sink, 2)) == [1, 2]
        assert second_sink.events == []
    await hub.stop()
