"""Query parameters of the collections API, parsed into values (no SQL, no HTTP).

    GET /api/collections/NAME?username=alice&limit=50&sort=-updated_at&cursor=...
    GET /api/collections/NAME/changes?operationType=insert,update&username=alice

Any parameter that is not reserved is an equality filter on a document field (dotted for
nested fields: `address.city=Paris`). The value matches as the string given and, when it
reads as a JSON number, boolean or null, as that too: `?n=5` matches 5 and "5",
`?done=true` matches true; `?tag=null` matches null and a missing field.
"""

from __future__ import annotations

import base64
import binascii
import enum
import functools
import json
import math
import re
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final, cast

from tidings.errors import BadRequest
from tidings.feeds.events import OPERATIONS, JSONValue, Operation, same_json
from tidings.hub.filters import EVERYONE, IndexKey
from tidings.hub.update import Update

__all__ = [
    "RESERVED_PARAMS",
    "ChangeFilter",
    "FieldFilter",
    "FieldProbe",
    "ListQuery",
    "decode_cursor",
    "encode_cursor",
    "json_key",
]

# Parameters with a meaning of their own (the rest filter on fields).
RESERVED_PARAMS = frozenset({
    "limit", "cursor", "sort", "resume_after", "operationType",
    "authorization", "lastEventID", "last_event_id",
})
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
_SEGMENT = re.compile(r"[^\x00-\x1f\"\\.]{1,128}")
_MAX_FILTERS = 20
# Numbers a database binds as they are: SQLite's INTEGER (and PostgreSQL's bigint) is a
# signed 64-bit integer, and neither stores an infinite float as JSON.
MIN_INT, MAX_INT = -(2**63), 2**63 - 1
_OBJECT_ID = re.compile(r"[0-9a-f]{24}")
_INT_RANGE = f"from {MIN_INT} to {MAX_INT}"
# Fan-out asks every filtered watcher of a collection about the same update in a row:
# parse its data once for all of them (small events only, so the cache stays small).
_CACHED_EVENT_SIZE = 64 << 10


def _parse_event(data: str) -> Mapping[str, JSONValue] | None:
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return cast(Mapping[str, JSONValue], value) if isinstance(value, dict) else None


_parse_event_cached = functools.lru_cache(maxsize=64)(_parse_event)


def _event_of(update: Update) -> Mapping[str, JSONValue] | None:
    data = update.data
    return _parse_event_cached(data) if len(data) <= _CACHED_EVENT_SIZE else _parse_event(data)


@dataclass(frozen=True, slots=True)
class FieldFilter:
    """`field == value`, with the value's candidate readings (see the module doc)."""

    path: tuple[str, ...]
    values: tuple[JSONValue, ...]

    @classmethod
    def parse(cls, name: str, raw: str) -> FieldFilter:
        path = tuple(name.split("."))
        if not all(_SEGMENT.fullmatch(segment) for segment in path):
            raise BadRequest(f"bad field name {name[:80]!r} in a filter")
        values: list[JSONValue] = [raw]
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = raw
        if isinstance(parsed, int) and not isinstance(parsed, bool) and not (
                MIN_INT <= parsed <= MAX_INT):
            raise BadRequest(f"the number in the filter on {name[:80]!r} is out of range: "
                             f"a whole number filters {_INT_RANGE}")
        if isinstance(parsed, float) and not math.isfinite(parsed):
            parsed = raw  # "1e400": no document holds that number, only the string
        if parsed is None or (isinstance(parsed, bool | int | float | str) and not (
                isinstance(parsed, str) and parsed == raw)):
            values.append(cast(JSONValue, parsed))
        return cls(path, tuple(values))

    @property
    def field(self) -> str:
        return ".".join(self.path)

    @property
    def matches_null(self) -> bool:
        return any(v is None for v in self.values)

    def matches(self, document: Mapping[str, JSONValue]) -> bool:
        value = _lookup(document, self.path)
        return any(same_json(value, candidate) for candidate in self.values)

    def index_keys(self) -> frozenset[Hashable]:
        """The `json_key`s of the values this filter matches (`FieldProbe`'s keys)."""
        return frozenset(json_key(value) for value in self.values)


