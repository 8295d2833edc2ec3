"""Subscribers' server-side filters, indexed so that fan-out asks only those that can match.

A subscriber may carry a filter on top of its topic selectors (the collections' watch
endpoint: `?status=open`, `?operationType=delete`): `accept(update)` decides, exactly.
Asking every filtered subscriber of a topic about every update costs one test per
subscriber per update (a few microseconds each in Python: 100 watchers of a collection
cap it near 3,000 changes a second), so a filter may also say where it can match, with an
`IndexKey`:

- a *probe*: a function of the update, hashable and equal for every filter that looks at
  the same thing (the field `status`, the operation type), so fan-out runs it once per
  update for all of them;
- the *keys* it accepts: the values the probe may answer for an update it accepts.

A probe answers a key, or `EVERYONE` when it cannot narrow (an event about the stream or
the collection itself, which every filter lets through). The promise a filter makes:
whenever `accept(update)` holds, its probe answers `EVERYONE` or one of its keys. So the
index only ever skips subscribers that would have refused the update; `accept` still
decides for each candidate. Probes, like `accept`, are cheap and never raise.

`FilterIndex` is that index for one topic: pure, no I/O, its members any hashable value
(the hub's are subscribers). tests/unit/test_filters.py covers it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from tidings.hub.update import Update

__all__ = ["EVERYONE", "Everyone", "FilterIndex", "IndexKey", "Probe"]


class Everyone(enum.Enum):
    EVERYONE = "everyone"


# A probe's answer for an update that every filter of the probe must see (and decide on).
EVERYONE: Final = Everyone.EVERYONE

# A function of an update: a key, or EVERYONE. Hashable; equal probes are one probe.
Probe = Callable[[Update], Hashable]

M = TypeVar("M", bound=Hashable)


@dataclass(frozen=True, slots=True)
class IndexKey:
    """Where a filter can match: it accepts an update only if `probe(update)` is EVERYONE
    or one of `keys`."""

    probe: Probe
    keys: frozenset[Hashable]


class _ProbeTable(Generic[M]):
    """The members filed under one probe: all of them, and by each key they accept."""

    __slots__ = ("by_key", "members")

    def __init__(self) -> None:
        self.members: dict[M, None] = {}
        self.by_key: dict[Hashable, dict[M, None]] = {}


class FilterIndex(Generic[M]):
    """The filtered members of one topic, filed by their `IndexKey` (None: asked about
    every update). `candidates(update)` is the members that may accept it, each once, as a
    new list: members added or removed while the caller walks it change later calls only.
    Dicts serve as ordered sets, so candidates come in the order they were added."""

    __slots__ = ("_filed", "_probes", "_unindexed")

    def __init__(self) -> None:
        self._unindexed: dict[M, None] = {}
        self._probes: dict[Probe, _ProbeTable[M]] = {}
        self._filed: dict[M, IndexKey | None] = {}

    def __len__(self) -> int:
        return len(self._filed)

    def __contains__(self, member: object) -> bool:
        return member in self._filed

    def add(self, member: M, key: IndexKey | None) -> None:
        """File `member` (again: its old filing goes)."""
        self.remove(member)
        self._filed[member] = key
        if key is None:
            self._unindexed[member] = None
            return
        table = self._probes.get(key.probe)
        if table is None:
            table = self._probes[key.probe] = _ProbeTable()
        table.members[member] = None
        for value in key.keys:
            table.by_key.setdefault(value, {})[member] = None

    def remove(self, member: M) -> None:
        """Unfile `member`; nothing when it is not here."""
        if member not in self._filed:
            return
        key = self._filed.pop(member)
        if key is None:
            del self._unindexed[member]
            return
        table = self._probes[key.probe]
        del table.members[member]
        if not table.members:
            del self._probes[key.probe]
            return
        for value in key.keys:
            bucket = table.by_key[value]
            del bucket[member]
            if not bucket:
                del table.by_key[value]

    def candidates(self, update: Update) -> list[M]:
        """The members that may accept `update`: each probe runs once."""
        found = list(self._unindexed)
        for probe, table in self._probes.items():
            answer = probe(update)
            if answer is EVERYONE:
                found.extend(table.members)
            else:
                bucket = table.by_key.get(answer)
                if bucket:
                    found.extend(bucket)
        return found
