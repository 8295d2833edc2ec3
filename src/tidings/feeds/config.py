"""The collections configuration: which tables Tidings watches and who may read and write.

A TOML or JSON file given by `--config`:

    [collections.messages]          # a managed collection: JSON documents Tidings stores
    schema = { type = "object", required = ["username", "content"] }   # optional
    read = "public"                 # "private" (the default): a subscribe claim is needed
    write = "publisher"             # the default; or "anyone", or "none" (read-only API)

    [tables.orders]                 # an existing table of your own schema, watched as is
    key = "id"                      # default: its single-column primary key, else rowid
    read = "private"

Tables can also be watched with `tidings watch TABLE` (recorded in the database); the file
wins for a table named in both. Defaults are the safe ones: updates are private (a reader
needs a JWT whose subscribe claim matches `/collections/NAME`), and writes through the API
need a publisher token whose publish claim matches `/collections/NAME`.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import jsonschema
import jsonschema.validators

from tidings.feeds.errors import ConfigError, SchemaViolation
from tidings.feeds.events import JSONObject, JSONValue

__all__ = [
    "METADATA_FIELDS",
    "CollectionConfig",
    "FeedConfig",
    "check_document_id",
    "load_config",
    "own_fields",
    "parse_config",
    "validate_name",
]

Kind = Literal["managed", "table"]
ReadRule = Literal["public", "private"]
WriteRule = Literal["publisher", "anyone", "none"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
# Tables Tidings (or SQLite) keeps for itself in the same file.
_RESERVED_PREFIXES = ("sqlite_", "tidings_")
_RESERVED_NAMES = frozenset({"updates"})
# Fields every managed document has; the API sets them, a schema never sees them.
METADATA_FIELDS = ("id", "created_at", "updated_at")
MAX_ID_LENGTH = 256


def validate_name(name: str, what: str = "collection") -> str:
    """A name usable as a table and in a topic; ConfigError otherwise."""
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"{what} name {name!r} must be letters, digits and _ (not first), at most 63"
        )
    lowered = name.lower()
    if lowered in _RESERVED_NAMES or lowered.startswith(_RESERVED_PREFIXES):
        raise ConfigError(f"{what} name {name!r} is reserved for Tidings' own tables")
    return name


def check_document_id(value: object) -> str:
    """A document id given by a client: a string usable in a URL path segment and a topic
    (`changes` is the watch endpoint's); SchemaViolation (422) otherwise. The same rule
    for every database."""
    if (not isinstance(value, str) or not value or len(value) > MAX_ID_LENGTH
            or any(ord(c) < 0x20 for c in value) or value == "changes"):
        raise SchemaViolation("the id is not usable", [{
            "field": "id",
            "message": f"id must be a non-empty string of at most {MAX_ID_LENGTH} "
                       "characters, without control characters, and not 'changes'",
        }])
    return value


def own_fields(document: Mapping[str, JSONValue]) -> JSONObject:
    """A document without its metadata fields (the API sets those, not the client)."""
    return {k: v for k, v in document.items() if k not in METADATA_FIELDS}


@dataclass(frozen=True, slots=True)
class CollectionConfig:
    name: str
    kind: Kind = "managed"
    key: str = "id"  # the documentKey field (a column for tables; "rowid" is allowed)
    read: ReadRule = "private"
    write: WriteRule = "publisher"
    schema: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)
    _validator: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.schema is not None and self._validator is None:
            cls = jsonschema.validators.validator_for(self.schema)
            try:
                cls.check_schema(dict(self.schema))
            except jsonschema.SchemaError as exc:
                raise ConfigError(
                    f"collection {self.name!r}: invalid JSON Schema: {exc.message}"
                ) from None
            object.__setattr__(self, "_validator", cls(self.schema))

    @property
    def private(self) -> bool:
        return self.read == "private"

    @property
    def topic(self) -> str:
        return f"/collections/{self.name}"

    @property
    def writable(self) -> bool:
        return self.kind == "managed" and self.write != "none"

    def validate(self, document: Mapping[str, object]) -> None:
        """Check a document's own fields (not id, created_at, updated_at) against the
        schema; SchemaViolation (422) lists every failing field."""
        if self._validator is None:
            return
        own = {k: v for k, v in document.items() if k not in METADATA_FIELDS}
        problems: list[dict[str, str]] = []
        for error in sorted(self._validator.iter_errors(own), key=lambda e: list(e.path)):
            path = [str(p) for p in error.absolute_path]
            if error.validator == "required" and isinstance(error.instance, dict):
                missing = [p for p in error.validator_value if p not in error.instance]
                for name in missing:
                    problems.append({"field": ".".join([*path, str(name)]),
                                     "message": f"{name!r} is required"})
                continue
            problems.append({"field": ".".join(path), "message": error.message})
        if problems:
            fields = ", ".join(sorted({p["field"] or "(document)" for p in problems}))
            raise SchemaViolation(f"the document does not match the schema: {fields}",
                                  problems)


@dataclass(frozen=True, slots=True)
class FeedConfig:
    collections: Mapping[str, CollectionConfig] = field(default_factory=dict)

    def merged(self, watched: list[CollectionConfig]) -> FeedConfig:
        """This configuration plus tables watched with `tidings watch` (the file wins)."""
        out = dict(self.collections)
        lowered = {name.lower() for name in out}
        for table in watched:
            if table.name.lower() not in lowered:
                out[table.name] = table
        return FeedConfig(out)


def _choice(value: object, allowed: tuple[str, ...], where: str) -> str:
    if value not in allowed:
        raise ConfigError(f"{where} must be one of {', '.join(allowed)} (got {value!r})")
    return str(value)


def _section(data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    section = data.get(name, {})
    if not isinstance(section, dict):
        raise ConfigError(f"[{name}] must be a table of collections")
    return section


def parse_config(data: Mapping[str, Any]) -> FeedConfig:
    """Build a FeedConfig from the parsed file (ConfigError on anything unexpected)."""
    unknown = set(data) - {"collections", "tables"}
    if unknown:
        raise ConfigError(f"unknown configuration sections: {', '.join(sorted(unknown))}")
    out: dict[str, CollectionConfig] = {}
    seen: set[str] = set()
    for kind, section in (("managed", "collections"), ("table", "tables")):
        for name, options in _section(data, section).items():
            where = f"[{section}.{name}]"
            validate_name(name, "table" if kind == "table" else "collection")
            if name.lower() in seen:
                raise ConfigError(f"{where}: the name is configured twice")
            seen.add(name.lower())
            if not isinstance(options, dict):
                raise ConfigError(f"{where} must be a table of options")
            allowed = {"schema", "read", "write"} if kind == "managed" else {"key", "read"}
            extra = set(options) - allowed
            if extra:
                raise ConfigError(f"{where}: unknown options {', '.join(sorted(extra))}")
            read = _choice(options.get("read", "private"), ("public", "private"),
                           f"{where} read")
            if kind == "managed":
                write = _choice(options.get("write", "publisher"),
                                ("publisher", "anyone", "none"), f"{where} write")
                schema = options.get("schema")
                if schema is not None and not isinstance(schema, dict):
                    raise ConfigError(f"{where} schema must be a JSON Schema object")
                out[name] = CollectionConfig(
                    name, "managed", "id", cast(ReadRule, read), cast(WriteRule, write),
                    schema,
                )
            else:
                key = options.get("key", "")
                if not isinstance(key, str):
                    raise ConfigError(f"{where} key must be a column name")
                out[name] = CollectionConfig(name, "table", key, cast(ReadRule, read), "none")
    return FeedConfig(out)


def load_config(path: str | Path) -> FeedConfig:
    """Read a `.toml` or `.json` configuration file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the configuration {path}: {exc.strerror}") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the configuration must be an object")
    return parse_config(data)
