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
import functools
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import cast

from tidings.errors import BadRequest
from tidings.feeds.events import OPERATIONS, JSONValue, Operation, same_json
from tidings.hub.update import Update

__all__ = [
    "RESERVED_PARAMS",
    "ChangeFilter",
    "FieldFilter",
    "ListQuery",
    "decode_cursor",
    "encode_cursor",
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
        value: JSONValue = cast(JSONValue, document)
        for segment in self.path:
            if not isinstance(value, dict) or segment not in value:
                return self.matches_null  # a missing field reads as null
            value = value[segment]
        return any(same_json(value, candidate) for candidate in self.values)


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
    if not isinstance(sort, str) or not isinstance(descending, bool):
        raise BadRequest("malformed cursor")
    return sort, descending, value, key


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
            if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_LIMIT:
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

    def cursor_after(self, sort: str, value: JSONValue, key: JSONValue) -> str:
        return encode_cursor(sort, self.descending, value, key)


@dataclass(frozen=True, slots=True)
class ChangeFilter:
    """The watch endpoint's server-side filter, `collection.watch(pipeline)` lite:
    operation types, and field equalities on the document after the change (for a delete,
    on its documentKey, the only fields a delete carries)."""

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
            data = update.data
            event = (_parse_event_cached(data) if len(data) <= _CACHED_EVENT_SIZE
                     else _parse_event(data))
            return event is not None and self.accepts(event)

        return accept

    def accepts(self, event: Mapping[str, JSONValue]) -> bool:
        if event.get("operationType") not in self.operations:
            return False
        if not self.filters:
            return True
        document = event.get("fullDocument")
        if not isinstance(document, dict):
            document = event.get("documentKey")
        if not isinstance(document, dict):
            return False
        return all(f.matches(document) for f in self.filters)