def _lookup(document: Mapping[str, JSONValue], path: tuple[str, ...]) -> JSONValue:
    """The value at `path`; None (as null) when a field on the way is missing."""
    value: JSONValue = cast(JSONValue, document)
    for segment in path:
        if not isinstance(value, dict) or segment not in value:
            return None
        value = value[segment]
    return value


class _NoOne(enum.Enum):
    NO_ONE = "no one"


# A probe's answer for an update no filter accepts (it is not a change event), and the
# key of a field holding an object or an array, which no filter value equals: a key no
# filter is filed under.
_NO_ONE: Final = _NoOne.NO_ONE


def json_key(value: JSONValue) -> Hashable:
    """A dict key for a JSON scalar: equal exactly when the values are `same_json`
    (`true` is not `1`, `1` is `1.0`, "1" is neither). Objects and arrays, which no
    filter value is, all get one key that no filter files under."""
    if isinstance(value, bool):
        return (bool, value)  # True == 1 in Python: kept apart from the numbers
    if value is None or isinstance(value, int | float | str):
        return value  # 1 == 1.0 with one hash; "1" != 1; None is itself
    return _NO_ONE


def _filters(params: Iterable[tuple[str, str]]) -> tuple[FieldFilter, ...]:
    out = tuple(FieldFilter.parse(name, value) for name, value in params
                if name not in RESERVED_PARAMS)
    if len(out) > _MAX_FILTERS:
        raise BadRequest(f"at most {_MAX_FILTERS} field filters")
    return out


