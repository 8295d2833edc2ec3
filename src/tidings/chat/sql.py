"""The chat's operations as SQL steps, written once for SQLite and PostgreSQL.

Each operation of the store (`store.py`) is a generator: it yields a statement (`Sql`)
and is sent back its `Result`, or yields an update to publish (`Outgoing`, for the
outbox) and is sent back nothing. It never does I/O itself, so one body of logic serves
both databases: the SQLite database (`sqlite_store.py`) drives it on its thread, the
PostgreSQL one (`pg_store.py`) with awaits, each in one transaction of its own. The
updates an operation emits are written to the outbox at its end, just before its commit
(on PostgreSQL under the outbox's order lock: see `pg_store.py`).

Statements are written with `?` placeholders and in the SQL both databases understand
(`ON CONFLICT`, `RETURNING`, `CAST`); `pg` is PostgreSQL's own text where they differ.
"""

from __future__ import annotations

import functools
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from tidings.chat.events import Outgoing

__all__ = ["NO_ROWS", "Kind", "Op", "Result", "Sql", "Steps", "count", "numbered", "pg_only",
           "rows"]

T = TypeVar("T")

# How an operation runs: a write (SQLite's write lock taken at its start; PostgreSQL READ
# COMMITTED), a read that needs one snapshot (SQLite DEFERRED; PostgreSQL REPEATABLE READ,
# read only), a plain read (statements of their own), or a write that is one call of a
# PostgreSQL function (`chat_post`, `chat_relay_step`): one statement, its own
# transaction, one round trip with no BEGIN or COMMIT.
Kind = Literal["write", "snapshot", "read", "call"]


@dataclass(frozen=True, slots=True)
class Sql:
    text: str  # `?` placeholders; "": nothing to do on SQLite
    args: tuple[object, ...] = ()
    pg: str | None = None  # PostgreSQL's text, when it differs
    returns_rows: bool = True  # False: only the count of rows it changed matters

    def for_pg(self) -> str:
        return numbered(self.pg if self.pg is not None else self.text)


@dataclass(frozen=True, slots=True)
class Result:
    rows: Sequence[Sequence[object]]
    count: int  # rows changed (statements that do not return rows)

    def first(self) -> Sequence[object] | None:
        return self.rows[0] if self.rows else None

    def value(self) -> object:
        """The first column of the first row (a SELECT without FROM, an aggregate)."""
        row = self.first()
        return None if row is None else row[0]


# An operation: yields statements (answered with their Result) and updates for the outbox
# (answered with an empty Result), returns its value.
Op = Generator[Sql | Outgoing, Result, T]

NO_ROWS = Result((), 0)


class Steps(Generic[T]):
    """Drives an operation for a database: `send` the result of the statement it asked
    for (None to start) and get the next one, or None once it returned (`value`). The
    updates it emits meanwhile collect in `emitted`."""

    def __init__(self, op: Op[T]) -> None:
        self._op = op
        self.emitted: list[Outgoing] = []
        self._value: tuple[T] | None = None

    def send(self, reply: Result | None) -> Sql | None:
        try:
            step = next(self._op) if reply is None else self._op.send(reply)
            while isinstance(step, Outgoing):
                self.emitted.append(step)
                step = self._op.send(NO_ROWS)
        except StopIteration as stop:
            self._value = (stop.value,)
            return None
        return step

    @property
    def value(self) -> T:
        if self._value is None:
            raise RuntimeError("the operation has not returned")
        return self._value[0]


def rows(text: str, *args: object, pg: str | None = None) -> Sql:
    """A statement whose rows the operation reads."""
    return Sql(text, args, pg)


def count(text: str, *args: object, pg: str | None = None) -> Sql:
    """A statement whose changed-row count the operation reads (or ignores)."""
    return Sql(text, args, pg, returns_rows=False)


def pg_only(text: str, *args: object) -> Sql:
    """A statement only PostgreSQL runs (SQLite answers no rows)."""
    return Sql("", args, text)


@functools.lru_cache(maxsize=512)
def numbered(text: str) -> str:
    """`?` placeholders as PostgreSQL's `$1`, `$2`... (the chat's SQL has no `?` in a
    literal)."""
    parts = text.split("?")
    out = [parts[0]]
    for i, part in enumerate(parts[1:], start=1):
        out.append(f"${i}{part}")
    return "".join(out)
