"""The collections configuration: which tables Tidings watches and who may read and write.

A TOML or JSON file given by `--config`:

    [collections.messages]          # a managed collection: JSON documents Tidings stores
    schema = { type = "object", required = ["username", "content"] }   # optional
    read = "public"                 # "private" (the default): a subscribe claim is needed
    write = "publisher"             # the default; or "anyone", or "none" (read-only API)

    [tables.orders]                 # an existing table of your own schema, watched as is
    key = "id"                      # default: its single-column primary key, else rowid
    read = "private"

    [mongodb]                       # collections of a MongoDB database, watched as is
    url = "mongodb://127.0.0.1:27017/chat"   # or --mongo (the flag wins)
    [mongodb.collections.messages]  # or --mongo-watch messages (then read is private)
    read = "public"

Tables can also be watched with `tidings watch TABLE`, and managed collections defined
with `tidings collection create NAME` or `PUT /api/collections/NAME` (both recorded in the
database, `feeds/definitions.py`); the file wins for a name in both. Defaults are the
safe ones: updates are private (a reader needs a JWT whose subscribe claim matches
`/collections/NAME`), and writes through the API need a publisher token whose publish
claim matches `/collections/NAME`.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import jsonschema
import jsonschema.validators
import referencing.exceptions

from tidings.feeds.errors import ConfigError, InvalidDefinition, SchemaViolation
from tidings.feeds.events import JSONObject, JSONValue

__all__ = [
    "METADATA_FIELDS",
    "CollectionConfig",
    "FeedConfig",
    "MongoConfig",
    "check_document_id",
    "load_config",
    "mongo_collection",
    "own_fields",
    "parse_config",
    "parse_definition",
    "validate_name",
]

Kind = Literal["managed", "table", "mongodb"]
ReadRule = Literal["public", "private"]
WriteRule = Literal["publisher", "anyone", "none"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
# Tables Tidings (or SQLite) keeps for itself in the same file.
_RESERVED_PREFIXES = ("sqlite_", "tidings_")
_RESERVED_NAMES = frozenset({"updates"})
# Fields every managed document has; the API sets them, a schema never sees them.
METADATA_FIELDS = ("id", "created_at", "updated_at")
MAX_ID_LENGTH = 256
_MAX_SCHEMA_DEPTH = 64


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

    def same_as(self, other: CollectionConfig) -> bool:
        """The same settings, the schema included (`==` leaves the schema out)."""
        return self == other and self.schema == other.schema

    @property
    def private(self) -> bool:
        return self.read == "private"

    @property
    def topic(self) -> str:
        return f"/collections/{self.name}"

    @property
    def writable(self) -> bool:
        return self.kind == "managed" and self.write != "none"

    @property
    def watched(self) -> str:
        """What a collection that is not managed is, for messages ("" when managed)."""
        return {"table": "a watched table", "mongodb": "a MongoDB collection"}.get(
            self.kind, "")

    def validate(self, document: Mapping[str, object]) -> None:
        """Check a document's own fields (not id, created_at, updated_at) against the
        schema; SchemaViolation (422) lists every failing field."""
        if self._validator is None:
            return
        own = {k: v for k, v in document.items() if k not in METADATA_FIELDS}
        problems: list[dict[str, str]] = []
        try:
            errors = sorted(self._validator.iter_errors(own), key=lambda e: list(e.path))
        except referencing.exceptions.Unresolvable as exc:
            # A `$ref` to nowhere, met only on some documents: the schema's fault, told
            # as a refusal rather than a 500.
            raise SchemaViolation(f"the collection's schema cannot be applied: {exc}", [{
                "field": "", "message": f"unresolvable reference in the schema: {exc}"}],
            ) from None
        for error in errors:
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
class MongoConfig:
    """The MongoDB database whose collections are watched (`[mongodb]`, `--mongo`)."""

    url: str = ""
    collections: Mapping[str, CollectionConfig] = field(default_factory=dict)

    def with_watched(self, url: str, names: Iterable[str]) -> MongoConfig:
        """This plus the command line's `--mongo URL` (which wins) and `--mongo-watch`
        names (private unless the file says otherwise)."""
        out = dict(self.collections)
        for name in names:
            if name not in out:
                out[name] = mongo_collection(validate_name(name), "private")
        return MongoConfig(url or self.url, out)


def mongo_collection(name: str, read: str) -> CollectionConfig:
    """A watched MongoDB collection: keyed by `_id`, read-only through the API."""
    return CollectionConfig(name, "mongodb", "_id", cast(ReadRule, read), "none")


@dataclass(frozen=True, slots=True)
class FeedConfig:
    collections: Mapping[str, CollectionConfig] = field(default_factory=dict)
    mongodb: MongoConfig = field(default_factory=MongoConfig)

    def merged(self, watched: list[CollectionConfig],
               defined: list[CollectionConfig] | None = None) -> FeedConfig:
        """This configuration plus the collections defined in the database and the tables
        watched with `tidings watch`, in that order of precedence (the file wins)."""
        out = dict(self.collections)
        lowered = {name.lower() for name in out}
        for config in [*(defined or []), *watched]:
            if config.name.lower() not in lowered:
                out[config.name] = config
                lowered.add(config.name.lower())
        return FeedConfig(out, self.mongodb)

    def declares(self, name: str) -> bool:
        """Whether the file names `name` (however capitalized, as SQLite compares)."""
        return name.lower() in {declared.lower() for declared in self.collections}


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
    unknown = set(data) - {"collections", "tables", "mongodb"}
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
    return FeedConfig(out, _mongodb(data, seen))


def _mongodb(data: Mapping[str, Any], seen: set[str]) -> MongoConfig:
    """`[mongodb]`: `url`, and `[mongodb.collections.NAME]` with a `read` rule each."""
    section = _section(data, "mongodb")
    extra = set(section) - {"url", "collections"}
    if extra:
        raise ConfigError(f"[mongodb]: unknown options {', '.join(sorted(extra))}")
    url = section.get("url", "")
    if not isinstance(url, str):
        raise ConfigError("[mongodb] url must be a mongodb:// URL")
    out: dict[str, CollectionConfig] = {}
    for name, options in _section(section, "collections").items():
        where = f"[mongodb.collections.{name}]"
        validate_name(name)
        if name.lower() in seen:
            raise ConfigError(f"{where}: the name is configured twice")
        if not isinstance(options, dict) or set(options) - {"read"}:
            raise ConfigError(f"{where} takes one option: read")
        read = _choice(options.get("read", "private"), ("public", "private"), f"{where} read")
        out[name] = mongo_collection(name, read)
    return MongoConfig(url, out)


def _remote_references(schema: object, depth: int = 0) -> list[str]:
    """The `$ref`s of a schema that point outside it (never fetched: refused up front).
    RecursionError for a schema nested deeper than any sensible one."""
    if depth > _MAX_SCHEMA_DEPTH:
        raise RecursionError("the schema is nested too deeply")
    if isinstance(schema, list):
        return [ref for item in schema for ref in _remote_references(item, depth + 1)]
    if not isinstance(schema, dict):
        return []
    found = []
    for key, value in schema.items():
        if key in ("$ref", "$dynamicRef", "$recursiveRef") and isinstance(value, str):
            if not value.startswith("#"):
                found.append(value)
        else:
            found += _remote_references(value, depth + 1)
    return found


def _or_default(value: object, default: str) -> object:
    return default if value is None else value


def parse_definition(name: str, options: Mapping[str, object]) -> CollectionConfig:
    """A managed collection defined at run time (`PUT /api/collections/NAME`, `tidings
    collection create`): the options of a `[collections.NAME]` section, `null` meaning the
    default. A bad name is a ConfigError (400); bad options are InvalidDefinition (422),
    each failing field saying why."""
    validate_name(name)
    problems: list[dict[str, str]] = [
        {"field": key, "message": "unknown option (a definition has read, write, schema)"}
        for key in sorted(set(options) - {"read", "write", "schema"})]
    read = _or_default(options.get("read"), "private")
    if read not in ("public", "private"):
        problems.append({"field": "read",
                         "message": f"read must be public or private (got {read!r})"})
    write = _or_default(options.get("write"), "publisher")
    if write not in ("publisher", "anyone", "none"):
        problems.append({"field": "write", "message":
                         f"write must be publisher, anyone or none (got {write!r})"})
    schema = options.get("schema")
    if schema is not None and not isinstance(schema, dict):
        problems.append({"field": "schema", "message": "schema must be a JSON Schema object"})
    elif schema is not None:
        try:
            remote = _remote_references(schema)
        except RecursionError:
            remote = []
            problems.append({"field": "schema", "message": f"the schema is nested more than "
                                                           f"{_MAX_SCHEMA_DEPTH} levels deep"})
        if remote:
            problems.append({"field": "schema", "message": f"schema references must be "
                                                           f"local (#...), not {remote[0]!r}"})
    if problems:
        fields = ", ".join(p["field"] for p in problems)
        raise InvalidDefinition(f"the definition of {name} is not valid: {fields}", problems)
    try:
        return CollectionConfig(name, "managed", "id", cast(ReadRule, read),
                                cast(WriteRule, write), cast("dict[str, Any] | None", schema))
    except ConfigError as exc:
        reason = exc.message.split(": invalid JSON Schema: ", 1)[-1]
        raise InvalidDefinition(f"the schema of {name} is not a valid JSON Schema: {reason}",
                                [{"field": "schema", "message": reason}]) from None


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