def encode_cursor(sort: str, descending: bool, value: JSONValue, key: JSONValue) -> str:
    raw = json.dumps([sort, descending, value, key], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(text: str) -> tuple[str, bool, JSONValue, JSONValue]:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        sort, descending, value, key = json.loads(raw)
    except (ValueError, TypeError, binascii.Error):
        raise BadRequest("malformed cursor") from None
    if not isinstance(sort, str) or not isinstance(descending, bool) or not (
            _bindable(value) and _bindable(key)):
        raise BadRequest("malformed cursor")
    return sort, descending, value, key


def _bindable(value: object) -> bool:
    """A value a cursor may carry: what a list page ends on (a sort value or a key), which
    the database takes back as a query parameter."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return True
    if isinstance(value, dict):  # MongoDB's ObjectId, as the MongoDB feed writes it
        oid = value.get("$oid")
        return len(value) == 1 and isinstance(oid, str) and _OBJECT_ID.fullmatch(oid) is not None
    if isinstance(value, int):
        return MIN_INT <= value <= MAX_INT
    return isinstance(value, float) and math.isfinite(value)


@dataclass(frozen=True, slots=True)
class ListQuery:
    """One page request: filters, page size, sort field and direction, and where the
    previous page ended (`after`: the last document's sort value and key)."""

    filters: tuple[FieldFilter, ...] = ()
    limit: int = DEFAULT_LIMIT
    sort: str = ""  # "": the collection's default (created_at, or the key for tables)
    descending: bool = False
    after: tuple[JSONValue, JSONValue] | None = None

    @classmethod
    def from_params(cls, params: Iterable[tuple[str, str]]) -> ListQuery:
        params = list(params)
        given = dict(params)
        limit = DEFAULT_LIMIT
        if "limit" in given:
            text = given["limit"]
            if (not (text.isascii() and text.isdigit()) or len(text) > len(str(MAX_LIMIT))
                    or not 1 <= int(text) <= MAX_LIMIT):
                raise BadRequest(f"limit must be a whole number from 1 to {MAX_LIMIT}")
            limit = int(text)
        sort = given.get("sort", "")
        descending = sort.startswith("-")
        sort = sort.removeprefix("-")
        after = None
        if given.get("cursor"):
            cursor_sort, cursor_desc, value, key = decode_cursor(given["cursor"])
            if "sort" in given and (cursor_sort, cursor_desc) != (sort, descending):
                raise BadRequest("the cursor belongs to a list in another order")
            sort, descending, after = cursor_sort, cursor_desc, (value, key)
        return cls(_filters(params), limit, sort, descending, after)

    def sql_after(self) -> tuple[JSONValue, JSONValue] | None:
        """`after` for a SQL backend, whose keys and sort values are never ObjectIds."""
        if self.after is not None and any(isinstance(v, dict) for v in self.after):
            raise BadRequest("malformed cursor")
        return self.after

    def cursor_after(self, sort: str, value: JSONValue, key: JSONValue) -> str:
        return encode_cursor(sort, self.descending, value, key)


@dataclass(frozen=True, slots=True)
class ChangeFilter:
    """The watch endpoint's server-side filter, `collection.watch(pipeline)` lite:
    operation types, and field equalities on the document after the change (for a delete,
    on its documentKey, the only fields a delete carries; a truncate, which removed every
    document, matches any)."""

    operations: frozenset[Operation] = frozenset(OPERATIONS)
    filters: tuple[FieldFilter, ...] = ()

    @classmethod
    def from_params(cls, params: Iterable[tuple[str, str]]) -> ChangeFilter:
        params = list(params)
        operations: set[Operation] = set()
        for name, value in params:
            if name != "operationType":
                continue
            for op in value.split(","):
                if op.strip() not in OPERATIONS:
                    raise BadRequest(
                        f"operationType must be among {', '.join(OPERATIONS)} (got {op!r})")
                operations.add(cast(Operation, op.strip()))
        return cls(frozenset(operations or OPERATIONS), _filters(params))

    @property
    def everything(self) -> bool:
        return not self.filters and len(self.operations) == len(OPERATIONS)

    def predicate(self) -> Callable[[Update], bool]:
        """The filter as the hub's per-subscriber `accept`: cheap, and it never raises."""

        def accept(update: Update) -> bool:
            if update.type == "error":  # about the stream itself: every watcher needs it
                return True
            event = _event_of(update)
            return event is not None and self.accepts(event)

        return accept

    def index(self) -> IndexKey | None:
        """Where `predicate()` can match, for the hub's filter index (hub/filters.py): by
        the first field filter's value, else by operation type; None for no filter."""
        if self.filters:
            first = self.filters[0]
            return IndexKey(FieldProbe(first.path), first.index_keys())
        if self.everything:
            return None
        return IndexKey(_OPERATION_PROBE, frozenset(self.operations))

    def accepts(self, event: Mapping[str, JSONValue]) -> bool:
        operation = event.get("operationType")
        if isinstance(operation, str) and operation not in OPERATIONS:
            return True  # create, modify, drop, invalidate: about the collection itself
        if not isinstance(operation, str) or operation not in self.operations:
            return False
        if not self.filters or operation == "truncate":  # it removed the matching ones too
            return True
        document = _filtered_document(event)
        return document is not None and all(f.matches(document) for f in self.filters)


def _filtered_document(event: Mapping[str, JSONValue]) -> Mapping[str, JSONValue] | None:
    """What field filters look at: the document after the change, or for a delete its
    documentKey (the only fields a delete carries)."""
    document = event.get("fullDocument")
    if not isinstance(document, dict):
        document = event.get("documentKey")
    return document if isinstance(document, dict) else None


def _change_of(update: Update) -> Mapping[str, JSONValue] | Hashable:
    """What every probe answers first, as `ChangeFilter.accepts` decides: EVERYONE for an
    error about the stream or an event about the collection itself (create, drop...),
    _NO_ONE for what is not a change event; else the change event itself."""
    if update.type == "error":
        return EVERYONE
    event = _event_of(update)
    if event is None:
        return _NO_ONE
    operation = event.get("operationType")
    if not isinstance(operation, str):
        return _NO_ONE
    return event if operation in OPERATIONS else EVERYONE


@dataclass(frozen=True, slots=True)
class FieldProbe:
    """The hub's probe for field filters on `path` (`ChangeFilter.index`): the `json_key`
    of the value at `path` in the change's document; EVERYONE for a truncate (it removed
    the matching documents too) and what `_change_of` lets every filter see."""

    path: tuple[str, ...]

    def __call__(self, update: Update) -> Hashable:
        event = _change_of(update)
        if not isinstance(event, Mapping):
            return event
        if event.get("operationType") == "truncate":
            return EVERYONE
        document = _filtered_document(event)
        return _NO_ONE if document is None else json_key(_lookup(document, self.path))


@dataclass(frozen=True, slots=True)
class _OperationProbe:
    """The hub's probe for filters on operation types alone: the change's operation."""

    def __call__(self, update: Update) -> Hashable:
        event = _change_of(update)
        if not isinstance(event, Mapping):
            return event
        return event.get("operationType")


_OPERATION_PROBE: Final = _OperationProbe()
