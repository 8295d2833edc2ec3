"""The `pgoutput` logical decoding protocol (version 1), parsed into row changes.

`pg_logical_slot_peek_binary_changes(slot, upto, NULL, 'proto_version', '1',
'publication_names', PUB, 'messages', 'true')` returns one message per row: `B`egin,
`R`elation (before a relation's first change in each call), `I`nsert, `U`pdate,
`D`elete, `T`runcate, `M`essage (`pg_logical_emit_message`), `C`ommit, and a few this
module skips (`O`rigin, t`Y`pe). Column values come as the text of the type's output
function, or NULL, or "unchanged TOAST" (an UPDATE that did not touch a large value:
then the old row's value, which REPLICA IDENTITY FULL always sends).

Pure: bytes in, `Decoded` out; `decoding.py` turns them into change-log rows.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

__all__ = ["Change", "Decoded", "Relation", "decode"]

_EPOCH_2000 = datetime(2000, 1, 1, tzinfo=UTC)
# A column of an UPDATE's new row that did not change and is stored out of line.
UNCHANGED = object()


@dataclass(frozen=True, slots=True)
class Relation:
    schema: str
    name: str
    columns: tuple[str, ...]


Row = dict[str, str | None]


@dataclass(slots=True)
class Change:
    """One row change (or a TRUNCATE of one table) of one committed transaction."""

    xid: int  # 32 bits, as the WAL has it
    lsn: int  # of the change's record; several share one (COPY's multi-inserts)
    order: int  # 0, 1, ... among this transaction's changes with the same lsn
    commit_lsn: int  # where its transaction's commit record starts
    commit_time: datetime
    relation: Relation
    op: str  # insert, update, delete, truncate (replace: `pg_logical_emit_message`)
    old: Row | None
    new: Row | None


@dataclass(slots=True)
class Decoded:
    changes: list[Change] = field(default_factory=list)
    relations: dict[int, Relation] = field(default_factory=dict)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def take(self, fmt: str) -> int:
        (value,) = struct.unpack_from(fmt, self.data, self.at)
        self.at += struct.calcsize(fmt)
        return int(value)

    def byte(self) -> str:
        value = chr(self.data[self.at])
        self.at += 1
        return value

    def string(self) -> str:
        end = self.data.index(b"\0", self.at)
        text = self.data[self.at:end].decode()
        self.at = end + 1
        return text

    def raw(self, length: int) -> bytes:
        value = self.data[self.at:self.at + length]
        self.at += length
        return value

    def tuple(self, relation: Relation) -> list[object]:
        values: list[object] = []
        for _ in range(self.take("!h")):
            kind = self.byte()
            if kind == "n":
                values.append(None)
            elif kind == "u":
                values.append(UNCHANGED)
            elif kind == "t":
                values.append(self.raw(self.take("!i")).decode())
            else:
                raise ValueError(f"pgoutput: unexpected column kind {kind!r}")
        if len(values) != len(relation.columns):
            raise ValueError(f"pgoutput: {relation.name} has {len(relation.columns)} "
                             f"columns, a row {len(values)}")
        return values


def _row(relation: Relation, values: list[object], old: Row | None) -> Row:
    row: Row = {}
    for column, value in zip(relation.columns, values, strict=True):
        if value is UNCHANGED:
            row[column] = None if old is None else old.get(column)
        else:
            row[column] = value if isinstance(value, str) else None
    return row


def _time(micros: int) -> datetime:
    return _EPOCH_2000 + timedelta(microseconds=micros)


def decode(messages: list[tuple[int, bytes]], relations: dict[int, Relation],
           *, prefix: str) -> Decoded:
    """The row changes in `messages` ((lsn, data) rows of a peek), in order. `relations`
    (by oid) carries over from earlier calls; the result's holds them and any new.
    A transactional message with `prefix` whose content is `replace` marks the change
    before it in its transaction as a replace."""
    out = Decoded(relations=dict(relations))
    xid = commit_lsn = 0
    commit_time = _EPOCH_2000
    last_lsn, order = -1, 0

    def add(lsn: int, relation: Relation, op: str, old: Row | None, new: Row | None) -> None:
        nonlocal last_lsn, order
        order = order + 1 if lsn == last_lsn else 0
        last_lsn = lsn
        out.changes.append(Change(xid, lsn, order, commit_lsn, commit_time, relation, op,
                                  old, new))

    for lsn, data in messages:
        reader = _Reader(bytes(data))
        kind = reader.byte()
        if kind == "B":
            commit_lsn = reader.take("!q")
            commit_time = _time(reader.take("!q"))
            xid = reader.take("!I")
            last_lsn, order = -1, 0
        elif kind == "R":
            oid = reader.take("!I")
            schema, name = reader.string(), reader.string()
            reader.byte()  # replica identity
            columns = []
            for _ in range(reader.take("!h")):
                reader.byte()  # flags
                columns.append(reader.string())
                reader.take("!I")  # type
                reader.take("!i")  # typmod
            out.relations[oid] = Relation(schema, name, tuple(columns))
        elif kind in "IUD":
            relation = out.relations[reader.take("!I")]
            old: Row | None = None
            new: Row | None = None
            part = reader.byte()
            if part in "KO":
                old = _row(relation, reader.tuple(relation), None)
                if kind == "U":
                    part = reader.byte()
            if part == "N":
                new = _row(relation, reader.tuple(relation), old)
            add(lsn, relation, {"I": "insert", "U": "update", "D": "delete"}[kind], old, new)
        elif kind == "T":
            count = reader.take("!i")
            reader.byte()  # options (CASCADE, RESTART IDENTITY)
            for _ in range(count):
                add(lsn, out.relations[reader.take("!I")], "truncate", None, None)
        elif kind == "M":
            transactional = reader.byte() == "\x01"
            reader.take("!q")
            if (transactional and reader.string() == prefix
                    and reader.raw(reader.take("!i")) == b"replace" and out.changes
                    and out.changes[-1].xid == xid and out.changes[-1].op == "update"):
                out.changes[-1].op = "replace"
        # C(ommit), O(rigin), Y (type): nothing to keep.
    return out
