"""The chat's operations as SQL steps (`chat/sql.py`), driven without a database: the
placeholders PostgreSQL gets, and what a driver sees of an operation."""

from __future__ import annotations

import pytest

from tidings.chat.events import Outgoing
from tidings.chat.sql import NO_ROWS, Op, Result, Sql, Steps, count, numbered, pg_only, rows


def test_placeholders_are_numbered_for_postgresql() -> None:
    assert numbered("SELECT 1") == "SELECT 1"
    assert numbered("INSERT INTO t VALUES (?, ?, ?)") == "INSERT INTO t VALUES ($1, $2, $3)"
    sql = rows("SELECT a FROM t WHERE b = ? AND c IN (?, ?)", 1, 2, 3)
    assert sql.for_pg() == "SELECT a FROM t WHERE b = $1 AND c IN ($2, $3)"
    assert rows("X ?", 1, pg="Y ? ?").for_pg() == "Y $1 $2"
    assert pg_only("LOCK TABLE t").text == "" and pg_only("LOCK TABLE t").for_pg() == (
        "LOCK TABLE t")
    assert not count("DELETE FROM t").returns_rows and rows("SELECT 1").returns_rows


def _op() -> Op[str]:
    first = yield rows("SELECT ?", 1)
    yield Outgoing("/a", "one")
    changed = yield count("UPDATE t SET x = ?", first.value())
    yield Outgoing("/b", "two")
    yield Outgoing("/c", "three")
    return f"{first.value()}:{changed.count}"


def test_a_driver_sees_the_statements_and_collects_the_updates_in_order() -> None:
    steps = Steps(_op())
    asked: list[Sql] = []
    sql = steps.send(None)
    replies = iter([Result(((7,),), 0), Result((), 3)])
    while sql is not None:
        asked.append(sql)
        sql = steps.send(next(replies))
    assert [s.text for s in asked] == ["SELECT ?", "UPDATE t SET x = ?"]
    assert asked[1].args == (7,)
    assert [(o.topic, o.data) for o in steps.emitted] == [("/a", "one"), ("/b", "two"),
                                                         ("/c", "three")]
    assert steps.value == "7:3"


def test_an_operation_that_raises_raises_to_its_driver() -> None:
    def failing() -> Op[None]:
        yield rows("SELECT 1")
        raise LookupError("no such thing")

    steps = Steps(failing())
    assert steps.send(None) is not None
    with pytest.raises(LookupError):
        steps.send(NO_ROWS)
    with pytest.raises(RuntimeError):
        _ = Steps(failing()).value  # never ran
